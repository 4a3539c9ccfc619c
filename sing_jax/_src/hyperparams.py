"""Checks of hyper-parameters at construction time.

Values that are traced (inside ``jit`` or ``optax.inject_hyperparams``) cannot be
checked and are let through; schedules are checked at step 0.
"""

from __future__ import annotations

from typing import Any

import jax


def _concrete_float(value: Any) -> float | None:
    """``float(value)`` when the value is a concrete scalar, else ``None``."""
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError,
            jax.errors.TracerArrayConversionError):
        return None


def _value_at_start(owner: str, name: str, value: Any) -> float | None:
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{owner}: {name}={value!r} is a string; expected a number or an "
                         "optax schedule.")
    if callable(value):
        try:
            return _concrete_float(value(0))
        except Exception:  # a schedule that cannot be evaluated eagerly is let through
            return None
    return _concrete_float(value)


def check_non_negative(owner: str, name: str, value: Any) -> None:
    """``value >= 0`` (a schedule is checked at step 0)."""
    x = _value_at_start(owner, name, value)
    if x is not None and not x >= 0:
        raise ValueError(f"{owner}: {name}={x!r} is not allowed; expected a value >= 0 "
                         "(a float or an optax schedule).")


def check_positive(owner: str, name: str, value: Any) -> None:
    """``value > 0`` (a schedule is checked at step 0)."""
    x = _value_at_start(owner, name, value)
    if x is not None and not x > 0:
        raise ValueError(f"{owner}: {name}={x!r} is not allowed; expected a value > 0.")


def check_unit_interval(owner: str, name: str, value: Any, *, include_one: bool = False,
                        ) -> None:
    """``0 <= value < 1`` (or ``<= 1`` with ``include_one``)."""
    x = _value_at_start(owner, name, value)
    if x is None:
        return
    ok = 0.0 <= x <= 1.0 if include_one else 0.0 <= x < 1.0
    if not ok:
        interval = "[0, 1]" if include_one else "[0, 1)"
        raise ValueError(f"{owner}: {name}={x!r} is outside {interval}.")


def check_positive_int(owner: str, name: str, value: Any) -> None:
    """An integer ``>= 1``."""
    x = _concrete_float(value)
    if x is not None and not (x >= 1 and float(x).is_integer()):
        raise ValueError(f"{owner}: {name}={value!r} is not allowed; expected an integer "
                         ">= 1.")


def check_adam_hyperparams(owner: str, b1: Any, b2: Any, eps: Any) -> None:
    """Adam's decay rates in ``[0, 1)`` and a non-negative ``eps``."""
    check_unit_interval(owner, "b1", b1)
    check_unit_interval(owner, "b2", b2)
    check_non_negative(owner, "eps", eps)
