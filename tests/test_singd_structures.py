"""Every SINGD structure against its dense equivalent (NumPy, written from the spec).

Random non-symmetric members and inputs, float32 and bfloat16, dims that exercise
the corner cases (1, a partial block, the hierarchical middle).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sing_jax

S = sing_jax.singd_structures


def project_dense(name, opts, m):
    """P(M) as a dense NumPy matrix, for a symmetric M (independent of the library)."""
    d = m.shape[0]
    out = np.zeros_like(m)
    if name == "dense":
        return m.copy()
    if name == "diagonal":
        return np.diag(np.diag(m))
    if name == "block_diagonal":
        b = opts.get("block_size", 30)
        for start in range(0, d, b):
            if d - start < b:  # remainder block
                out[start:, start:] = m[start:, start:]
                break
            out[start:start + b, start:start + b] = m[start:start + b, start:start + b]
        return out
    if name == "hierarchical":
        k1, k2 = opts.get("k1", 15), opts.get("k2", 15)
        n1 = min(d, k1)
        n2 = 0 if d <= k1 else min(k2, d - k1)
        s = d - n2
        out[:n1, :n1] = m[:n1, :n1]
        out[:n1, n1:] = 2 * m[:n1, n1:]
        for i in range(n1, s):
            out[i, i] = m[i, i]
        out[s:, n1:s] = 2 * m[s:, n1:s]
        out[s:, s:] = m[s:, s:]
        return out
    if name in ("tril_toeplitz", "triu_toeplitz"):
        coeffs = np.zeros(d)
        for k in range(d):
            coeffs[k] = (np.trace(m, -k) + (np.trace(m, k) if k else 0.0)) / (d - k)
        for i in range(d):
            for j in range(d):
                k = i - j if name == "tril_toeplitz" else j - i
                if k >= 0:
                    out[i, j] = coeffs[k]
        return out
    # triangular diagonal + one dense row/column
    lower = name.startswith("tril")
    s = d - 1 if "top_left" in name else 0
    is_row = lower == (s == d - 1)
    out = np.diag(np.diag(m))
    for j in range(d):
        if j != s:
            v = m[s, j] + m[j, s]
            if is_row:
                out[s, j] = v
            else:
                out[j, s] = v
    return out


SPECS = [
    ("dense", {}), ("diagonal", {}), ("block_diagonal", {"block_size": 4}),
    ("block_diagonal", {}), ("hierarchical", {"k1": 3, "k2": 2}), ("hierarchical", {}),
    ("tril_toeplitz", {}), ("triu_toeplitz", {}),
    ("tril_top_left_diagonal", {}), ("triu_top_left_diagonal", {}),
    ("tril_bottom_right_diagonal", {}), ("triu_bottom_right_diagonal", {}),
]
DIMS = [1, 4, 37]  # 4: one whole block, no hierarchical middle; 37: partial blocks
REL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def assert_close(actual, expected, dtype):
    """Entrywise, with an absolute slack relative to the largest expected entry."""
    expected = np.asarray(expected, np.float64)
    scale = 1.0 + np.max(np.abs(expected), initial=0.0)
    np.testing.assert_allclose(f64(actual), expected, rtol=REL[dtype], atol=REL[dtype] * scale)


def member(spec, d, rng, dtype):
    """A random member of the structure: the projection of a non-symmetric matrix."""
    return spec.cls.from_dense(jnp.asarray(rng.normal(size=(d, d)), dtype), **dict(spec.options))


def f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


@jax.jit
def all_operations(a, b, x, sym):
    return dict(
        project=a.project(sym).to_dense(), matmul=a.matmul(b).to_dense(), matmat=a @ x,
        rmatmat=a.rmatmat(x), outer_matmat=a.outer_matmat(x),
        right_outer_matmat=a.right_outer_matmat(x.T),
        from_inner_x=a.from_inner(x).to_dense(),
        from_inner=a.from_inner().to_dense(), project_outer=a.project_outer(x).to_dense(),
        average_trace=a.average_trace(), add_diagonal=a.add_diagonal(0.5).to_dense(),
        add_scaled=(a + b * 2.0).to_dense(), sub=(a - b).to_dense(), max_abs=a.max_abs(),
        dtypes=(a.matmul(b).dtype == a.dtype) & (a.from_inner(x).dtype == a.dtype),
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(("name", "opts"), SPECS, ids=[f"{n}{o}" for n, o in SPECS])
def test_operations_match_dense(name, opts, dtype):
    spec = S.structure(name, **opts)
    rng = np.random.default_rng(0)
    for d in DIMS if dtype == jnp.float32 else DIMS[-1:]:
        a, b = member(spec, d, rng, dtype), member(spec, d, rng, dtype)
        ad, bd = f64(a.to_dense()), f64(b.to_dense())
        x = jnp.asarray(rng.normal(size=(d, 3)), dtype)
        xd = f64(x)
        sym = rng.normal(size=(d, d))
        sym = jnp.asarray(sym + sym.T, dtype)
        got = all_operations(a, b, x, sym)
        assert_close(got["project"], project_dense(name, opts, f64(sym)), dtype)
        assert_close(got["matmul"], ad @ bd, dtype)
        assert_close(got["matmat"], ad @ xd, dtype)
        assert_close(got["rmatmat"], ad.T @ xd, dtype)
        assert_close(got["outer_matmat"], ad @ ad.T @ xd, dtype)
        assert_close(got["right_outer_matmat"], xd.T @ ad @ ad.T, dtype)
        assert_close(got["from_inner_x"], project_dense(name, opts, ad.T @ xd @ xd.T @ ad), dtype)
        assert_close(got["from_inner"], project_dense(name, opts, ad.T @ ad), dtype)
        assert_close(got["project_outer"], project_dense(name, opts, xd @ xd.T), dtype)
        assert_close(got["average_trace"], np.trace(ad) / d, dtype)
        assert_close(got["add_diagonal"], ad + 0.5 * np.eye(d), dtype)
        assert_close(got["add_scaled"], ad + 2 * bd, dtype)
        assert_close(got["sub"], ad - bd, dtype)
        assert_close(got["max_abs"], np.abs(ad).max(), dtype)
        assert bool(got["dtypes"])
        np.testing.assert_array_equal(f64(spec.eye(d, dtype).to_dense()), np.eye(d))
        np.testing.assert_array_equal(f64(spec.zeros(d, dtype).to_dense()), np.zeros((d, d)))
        assert spec.eye(d, dtype).dtype == dtype


def test_memory_is_what_each_structure_documents():
    d = 100
    expected = {
        "dense": d * d, "diagonal": d, "block_diagonal": 3 * 30 * 30 + 10 * 10,
        "hierarchical": 15 * 15 + 15 * 85 + 70 + 15 * 70 + 15 * 15,
        "tril_toeplitz": d, "triu_toeplitz": d, "tril_top_left_diagonal": 2 * d - 1,
        "triu_top_left_diagonal": 2 * d - 1, "tril_bottom_right_diagonal": 2 * d - 1,
        "triu_bottom_right_diagonal": 2 * d - 1,
    }
    for name, n in expected.items():
        assert S.structure(name).num_stored(d) == n, name


def test_block_diagonal_with_one_block_is_dense_for_non_symmetric_matrices():
    rng = np.random.default_rng(1)
    d = 7
    k = jnp.asarray(rng.normal(size=(d, d)), jnp.float32)  # a non-symmetric K
    x = jnp.asarray(rng.normal(size=(d, 4)), jnp.float32)
    block = S.BlockDiagonalMatrix.from_dense(k, block_size=8)
    dense = S.DenseMatrix(k)
    np.testing.assert_allclose(block.rmatmat(x), dense.rmatmat(x), rtol=1e-6)
    np.testing.assert_allclose(block.from_inner().to_dense(), dense.from_inner().to_dense(),
                               rtol=1e-6)
    np.testing.assert_allclose(block.from_inner(x).to_dense(), dense.from_inner(x).to_dense(),
                               rtol=1e-5)
    np.testing.assert_allclose(block.outer_matmat(x), dense.outer_matmat(x), rtol=1e-5)
    # the reference's symmetric-block assumption is wrong for such K
    ref_like = S.BlockDiagonalMatrix.from_dense(k, block_size=8, symmetric_blocks=True)
    assert np.max(np.abs(ref_like.rmatmat(x) - dense.rmatmat(x))) > 1e-2
    np.testing.assert_allclose(ref_like.outer_matmat(x), ref_like.matmat(ref_like.rmatmat(x)),
                               rtol=1e-5)


def test_structures_are_pytrees_that_jit():
    spec = S.structure("hierarchical", k1=3, k2=2)
    a = spec.eye(9, jnp.float32)
    fn = jax.jit(lambda m, x: (m.matmul(m).add_diagonal(1.0), m.from_inner(x)))
    out, inner = fn(a, jnp.ones((9, 2)))
    np.testing.assert_allclose(out.to_dense(), 2 * np.eye(9))
    assert type(inner) is S.HierarchicalMatrix and inner.k1 == 3
    leaves = jax.tree.leaves(a)
    assert len(leaves) == 5


def test_structure_names_and_errors():
    assert S.structure("block30diagonal") == S.structure("block_diagonal", block_size=30)
    assert S.structure("hierarchical15_15").cls is S.HierarchicalMatrix
    assert S.structure("TrilToeplitz").name == "tril_toeplitz"
    with pytest.raises(ValueError, match="unknown structure 'banded'"):
        S.structure("banded")
    with pytest.raises(ValueError, match="unknown options"):
        S.structure("diagonal", block_size=3)
    with pytest.raises(TypeError, match="structures differ"):
        S.structure("dense").eye(3, jnp.float32) + S.structure("diagonal").eye(3, jnp.float32)
    with pytest.raises(ValueError, match="square"):
        S.DenseMatrix(jnp.ones((2, 3)))


@pytest.mark.parametrize("num_rows", [5, 40])  # fewer and many more rows than columns
def test_curvature_from_rows_and_from_the_gram_matrix_equal_from_inner(num_rows):
    """P(S^T X X^T S) taken the ways the curvature takes it: from the rows X^T, from
    the Gram matrix X X^T (whole, or the diagonal blocks block-diagonal needs)."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(9, num_rows)), jnp.float32)
    cases = [(name, {}) for name in S.STRUCTURE_CLASSES] + [
        ("block_diagonal", {"block_size": 4}),
        ("block_diagonal", {"block_size": 4, "symmetric_blocks": True})]
    for name, options in cases:
        cls = S.structure(name).cls
        a = cls.from_dense(jnp.asarray(rng.normal(size=(9, 9)), jnp.float32), **options)
        want = a.from_inner(x).to_dense()
        np.testing.assert_allclose(a.from_gram(x @ x.T).to_dense(), want,
                                   rtol=1e-4, atol=1e-4, err_msg=f"{name} {options}")
        np.testing.assert_allclose(a.from_inner_rows(x.T).to_dense(), want,
                                   rtol=1e-4, atol=1e-4, err_msg=f"{name} {options}")
    diagonal = S.DiagonalMatrix(jnp.asarray(rng.normal(size=9), jnp.float32))
    np.testing.assert_allclose(diagonal.from_square_sums(jnp.sum(x * x, axis=1)).to_dense(),
                               diagonal.from_inner(x).to_dense(), rtol=1e-5)


@pytest.mark.parametrize("symmetric_blocks", [False, True])
def test_block_diagonal_right_products_equal_the_textbook_form(symmetric_blocks):
    # Y (S S^T) = ((S S^T)^T Y^T)^T: on CPU taken one column block of Y at a time.
    rng = np.random.default_rng(4)
    block = S.BlockDiagonalMatrix.from_dense(jnp.asarray(rng.normal(size=(11, 11)), jnp.float32),
                                             block_size=3, symmetric_blocks=symmetric_blocks)
    y = jnp.asarray(rng.normal(size=(5, 11)), jnp.float32)
    outer = block.matmat(block.rmatmat(jnp.eye(11, dtype=jnp.float32)))  # S S^T, dense
    np.testing.assert_allclose(block.right_outer_matmat(y), (outer.T @ y.T).T, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(jax.jit(block.right_outer_matmat)(y), y @ outer, rtol=1e-5,
                               atol=1e-5)
