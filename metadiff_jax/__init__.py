"""MetaDiff in JAX: few-shot learning with a task-conditional diffusion over classifier weights.

The core (pure functions of arrays): `schedule` (noise schedules), `prototypes` (class
statistics, the support loss of Eq. 11 and its gradient, logits), `heads`, `tcunet` (the
denoiser), `diffusion` (training loss and sampler). The library the stages use: `method` (the
method as one object built from the config), `embedding` (the features of a split under a
backbone), `pretraining` (the backbone's classifier and its steps), `workdir` (a run's layout,
its readers and guards), `rng` (keys by purpose), `training_loop` and `evaluator`. The pipeline
is `stages`, run by `main`; `predict` classifies new images with a trained workdir;
`pytorch_weights` converts the original PyTorch code's weights and `import_torch` writes them
as a workdir.
"""

__version__ = "0.1.0"
