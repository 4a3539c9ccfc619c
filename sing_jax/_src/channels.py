"""Channel geometry: which axes of a parameter leaf index independent channels.

A parameter followed by a normalisation layer is invariant to a positive
rescaling of each of its channels, so it lives on a product of spheres. A leaf
has *channel dims* ``C`` (the axes that index the channels) and *group dims*
``G`` (every other axis); ``<a, b>`` is the per-channel inner product, the sum of
``a * b`` over ``G``, and ``d = prod(shape[G])`` is the size of one sphere.

The spec of a whole parameter tree is a tree shaped like the parameters whose
leaves are :class:`ChannelDims` or ``None`` (``None``: Euclidean, every element
is its own channel), a single ``ChannelDims``/``None`` applied to every leaf, or
a callable ``params -> that tree`` (called at ``init`` and at every ``update``).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sing_jax._src.paths import leaf_paths, path_str


@dataclasses.dataclass(frozen=True, init=False)
class ChannelDims:
    """The channel axes of one parameter leaf.

    ``ChannelDims((-1,))`` (the default) keeps the last axis, the output channel
    of a Flax ``Conv``/``Linear`` kernel: each output channel is one sphere.
    ``ChannelDims(())`` makes the whole leaf a single group (a layer followed by
    LayerNorm). Negative axes count from the end, as in NumPy.

    Instances are hashable, compare by value, and are pytree *leaves* (a plain
    tuple of ints would be flattened by JAX into separate leaves).
    """

    axes: tuple[int, ...]

    def __init__(self, axes: Sequence[int] | int = (-1,)):
        if _is_int_axis(axes):
            axes = (axes,)
        if isinstance(axes, (str, bytes)) or not isinstance(axes, Sequence | np.ndarray):
            raise TypeError(
                f"ChannelDims takes an int axis or a sequence of int axes, got {axes!r}"
            )
        bad = [a for a in axes if not _is_int_axis(a)]
        if bad:
            # Floats and bools would be silently truncated to an axis by int(); a
            # mistyped spec must not quietly select another channel axis.
            raise TypeError(
                f"ChannelDims axes must be ints, got {bad[0]!r} in {axes!r}"
            )
        object.__setattr__(self, "axes", tuple(int(a) for a in axes))

    def group_axes(self, ndim: int, path: str = "<leaf>") -> tuple[int, ...]:
        """The non-negative axes that one channel's group spans (``G``).

        Raises:
          ValueError: an axis is out of range or repeated, or the leaf is 0-d.
        """
        if ndim == 0:
            raise ValueError(
                f"{path}: ChannelDims{self.axes} given for a 0-d leaf; a scalar has no "
                "channel geometry. Use None (Euclidean) for this leaf."
            )
        normalized = []
        for axis in self.axes:
            if not -ndim <= axis < ndim:
                raise ValueError(
                    f"{path}: ChannelDims axis {axis} is out of range for a leaf with "
                    f"ndim={ndim}; allowed axes are {-ndim}..{ndim - 1}."
                )
            normalized.append(axis % ndim)
        if len(set(normalized)) != len(normalized):
            raise ValueError(
                f"{path}: ChannelDims{self.axes} repeats an axis (ndim={ndim})."
            )
        return tuple(a for a in range(ndim) if a not in normalized)


def is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _is_int_axis(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


ChannelDimsSpec = Union[None, ChannelDims, Any, Callable[[Any], Any]]


def refuse_step_count(owner: str, params: Any) -> None:
    """Raises when a params-to-spec callable is handed a step count instead.

    ``optax.inject_hyperparams`` takes every callable keyword for a schedule and
    calls it with the step count, a 0-d integer array; a spec or mask callable
    would then silently turn every leaf Euclidean (or unmasked).
    """
    if (isinstance(params, (jax.Array, np.ndarray)) and np.ndim(params) == 0
            and jnp.issubdtype(params.dtype, jnp.integer)):
        raise ValueError(
            f"{owner} was called with a 0-d integer array ({params!r}) instead of a "
            "parameter tree: most likely optax.inject_hyperparams took it for a "
            "schedule and passed it the step count. Pass callables that map params to "
            "a spec or mask through inject_hyperparams(..., static_args=(name,)) or "
            "functools.partial(optimizer, name=callable)."
        )


def _is_spec_leaf(x: Any) -> bool:
    return x is None or isinstance(x, ChannelDims)


class LeafGeometry(NamedTuple):
    """Static geometry of one leaf: the axes of a group and the group size ``d``.

    ``group_axes is None`` means Euclidean: every element is its own channel.
    """

    group_axes: tuple[int, ...] | None
    group_size: int

    @property
    def is_spherical(self) -> bool:
        """True when the leaf has a channel spec whose groups hold several elements."""
        return self.group_axes is not None and self.group_size > 1


EUCLIDEAN = LeafGeometry(None, 1)


def resolve_channel_dims(spec: ChannelDimsSpec, params: Any) -> list[LeafGeometry]:
    """Validates ``spec`` against ``params`` and returns one geometry per array leaf.

    The order is the flattening order of ``params``. A spec tree for a larger
    tree whose paths cover every leaf of ``params`` is matched by path, so a
    full-model spec works inside ``optax.masked`` and ``optax.partition``. Errors
    name the leaf path, the value and what was expected.
    """
    if callable(spec) and not isinstance(spec, ChannelDims):
        spec = spec(params)
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    if _is_spec_leaf(spec):
        spec_leaves = [(None, spec)] * len(flat_params)
    else:
        spec_leaves = jax.tree_util.tree_flatten_with_path(spec, is_leaf=_is_spec_leaf)[0]
        bad = [(p, s) for p, s in spec_leaves if not _is_spec_leaf(s)]
        if bad:
            path, value = bad[0]
            raise ValueError(
                f"channel_dims: the spec leaf at {path_str(path) or '<root>'} is "
                f"{value!r}; expected ChannelDims(...) or None (wrap a tuple of axes, "
                "e.g. ChannelDims((-1,)): JAX flattens a bare tuple into separate leaves)."
            )
        if len(spec_leaves) != len(flat_params):
            param_names = [path_str(p) for p, _ in flat_params]
            spec_names = [path_str(p) for p, _ in spec_leaves]
            by_name = dict(zip(spec_names, (s for _, s in spec_leaves)))
            if (len(by_name) == len(spec_names)
                    and all(name in by_name for name in param_names)):
                # A sub-tree of the spec's params, as inside optax.masked or
                # optax.partition (masked-out leaves become empty MaskedNodes): match
                # by path.
                spec_leaves = [(p, by_name[name]) for (p, _), name in
                               zip(flat_params, param_names)]
                return _geometries(flat_params, spec_leaves)
            missing = sorted(set(param_names) - set(spec_names))[:5]
            extra = sorted(set(spec_names) - set(param_names))[:5]
            raise ValueError(
                f"channel_dims: the spec has {len(spec_leaves)} leaves but the params "
                f"have {len(flat_params)}; the spec must be a tree shaped like the "
                f"params (leaves ChannelDims or None). Params without a spec: {missing}; "
                f"spec entries without a param: {extra}."
            )
        for (ppath, _), (spath, _) in zip(flat_params, spec_leaves):
            if path_str(ppath) != path_str(spath):
                raise ValueError(
                    "channel_dims: the spec tree does not match the params: found spec "
                    f"entry {path_str(spath)!r} where the params have "
                    f"{path_str(ppath)!r}."
                )
    return _geometries(flat_params, spec_leaves)


def _geometries(flat_params: list, spec_leaves: list) -> list[LeafGeometry]:
    geometries = []
    for (path, leaf), (_, leaf_spec) in zip(flat_params, spec_leaves):
        if leaf_spec is None:
            geometries.append(EUCLIDEAN)
            continue
        shape = np.shape(leaf)
        axes = leaf_spec.group_axes(len(shape), path_str(path) or "<root>")
        geometries.append(LeafGeometry(axes, int(np.prod([shape[a] for a in axes]))))
    return geometries


def channel_inner(a: jax.Array, b: jax.Array, geometry: LeafGeometry) -> jax.Array:
    """Per-channel inner product ``<a, b>``: sum of ``a * b`` over the group axes.

    The result keeps the reduced axes with size 1, so it broadcasts against the
    leaf. For a Euclidean leaf it is the elementwise product.
    """
    if geometry.group_axes is None:
        return a * b
    return jnp.sum(a * b, axis=geometry.group_axes, keepdims=True)


def channel_shape(shape: Sequence[int], geometry: LeafGeometry) -> tuple[int, ...]:
    """Shape of a per-channel statistic of a leaf (reduced axes kept as size 1)."""
    if geometry.group_axes is None:
        return tuple(shape)
    return tuple(1 if i in geometry.group_axes else n for i, n in enumerate(shape))


def map_with_geometry(fn: Callable[..., Any], geometries: list[LeafGeometry], tree: Any,
                      *rest: Any) -> Any:
    """``jax.tree.map`` that also passes each leaf's :class:`LeafGeometry`.

    The output has the structure of ``tree``; ``rest`` trees are flattened to the
    same number of leaves (they may differ in wrapper nodes, e.g. Flax Variables).
    """
    leaves, treedef = jax.tree.flatten(tree)
    others = [jax.tree.leaves(r) for r in rest]
    for other in others:
        if len(other) != len(leaves):
            raise ValueError(
                f"expected trees with {len(leaves)} leaves, got one with {len(other)}"
            )
    out = [fn(g, leaf, *(o[i] for o in others))
           for i, (g, leaf) in enumerate(zip(geometries, leaves))]
    return treedef.unflatten(out)


# ---------------------------------------------------------------------------------
# Building specs


Rule = tuple[str, ChannelDims | None]


def channel_dims_from_rules(params: Any, rules: Sequence[Rule],
                            default: ChannelDims | None = None) -> Any:
    """A spec tree from ``(regex, ChannelDims | None)`` rules over parameter paths.

    Paths are the '/'-joined keys of each leaf (``'layers/0/kernel'``; attribute
    names of NamedTuples and dataclasses are kept, the ``.value`` of Flax
    Variables is left out). The first rule whose
    pattern ``re.fullmatch``-es the path wins; unmatched leaves get ``default``.
    A rule that matches no leaf is reported with a warning naming the pattern.

    Example::

      spec = channel_dims_from_rules(params, [(r".*conv.*/kernel", ChannelDims((-1,)))])
    """
    refuse_step_count("channel_dims_from_rules", params)
    compiled = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
            raise ValueError(
                f"channel_dims_from_rules: rule {i} is {rule!r}; expected a pair "
                "(regex, ChannelDims | None)."
            )
        pattern, value = rule
        if not _is_spec_leaf(value):
            raise ValueError(
                f"channel_dims_from_rules: rule {pattern!r} maps to {value!r}; expected "
                "ChannelDims(...) or None."
            )
        try:
            compiled.append((re.compile(pattern), value))
        except re.error as e:
            raise ValueError(f"channel_dims_from_rules: bad regex {pattern!r}: {e}") from e
    used = [False] * len(compiled)

    def pick(path, _):
        name = path_str(path)
        for i, (regex, value) in enumerate(compiled):
            if regex.fullmatch(name):
                used[i] = True
                return value
        return default

    # A Flax Variable counts as one leaf, so a spec built over an nnx.State holds
    # plain ChannelDims/None, not Variables wrapping them.
    spec = jax.tree_util.tree_map_with_path(pick, params, is_leaf=is_variable)
    for (regex, _), was_used in zip(compiled, used):
        if not was_used:
            warnings.warn(
                f"channel_dims_from_rules: pattern {regex.pattern!r} matches no parameter "
                f"path (paths look like {leaf_paths(params)[:3]})",
                stacklevel=2,
            )
    return spec


def _default_rtol(arrays: list[Any]) -> float:
    """1e-3, loosened to a few rounding steps of the coarsest floating dtype."""
    eps = [float(jnp.finfo(a.dtype).eps) for a in arrays
           if jnp.issubdtype(a.dtype, jnp.floating)]
    return max([1e-3] + [4 * e for e in eps])


class DetectedChannelDims(NamedTuple):
    """What :func:`detect_channel_dims` found: the spec tree and a readable report."""

    spec: Any
    report: str


def detect_channel_dims(apply_fn: Callable[[Any, Any], Any], params: Any, batch: Any, *,
                        channel_axis: int = -1, rtol: float | None = None, seed: int = 0,
                        min_ndim: int = 2) -> DetectedChannelDims:
    """Finds the scale-invariant leaves of a model by probing its outputs.

    For each leaf with ``ndim >= min_ndim``, the leaf is multiplied by random
    positive factors, first one per channel along ``channel_axis``, then one for
    the whole leaf, and ``apply_fn(params, batch)`` is compared with the original
    output: ``|f(p') - f(p)| <= rtol * (|f(p)| + 1e-6)`` (max norm) means
    invariant. The first invariance found decides the leaf's spec:
    ``ChannelDims((channel_axis,))``, ``ChannelDims(())`` or ``None``. A leaf whose
    arbitrary perturbation leaves the output unchanged has no effect on the
    output at all and is reported as such (spec ``None``).

    Run it with normalisation layers in *training* mode (batch statistics):
    with running averages a BatchNorm is not scale invariant.

    Args:
      apply_fn: ``(params, batch) -> outputs`` (any pytree of arrays).
      params: the parameter tree.
      batch: model input passed to ``apply_fn``; use several examples.
      channel_axis: the output-channel axis (``-1`` for Flax layouts).
      rtol: relative tolerance of the invariance check; ``None`` (default) takes
        ``1e-3``, or ``4 * finfo(dtype).eps`` when the least precise floating
        dtype of the params and outputs is coarser (``0.03`` for bfloat16,
        whose rounding alone moves the outputs by more than ``1e-3``).
      seed: seed of the random factors.
      min_ndim: leaves with fewer dims are not probed (``None``).

    Returns:
      ``DetectedChannelDims(spec, report)``.
    """
    apply = jax.jit(apply_fn)
    reference = jax.tree.leaves(apply(params, batch))
    if rtol is None:
        rtol = _default_rtol(jax.tree.leaves(params) + reference)
    ref_scale = max(float(jnp.max(jnp.abs(r))) for r in reference) + 1e-6
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [leaf for _, leaf in flat]
    # Probes are drawn and applied with NumPy on the host: only `apply` is compiled,
    # once, instead of a few small programs per distinct leaf shape.
    rng = np.random.default_rng(seed)

    def unchanged(index: int, new_leaf: np.ndarray) -> bool:
        trial = list(leaves)
        trial[index] = jnp.asarray(new_leaf, dtype=leaves[index].dtype)
        out = jax.tree.leaves(apply(treedef.unflatten(trial), batch))
        err = max(float(jnp.max(jnp.abs(o - r))) for o, r in zip(out, reference))
        return err <= rtol * ref_scale

    spec_leaves, lines = [], []
    for i, (path, leaf) in enumerate(flat):
        name = path_str(path)
        if np.ndim(leaf) < min_ndim:
            spec_leaves.append(None)
            continue
        host = np.asarray(leaf, dtype=np.float32)
        axis = channel_axis % host.ndim
        factor_shape = tuple(n if a == axis else 1 for a, n in enumerate(host.shape))
        scale = float(np.std(host)) + 1e-3
        if unchanged(i, host + scale * rng.standard_normal(host.shape, dtype=np.float32)):
            spec_leaves.append(None)
            lines.append(f"{name}: no effect on the output (left Euclidean)")
            continue
        per_channel = np.exp(rng.uniform(-0.7, 0.7, factor_shape)).astype(np.float32)
        whole = np.float32(np.exp(rng.uniform(0.3, 0.7)))
        if unchanged(i, host * per_channel):
            spec_leaves.append(ChannelDims((channel_axis,)))
            lines.append(f"{name}: invariant per channel (axis {channel_axis}) -> "
                         f"ChannelDims(({channel_axis},))")
        elif unchanged(i, host * whole):
            spec_leaves.append(ChannelDims(()))
            lines.append(f"{name}: invariant as a whole -> ChannelDims(())")
        else:
            spec_leaves.append(None)
            lines.append(f"{name}: not scale invariant (Euclidean)")
    spec = jax.tree.unflatten(treedef, spec_leaves)
    found = sum(s is not None for s in spec_leaves)
    header = f"detect_channel_dims: {found} of {len(flat)} leaves scale invariant"
    return DetectedChannelDims(spec, "\n".join([header, *lines]))
