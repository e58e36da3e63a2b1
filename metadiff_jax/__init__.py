"""MetaDiff in JAX: few-shot learning with a task-conditional diffusion over classifier weights.

Modules: `schedule` (noise schedules), `prototypes` (class statistics, the support loss of
Eq. 11 and its gradient, logits), `tcunet` (the denoiser), `diffusion` (training loss and
sampler), `torch_import` (weights of the original PyTorch code).
"""

__version__ = "0.1.0"
