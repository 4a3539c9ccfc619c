"""Flax NNX modules: LearnableScaler, the normalisation family, norm swapping, BN folding,
MC dropout, a max pool, initialisation by activation or as PyTorch's defaults, extra
activations, and (in :mod:`sing_jax.nn.models`) the benchmark models.
"""

from sing_jax._src.freezing import frozen_norm_affine  # the recipes' helper (issue 5)
from sing_jax.nn import models
from sing_jax.nn.activations import PReLU, RReLU, SwiGLU, mish, relu_squared, swiglu
from sing_jax.nn.folding import fold_batch_norms
from sing_jax.nn.init import (
    MODEL_INITS,
    init_for_activation,
    init_scheme,
    layer_initializers,
    pytorch_default_bias_init,
    pytorch_default_kernel_init,
    reinit_by_activation,
    reinit_pytorch_default,
)
from sing_jax.nn.layers import Identity, LearnableScaler, max_pool
from sing_jax.nn.mc_dropout import mc_dropout_predict
from sing_jax.nn.norms import (
    NORM_NAMES,
    NORM_TYPES,
    BatchNorm,
    batch_mask,
    make_norm,
    replace_norms,
)

__all__ = [
    "BatchNorm",
    "Identity",
    "LearnableScaler",
    "MODEL_INITS",
    "NORM_NAMES",
    "NORM_TYPES",
    "PReLU",
    "RReLU",
    "SwiGLU",
    "batch_mask",
    "fold_batch_norms",
    "frozen_norm_affine",
    "init_for_activation",
    "init_scheme",
    "layer_initializers",
    "make_norm",
    "max_pool",
    "mc_dropout_predict",
    "mish",
    "models",
    "pytorch_default_bias_init",
    "pytorch_default_kernel_init",
    "reinit_by_activation",
    "reinit_pytorch_default",
    "relu_squared",
    "replace_norms",
    "swiglu",
]
