"""The full optimizers: thin chains of the building blocks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sing_jax._src import channels, hyperparams, spherical
from sing_jax._src.adam import scale_by_softplus_adam
from sing_jax._src.channels import ChannelDimsSpec
from sing_jax._src.lookahead import lookahead
from sing_jax._src.standardize import (
    centralize_and_normalize_gradients,
    centralize_gradients,
    normalize_gradients,
    output_channel_dims,
)

MaskOrFn = Any | Callable[[optax.Params], Any] | None


def matrix_mask(params: optax.Params) -> Any:
    """True on leaves with ``ndim > 1`` (kernels), False on biases and norm scales."""
    channels.refuse_step_count("matrix_mask", params)
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def _check_common(owner: str, learning_rate, weight_decay, **betas) -> None:
    hyperparams.check_non_negative(owner, "learning_rate", learning_rate)
    hyperparams.check_non_negative(owner, "weight_decay", weight_decay)
    for name, value in betas.items():
        hyperparams.check_unit_interval(owner, name, value)


def sing(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-8, weight_decay: optax.ScalarOrSchedule = 0.0,
         softplus_beta: float | None = 50.0, centralize: bool = True, normalize: bool = True,
         lookahead_every: int | None = 5, lookahead_alpha: float = 0.5, *,
         centralize_channel_dims: ChannelDimsSpec = None,
         weight_decay_mask: MaskOrFn = None,
         ) -> optax.GradientTransformation:
    r"""SING: standardised gradients into AdamW with a softplus denominator, plus Lookahead.

    Per leaf, every step (seed 000; spec section 1):

    .. math::
      g &\leftarrow g - \operatorname{mean}_{\neq \text{out}}(g)
          \quad (\text{ndim} > 1) \qquad
      g \leftarrow g / (\lVert g \rVert_2 + \epsilon) \\
      p &\leftarrow p - \eta_t \Big(\frac{\hat m_t}{\operatorname{softplus}_\beta(\sqrt{\hat v_t})}
          + \lambda_t\, p\,[\text{ndim} > 1]\Big)

    and every ``lookahead_every`` steps ``p <- alpha p + (1 - alpha) p_slow``.

    The chain is ``centralize_gradients -> normalize_gradients ->
    scale_by_softplus_adam -> add_decayed_weights(mask) -> scale_by_learning_rate ->
    lookahead``, with the first two fused into
    :func:`sing_jax.centralize_and_normalize_gradients` when both are on; each
    piece is exported on its own.

    Args:
      learning_rate: a float or an optax schedule (about 10x AdamW's, seed 000).
      b1, b2: Adam's decay rates.
      eps: of the gradient normalisation, and of the denominator when
        ``softplus_beta`` is None.
      weight_decay: decoupled weight decay (float or schedule), about 10x lower
        than AdamW's, applied where ``weight_decay_mask`` is True.
      softplus_beta: sharpness of the softplus denominator; ``None`` uses
        ``sqrt(v_hat) + eps`` (AdamW's).
      centralize: gradient centralisation on/off.
      normalize: per-leaf gradient normalisation on/off.
      lookahead_every: Lookahead's ``k``; ``None`` disables Lookahead.
      lookahead_alpha: weight of the fast weights at a sync, in ``[0, 1]``.
      centralize_channel_dims: which axes centralisation keeps; ``None`` (default)
        means :func:`sing_jax.output_channel_dims`: the last axis of leaves with
        ``ndim > 1``, the Flax output channel.
      weight_decay_mask: a bool tree or callable; ``None`` (default) means
        :func:`sing_jax.matrix_mask` (``ndim > 1``), as SING.

    Under ``optax.inject_hyperparams`` a callable keyword is taken for a schedule:
    pass callables for ``centralize_channel_dims``/``weight_decay_mask`` through
    ``functools.partial`` or ``static_args``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, optax, sing_jax
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> tx = sing_jax.sing(learning_rate=5e-3, weight_decay=5e-4)
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.arange(6.0).reshape(3, 2), "b": jnp.ones(2)}
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Courtois, Leclerc, Gaudet, "SING: A Plug-and-Play DNN Learning Technique", 2023.
    """
    _check_common("sing", learning_rate, weight_decay, b1=b1, b2=b2)
    hyperparams.check_non_negative("sing", "eps", eps)
    if softplus_beta is not None:
        hyperparams.check_positive("sing", "softplus_beta", softplus_beta)
    if lookahead_every is not None:
        hyperparams.check_positive_int("sing", "lookahead_every", lookahead_every)
        hyperparams.check_unit_interval("sing", "lookahead_alpha", lookahead_alpha,
                                        include_one=True)
    parts = []
    centralize_spec = (output_channel_dims if centralize_channel_dims is None
                       else centralize_channel_dims)
    if centralize and normalize:
        parts.append(centralize_and_normalize_gradients(centralize_spec, eps))
    elif centralize:
        parts.append(centralize_gradients(centralize_spec))
    elif normalize:
        parts.append(normalize_gradients(eps))
    parts += [
        scale_by_softplus_adam(b1, b2, eps, softplus_beta),
        optax.add_decayed_weights(
            weight_decay, matrix_mask if weight_decay_mask is None else weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    ]
    if lookahead_every is not None:
        parts.append(lookahead(lookahead_every, lookahead_alpha))
    return optax.chain(*parts)


def adams(learning_rate: optax.ScalarOrSchedule = 1e-3, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, weight_decay: optax.ScalarOrSchedule = 0.0,
          channel_dims: ChannelDimsSpec = None) -> optax.GradientTransformation:
    r"""AdamS: Adam with a per-channel second moment and coupled L2 (seed 001).

    .. math::
      g \leftarrow g + \lambda p, \qquad
      p \leftarrow p - \eta\, \sqrt{d}\, \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon},
      \quad v_t = \beta_2 v_{t-1} + (1-\beta_2)\langle g, g\rangle

    ``channel_dims=None`` (the default: every element its own channel) is
    ``torch.optim.Adam`` with its coupled ``weight_decay``. For a network with
    BatchNorm pass ``ChannelDims((-1,))`` for the kernels that feed a BatchNorm
    (see :func:`sing_jax.detect_channel_dims`, :func:`sing_jax.channel_dims_from_rules`).

    Chain: ``add_decayed_weights -> scale_by_adams -> scale_by_learning_rate``.

    Example:
      >>> import jax.numpy as jnp, sing_jax
      >>> params = {"conv": jnp.ones((3, 3, 4, 8)), "bias": jnp.zeros(8)}
      >>> spec = {"conv": sing_jax.ChannelDims((-1,)), "bias": None}
      >>> tx = sing_jax.adams(1e-3, channel_dims=spec)
      >>> state = tx.init(params)
    """
    _check_common("adams", learning_rate, weight_decay, b1=b1, b2=b2)
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        spherical.scale_by_adams(b1, b2, eps, channel_dims),
        optax.scale_by_learning_rate(learning_rate),
    )


def adamsrt(learning_rate: optax.ScalarOrSchedule = 1e-3, b1: float = 0.9,
            b2: float = 0.999, eps: float = 1e-8,
            weight_decay: optax.ScalarOrSchedule = 0.0,
            channel_dims: ChannelDimsSpec = None) -> optax.GradientTransformation:
    r"""AdamSRT: AdamS whose moments are transported along the sphere (seed 001).

    After the AdamS step from :math:`x_{prev}` to :math:`x_{new}`, on leaves with
    ``d > 1`` and :math:`n = \langle x_{new}, x_{new}\rangle + \epsilon`:

    .. math::
      v \leftarrow v \langle x_{prev}, x_{prev}\rangle / n, \qquad
      m \leftarrow (m \langle x_{prev}, x_{new}\rangle - \langle m, x_{new}\rangle x_{prev}) / n

    ``channel_dims=None`` is ``torch.optim.Adam`` with coupled weight decay.
    Chain: ``add_decayed_weights -> scale_by_adamsrt``, the fused form of
    ``spherical_transport(scale_by_adams(...))`` (same state); it owns the learning
    rate.
    """
    _check_common("adamsrt", learning_rate, weight_decay, b1=b1, b2=b2)
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        spherical.scale_by_adamsrt(learning_rate, b1, b2, eps, channel_dims),
    )


def sgdmrt(learning_rate: optax.ScalarOrSchedule = 0.1, momentum: float = 0.0,
           dampening: float = 0.0, weight_decay: optax.ScalarOrSchedule = 0.0,
           channel_dims: ChannelDimsSpec = None) -> optax.GradientTransformation:
    r"""SGDMRT: SGD with momentum whose buffer is transported along the sphere (seed 001).

    .. math::
      g \leftarrow g + \lambda p, \quad b \leftarrow \mu b + (1-\text{damp})\, g, \quad
      p \leftarrow p - \eta b, \quad
      b \leftarrow \frac{b \langle x_{prev}, x_{new}\rangle - \langle b, x_{new}\rangle\,
      x_{prev}}{\langle x_{new}, x_{new}\rangle} \ (d > 1)

    ``channel_dims=None`` is SGD with momentum (``optax.sgd(lr, momentum)`` when
    ``dampening=0``). The reference divides by :math:`\langle x_{new},x_{new}\rangle`
    with no epsilon; here a channel whose norm is exactly zero keeps its buffer
    instead of becoming NaN.

    Chain: ``add_decayed_weights -> scale_by_sgdmrt``, the fused form of
    ``spherical_transport(scale_by_momentum(...))`` (same state); it owns the
    learning rate.
    """
    _check_common("sgdmrt", learning_rate, weight_decay)
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        spherical.scale_by_sgdmrt(learning_rate, momentum, dampening, channel_dims),
    )


def adamg(learning_rate: optax.ScalarOrSchedule = 1e-3, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, weight_decay: optax.ScalarOrSchedule = 0.0,
          channel_dims: ChannelDimsSpec = None,
          single_element_spheres: bool = False) -> optax.GradientTransformation:
    r"""AdamG, the seed 001 baseline: Adam on the unit sphere of each channel.

    Leaves with a ``ChannelDims`` spec and more than one element per channel
    follow :func:`sing_jax.scale_by_adamg`'s sphere branch (no weight decay,
    channels renormalised to unit norm after every step); Euclidean leaves (``None``,
    or one element per channel) take Adam with coupled L2 ``weight_decay``.
    ``single_element_spheres=True`` puts the one-element channels of leaves with a
    spec on the sphere branch too (the reference script as written, see
    :func:`sing_jax.scale_by_adamg`, which also says how this differs from the
    reference's inverted ``channel_wise`` flag).
    """
    _check_common("adamg", learning_rate, weight_decay, b1=b1, b2=b2)
    return optax.chain(
        optax.add_decayed_weights(
            weight_decay, spherical.euclidean_mask(channel_dims, single_element_spheres)),
        spherical.scale_by_adamg(learning_rate, b1, b2, eps, channel_dims,
                                 single_element_spheres),
    )
