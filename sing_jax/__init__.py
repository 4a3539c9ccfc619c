"""sing_jax: SING, spherical optimizers, SINGD and LearnableScaler for JAX/Optax/Flax.

The public API. Optimizers are ``optax.GradientTransformation`` chains built from
small ``scale_by_*`` pieces that are exported too.
"""

# --- channel geometry (foundation) ---
# --- foundation optimizers: begin ---
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
from sing_jax._src.spherical import (
    ScaleByAdamGState,
    ScaleByAdamSState,
    ScaleByMomentumState,
    SphericalTransportState,
    euclidean_mask,
    scale_by_adamg,
    scale_by_adams,
    scale_by_momentum,
    spherical_transport,
    transport_first_moment,
    transport_second_moment,
)
from sing_jax._src.standardize import (
    centralize_gradients,
    normalize_gradients,
    output_channel_dims,
)

# --- foundation optimizers: end ---

# --- singd: begin ---
# --- singd: end ---

# --- recipes (schedules, regularizers, freezing, diagnostics): begin ---
# --- recipes: end ---

__version__ = "0.1.0"
