"""Fits the rational function behind SING's float32 softplus (``sing_jax._src.adam``).

``softplus(z) = z + log1p(exp(-z))`` for ``z >= 0``. On ``[0, 16]`` the tail
``log1p(exp(-z))`` is approximated by ``P(z) / Q(z)`` (degrees 5 and 6) so that
``(z Q + P) / Q`` has the least maximum error relative to ``softplus(z)``: a
linearised least-squares fit on Chebyshev and uniform points, reweighted by each
point's error (Lawson's iteration), in float64. Past 16 the tail is below
``1.2e-7``, which is under float32's rounding of ``z``.

Prints the coefficients (monomial basis in ``z``, lowest first, ``Q(0) = 1``),
the float64 fit error and the error of evaluating in float32 by Horner's rule:

    python experiments/fit_softplus_tail.py [--range 16] [--degrees 5 6]
"""

from __future__ import annotations

import argparse

import numpy as np
from numpy.polynomial import chebyshev, polynomial


def softplus(z):
    return np.logaddexp(0.0, z)


def fit_tail(z_max: float, p_degree: int, q_degree: int, iterations: int = 400,
             points: int = 6000) -> tuple[float, np.ndarray, np.ndarray]:
    """(max relative error, P, Q): the tail as ``P/Q`` in ``z``, errors relative to softplus."""
    k = np.arange(points)
    t = np.sort(np.concatenate([np.cos(np.pi * (k + 0.5) / points), np.linspace(-1, 1, points)]))
    z = (t + 1) / 2 * z_max
    tail, whole = np.log1p(np.exp(-z)), softplus(z)
    basis_p, basis_q = chebyshev.chebvander(t, p_degree), chebyshev.chebvander(t, q_degree)
    weights, previous_q = np.full_like(t, 1 / len(t)), np.ones_like(t)
    best = (np.inf, None, None)
    for _ in range(iterations):
        # P - tail * Q = 0, each row scaled to a relative error of softplus
        rows = np.hstack([basis_p, -tail[:, None] * basis_q])
        rows *= (np.sqrt(weights) / (whole * np.abs(previous_q)))[:, None]
        coefficients = np.linalg.svd(rows, full_matrices=False)[2][-1]
        p, q = coefficients[:p_degree + 1], coefficients[p_degree + 1:]
        q_values = basis_q @ q
        if np.all(q_values < 0):
            p, q, q_values = -p, -q, -q_values
        error = (basis_p @ p / q_values - tail) / whole
        worst = np.max(np.abs(error)) if np.all(q_values > 0) else np.inf
        if worst < best[0]:
            best = (worst, p.copy(), q.copy())
        previous_q = q_values
        weights = weights * np.abs(error)
        weights /= weights.sum()
    worst, p, q = best
    p_z, q_z = _chebyshev_to_monomial_in_z(p, z_max), _chebyshev_to_monomial_in_z(q, z_max)
    return worst, p_z / q_z[0], q_z / q_z[0]


def _chebyshev_to_monomial_in_z(coefficients, z_max):
    """Coefficients in t = 2 z / z_max - 1 (Chebyshev basis) -> monomials in z."""
    in_t = chebyshev.cheb2poly(coefficients)
    in_z = np.zeros(len(in_t))
    for power, c in enumerate(in_t):
        in_z[:power + 1] += c * polynomial.polypow([-1.0, 2 / z_max], power)
    return in_z


def float32_error(p, q, z_max):
    """Max error, relative to softplus, of ``(z Q + P) / Q`` evaluated in float32."""
    z = np.linspace(0, z_max, 400_001).astype(np.float32)

    def horner(c):
        acc = np.full_like(z, np.float32(c[-1]))
        for coefficient in c[-2::-1]:
            acc = (acc * z + np.float32(coefficient)).astype(np.float32)
        return acc

    q_z = horner(q)
    approx = ((z * q_z + horner(p)).astype(np.float32) / q_z).astype(np.float32)
    exact = softplus(z.astype(np.float64))
    return float(np.max(np.abs(approx - exact) / exact))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--range", type=float, default=16.0)
    parser.add_argument("--degrees", type=int, nargs=2, default=(5, 6))
    args = parser.parse_args()
    worst, p, q = fit_tail(args.range, *args.degrees)
    print(f"fit error (float64, relative to softplus): {worst:.2e}")
    print(f"float32 evaluation error: {float32_error(p, q, args.range):.2e}")
    print("P =", tuple(float(c) for c in p))
    print("Q =", tuple(float(c) for c in q))


if __name__ == "__main__":
    main()
