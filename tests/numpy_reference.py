"""Float64 NumPy re-derivations of spec sections 1 and 3-5, written from the spec.

Independent of the JAX code on purpose: leaves are lists of arrays, a channel
spec is a tuple of channel axes (or None = every element its own channel), and
per-channel quantities are computed by moving the channel axes to the front and
reshaping each leaf to a ``(channels, d)`` matrix, one row per channel.
"""

from __future__ import annotations

import numpy as np


class Rows:
    """A leaf viewed as a (channels, d) matrix, and back."""

    def __init__(self, shape, channel_axes):
        self.shape = tuple(shape)
        ndim = len(shape)
        if channel_axes is None:
            self.perm = list(range(ndim))
            self.rows_shape = (int(np.prod(shape)), 1)
        else:
            chans = sorted(a % ndim for a in channel_axes)
            rest = [a for a in range(ndim) if a not in chans]
            self.perm = chans + rest
            n_chan = int(np.prod([shape[a] for a in chans]))
            self.rows_shape = (n_chan, int(np.prod(shape)) // max(n_chan, 1))
        self.d = self.rows_shape[1]

    def to(self, x):
        return np.transpose(x, self.perm).reshape(self.rows_shape)

    def back(self, rows):
        permuted = [self.shape[a] for a in self.perm]
        return np.transpose(rows.reshape(permuted), np.argsort(self.perm))

    def dot(self, a, b):
        """Per-channel inner product, one number per channel, shape (channels, 1)."""
        return np.sum(self.to(a) * self.to(b), axis=1, keepdims=True)


# ---------------------------------------------------------------------------------
# Section 1: SING


def softplus_torch(x, beta, threshold=20.0):
    out = np.log1p(np.exp(np.minimum(beta * x, threshold))) / beta
    return np.where(beta * x > threshold, x, out)


class NumpySING:
    def __init__(self, params, lr=5e-3, b1=0.9, b2=0.999, wd=0.0, eps=1e-8,
                 softplus=True, beta=50.0, grad_central=True, grad_norm=True,
                 lookahead=True, k=5, alpha=0.5):
        self.hp = dict(lr=lr, b1=b1, b2=b2, wd=wd, eps=eps, softplus=softplus, beta=beta,
                       gc=grad_central, gn=grad_norm, la=lookahead, k=k, alpha=alpha)
        self.p = [np.array(x, np.float64) for x in params]
        self.m = [np.zeros_like(x) for x in self.p]
        self.v = [np.zeros_like(x) for x in self.p]
        self.slow = [x.copy() for x in self.p]
        self.t = 0
        self.counter = 0

    def step(self, grads):
        h = self.hp
        self.t += 1
        for i, g in enumerate(grads):
            g = np.array(g, np.float64)
            p = self.p[i]
            if h["gc"] and g.ndim > 1:
                # Flax layout: the output channel is the last axis; the mean is over the rest.
                rows = Rows(g.shape, (g.ndim - 1,))
                r = rows.to(g)
                g = rows.back(r - r.mean(axis=1, keepdims=True))
            if h["gn"]:
                g = g / (np.sqrt(np.sum(g * g)) + h["eps"])
            self.m[i] = h["b1"] * self.m[i] + (1 - h["b1"]) * g
            self.v[i] = h["b2"] * self.v[i] + (1 - h["b2"]) * g * g
            if p.ndim > 1:
                p = p * (1 - h["lr"] * h["wd"])
            d = np.sqrt(self.v[i]) / np.sqrt(1 - h["b2"] ** self.t)
            d = softplus_torch(d, h["beta"]) if h["softplus"] else d + h["eps"]
            self.p[i] = p - h["lr"] / (1 - h["b1"] ** self.t) * self.m[i] / d
        if h["la"]:
            self.counter += 1
            if self.counter >= h["k"]:
                self.counter = 0
                for i in range(len(self.p)):
                    self.p[i] = h["alpha"] * self.p[i] + (1 - h["alpha"]) * self.slow[i]
                    self.slow[i] = self.p[i].copy()
        return self.p


# ---------------------------------------------------------------------------------
# Sections 3-5: AdamS / AdamSRT, SGDMRT, AdamG


class NumpyAdamS:
    def __init__(self, params, specs, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, rt=False):
        self.hp = dict(lr=lr, b1=b1, b2=b2, eps=eps, wd=wd, rt=rt)
        self.p = [np.array(x, np.float64) for x in params]
        self.rows = [Rows(x.shape, s) for x, s in zip(self.p, specs)]
        self.m = [np.zeros_like(x) for x in self.p]
        # The reference keeps v at full shape; every element of a channel holds the same value.
        self.v = [np.zeros_like(x) for x in self.p]
        self.t = 0

    def step(self, grads):
        h = self.hp
        self.t += 1
        for i, g in enumerate(grads):
            rows, p = self.rows[i], self.p[i]
            g = np.array(g, np.float64) + h["wd"] * p
            self.m[i] = h["b1"] * self.m[i] + (1 - h["b1"]) * g
            sq = rows.back(np.broadcast_to(rows.dot(g, g), rows.rows_shape))
            self.v[i] = h["b2"] * self.v[i] + (1 - h["b2"]) * sq
            x_prev = p
            mhat = self.m[i] / (1 - h["b1"] ** self.t)
            vhat = self.v[i] / (1 - h["b2"] ** self.t)
            x_new = p - h["lr"] * np.sqrt(rows.d) * mhat / (np.sqrt(vhat) + h["eps"])
            self.p[i] = x_new
            if h["rt"] and rows.d > 1:
                n = rows.dot(x_new, x_new) + h["eps"]
                ratio = rows.dot(x_prev, x_prev) / n
                v_rows = rows.to(self.v[i]) * ratio
                self.v[i] = rows.back(v_rows)
                m_rows = (rows.to(self.m[i]) * rows.dot(x_prev, x_new)
                          - rows.dot(self.m[i], x_new) * rows.to(x_prev)) / n
                self.m[i] = rows.back(m_rows)
        return self.p


class NumpySGDMRT:
    def __init__(self, params, specs, lr=0.1, momentum=0.0, dampening=0.0, wd=0.0):
        self.hp = dict(lr=lr, mom=momentum, damp=dampening, wd=wd)
        self.p = [np.array(x, np.float64) for x in params]
        self.rows = [Rows(x.shape, s) for x, s in zip(self.p, specs)]
        self.b = [np.zeros_like(x) for x in self.p]

    def step(self, grads):
        h = self.hp
        for i, g in enumerate(grads):
            rows, p = self.rows[i], self.p[i]
            g = np.array(g, np.float64) + h["wd"] * p
            self.b[i] = h["mom"] * self.b[i] + (1 - h["damp"]) * g
            x_prev = p
            x_new = p - h["lr"] * self.b[i]
            self.p[i] = x_new
            if rows.d > 1:
                b_rows = (rows.to(self.b[i]) * rows.dot(x_prev, x_new)
                          - rows.dot(self.b[i], x_new) * rows.to(x_prev))
                self.b[i] = rows.back(b_rows / rows.dot(x_new, x_new))
        return self.p


class NumpyAdamG:
    """Sphere branch on leaves whose channels hold several elements (d > 1); Adam
    with coupled L2 elsewhere (spec section 2: with d = 1 AdamG is its Euclidean
    parent). ``single_element_spheres``: every leaf with a spec takes the sphere
    branch, d = 1 included (spec section 6.1, the reference script as written)."""

    def __init__(self, params, specs, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=0.0,
                 single_element_spheres=False):
        self.hp = dict(lr=lr, b1=b1, b2=b2, eps=eps, wd=wd)
        self.p = [np.array(x, np.float64) for x in params]
        self.rows = [Rows(x.shape, s) for x, s in zip(self.p, specs)]
        self.sphere = [s is not None and (r.d > 1 or single_element_spheres)
                       for s, r in zip(specs, self.rows)]
        self.m = [np.zeros_like(x) for x in self.p]
        self.v = [np.zeros_like(x) for x in self.p]
        self.t = 0

    def step(self, grads):
        h = self.hp
        self.t += 1
        for i, g in enumerate(grads):
            rows, p = self.rows[i], self.p[i]
            g = np.array(g, np.float64)
            if not self.sphere[i]:
                g = g + h["wd"] * p
            self.m[i] = h["b1"] * self.m[i] + (1 - h["b1"]) * g
            sq = rows.back(np.broadcast_to(rows.dot(g, g), rows.rows_shape))
            self.v[i] = h["b2"] * self.v[i] + (1 - h["b2"]) * sq
            x_prev = p
            x_new = p - h["lr"] / (1 - h["b1"] ** self.t) * self.m[i] / (
                np.sqrt(self.v[i] / (1 - h["b2"] ** self.t)) + h["eps"])
            if not self.sphere[i]:
                self.p[i] = x_new
                continue
            denom = np.sqrt(rows.dot(x_prev, x_prev) * rows.dot(x_new, x_new)) + h["eps"]
            m_rows = (rows.to(self.m[i]) * rows.dot(x_prev, x_new)
                      - rows.dot(self.m[i], x_new) * rows.to(x_prev)) / denom
            self.m[i] = rows.back(m_rows)
            self.p[i] = rows.back(rows.to(x_new) / (np.sqrt(rows.dot(x_new, x_new)) + h["eps"]))
        return self.p
