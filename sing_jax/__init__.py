"""sing_jax: SING, spherical optimizers, SINGD and LearnableScaler for JAX/Optax/Flax.

The public API. Optimizers are ``optax.GradientTransformation`` chains built from
small ``scale_by_*`` pieces that are exported too.
"""

# --- channel geometry (foundation) ---
from sing_jax._src.channels import (
    ChannelDims,
    DetectedChannelDims,
    channel_dims_from_rules,
    detect_channel_dims,
)

# --- foundation optimizers: begin ---
# --- foundation optimizers: end ---

# --- singd: begin ---
# --- singd: end ---

# --- recipes (schedules, regularizers, freezing, diagnostics): begin ---
# --- recipes: end ---

__version__ = "0.1.0"
