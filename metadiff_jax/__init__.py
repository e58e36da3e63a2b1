"""MetaDiff in JAX: few-shot learning with a task-conditional diffusion over classifier weights.

Modules: `schedule` (noise schedules), `prototypes` (class statistics, the support loss of
Eq. 11 and its gradient, logits), `tcunet` (the denoiser), `diffusion` (training loss and
sampler), `torch_import` (weights of the original PyTorch code), `predict` (classify new
images with a trained workdir). The pipeline is `stages`, run by `main`; `import_torch` writes
PyTorch checkpoints as a workdir.
"""

__version__ = "0.1.0"
