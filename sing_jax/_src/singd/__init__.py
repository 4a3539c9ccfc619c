"""SINGD: structured inverse-free natural gradient descent.

The modules, in the order data flows through them: :mod:`.layers` (which layers,
their kernels as matrices), :mod:`.capture` (layer inputs and output gradients),
:mod:`.curvature` (the statistics each structure needs, and :math:`H_K, H_C`),
:mod:`.structures` (one module per family of factors), :mod:`.transform` (the optax
update), :mod:`.gradients` (capture + curvature + gradients for training loops).
"""

from sing_jax._src.singd import structures
from sing_jax._src.singd.capture import LayerCapture, capture_value_and_grad
from sing_jax._src.singd.curvature import LayerCurvature
from sing_jax._src.singd.gradients import (
    SINGDMultiStepsState,
    SINGDValueAndGrad,
    accumulate_singd_stats,
    singd_curvature,
    singd_multi_steps,
    singd_value_and_grad,
    singd_value_and_grad_split,
)
from sing_jax._src.singd.layers import LayerInfo, singd_layers
from sing_jax._src.singd.transform import (
    LayerConfig,
    LayerPreconditioner,
    SINGDRegistration,
    SINGDState,
    singd,
    singd_report,
    singd_state,
)

__all__ = [
    "LayerCapture",
    "LayerConfig",
    "LayerCurvature",
    "LayerInfo",
    "LayerPreconditioner",
    "SINGDMultiStepsState",
    "SINGDRegistration",
    "SINGDState",
    "SINGDValueAndGrad",
    "accumulate_singd_stats",
    "capture_value_and_grad",
    "singd",
    "singd_curvature",
    "singd_layers",
    "singd_multi_steps",
    "singd_report",
    "singd_state",
    "singd_value_and_grad",
    "singd_value_and_grad_split",
    "structures",
]
