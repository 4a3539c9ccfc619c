"""sing_jax: SING, spherical optimizers, SINGD and LearnableScaler for JAX/Optax/Flax.

The public API. Optimizers are ``optax.GradientTransformation`` chains built from
small ``scale_by_*`` pieces that are exported too.
"""

# SING, AdamS, AdamSRT, SGDMRT, AdamG, their building blocks and channel geometry
from sing_jax._src.adam import (
    ScaleBySoftplusAdamState,
    scale_by_softplus_adam,
    softplus_denominator,
)
from sing_jax._src.aliases import adamg, adams, adamsrt, matrix_mask, sgdmrt, sing
from sing_jax._src.channels import (
    ChannelDims,
    DetectedChannelDims,
    channel_dims_from_rules,
    detect_channel_dims,
)
from sing_jax._src.lookahead import LookaheadState, lookahead
from sing_jax._src.paths import leaf_paths
from sing_jax._src.spherical import (
    ScaleByAdamGState,
    ScaleByAdamSState,
    ScaleByMomentumState,
    SphericalTransportState,
    euclidean_mask,
    scale_by_adamg,
    scale_by_adams,
    scale_by_adamsrt,
    scale_by_momentum,
    scale_by_sgdmrt,
    spherical_transport,
    transport_first_moment,
    transport_second_moment,
)
from sing_jax._src.standardize import (
    centralize_and_normalize_gradients,
    centralize_gradients,
    normalize_gradients,
    output_channel_dims,
)

# SINGD
from sing_jax._src.singd import (
    LayerCapture,
    LayerCurvature,
    LayerInfo,
    LayerPreconditioner,
    SINGDMultiStepsState,
    SINGDState,
    SINGDValueAndGrad,
    accumulate_singd_stats,
    capture_value_and_grad,
    singd,
    singd_curvature,
    singd_layers,
    singd_multi_steps,
    singd_report,
    singd_state,
    singd_value_and_grad,
    singd_value_and_grad_split,
)
from sing_jax._src.singd import structures as singd_structures

# Recipes: schedules, regularizers, freezing, diagnostics
from sing_jax import schedules
from sing_jax._src.diagnostics import (
    DiagnosticsState,
    GradNormMonitor,
    RisingGradNorms,
    diagnostics_metrics,
    find_rising_grad_norms,
    with_diagnostics,
)
from sing_jax._src.freezing import (
    any_frozen,
    finetune,
    freeze,
    freeze_all_but,
    frozen_by_module_type,
    frozen_by_regex,
    frozen_norm_affine,
    frozen_paths,
    head_only,
    reuse_layers,
    unfreeze_top_blocks,
)
from sing_jax._src.regularizers import (
    add_l1,
    add_weight_decay,
    clip_by_leaf_norm,
    decay_mask,
    incoming_weights,
    max_norm,
)

__all__ = [
    "ScaleBySoftplusAdamState",
    "scale_by_softplus_adam",
    "softplus_denominator",
    "adamg",
    "adams",
    "adamsrt",
    "matrix_mask",
    "sgdmrt",
    "sing",
    "ChannelDims",
    "DetectedChannelDims",
    "channel_dims_from_rules",
    "detect_channel_dims",
    "LookaheadState",
    "lookahead",
    "leaf_paths",
    "ScaleByAdamGState",
    "ScaleByAdamSState",
    "ScaleByMomentumState",
    "SphericalTransportState",
    "euclidean_mask",
    "scale_by_adamg",
    "scale_by_adams",
    "scale_by_adamsrt",
    "scale_by_momentum",
    "scale_by_sgdmrt",
    "spherical_transport",
    "transport_first_moment",
    "transport_second_moment",
    "centralize_and_normalize_gradients",
    "centralize_gradients",
    "normalize_gradients",
    "output_channel_dims",
    "LayerCapture",
    "LayerCurvature",
    "LayerInfo",
    "LayerPreconditioner",
    "SINGDMultiStepsState",
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
    "singd_structures",
    "schedules",
    "DiagnosticsState",
    "GradNormMonitor",
    "RisingGradNorms",
    "diagnostics_metrics",
    "find_rising_grad_norms",
    "with_diagnostics",
    "any_frozen",
    "finetune",
    "freeze",
    "freeze_all_but",
    "frozen_by_module_type",
    "frozen_by_regex",
    "frozen_norm_affine",
    "frozen_paths",
    "head_only",
    "reuse_layers",
    "unfreeze_top_blocks",
    "add_l1",
    "add_weight_decay",
    "clip_by_leaf_norm",
    "decay_mask",
    "incoming_weights",
    "max_norm",
]

__version__ = "0.1.0"

# Subpackages with heavier dependencies load on first use: `sing_jax.nn`
# (Flax modules and models), `sing_jax.data` (TFDS + grain) and `sing_jax.train`
# (orbax, logging); `import sing_jax` alone stays quick.
_LAZY_SUBPACKAGES = ("nn", "data", "train")


def __getattr__(name: str):
    if name in _LAZY_SUBPACKAGES:
        import importlib

        return importlib.import_module(f"sing_jax.{name}")
    raise AttributeError(f"module 'sing_jax' has no attribute {name!r}")
