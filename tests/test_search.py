"""Truncation and exact search against brute-force numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptor.search import exact_search, l2_normalize, truncate


def _brute(queries, corpus, k, dim):
  q = queries[:, :dim].astype(np.float64)
  c = corpus[:, :dim].astype(np.float64)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  c /= np.linalg.norm(c, axis=1, keepdims=True)
  s = q @ c.T
  # Stable sort on -score: equal scores keep ascending index order.
  idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(s, idx, axis=1), idx


def _assert_same_topk(scores, idx, ref_scores, ref_idx, atol=1e-5):
  np.testing.assert_allclose(scores, ref_scores, atol=atol)
  # Indices may differ only where scores tie within tolerance.
  differ = idx != ref_idx
  assert np.all(np.abs(scores[differ] - ref_scores[differ]) <= atol)


@pytest.mark.parametrize("jit", [False, True])
def test_truncate_values_and_unit_norm(jit):
  x = jnp.array([[3.0, 4.0, 12.0], [0.0, 0.0, 5.0]])
  f = jax.jit(truncate, static_argnums=1) if jit else truncate
  out = np.asarray(f(x, 2))
  np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)  # Zero prefix stays zero.
  np.testing.assert_allclose(np.asarray(f(x, None)), np.asarray(x) / np.array([[13.0], [5.0]]), rtol=1e-6)


def test_truncate_validates_dim():
  x = jnp.ones((2, 4))
  for bad in (0, 5, -1):
    with pytest.raises(ValueError, match=r"dim must be in \[1, 4\]"):
      truncate(x, bad)
  with pytest.raises(TypeError, match="dim must be an int"):
    truncate(x, 2.0)


def test_l2_normalize_gradient_is_finite_at_zero():
  g = jax.grad(lambda v: jnp.sum(l2_normalize(v)))(jnp.zeros((1, 3)))
  assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize(
    "n_docs,k,block,dim,n_q",
    [(1000, 10, 300, 8, 7),      # last block partial
     (257, 100, 64, 16, 3),      # k > block size
     (50, 50, 16, 32, 5),        # k = corpus size
     (100, 5, 1000, 32, 1)],     # one query, block larger than corpus
)
def test_exact_search_matches_brute_force(n_docs, k, block, dim, n_q):
  rng = np.random.default_rng(n_docs)
  corpus = rng.normal(size=(n_docs, 32)).astype(np.float32)
  queries = rng.normal(size=(n_q, 32)).astype(np.float32)
  scores, idx = exact_search(queries, corpus, k, dim=dim, block_size=block, query_batch=4)
  assert scores.shape == idx.shape == (n_q, k)
  _assert_same_topk(scores, idx, *_brute(queries, corpus, k, dim))


def test_exact_search_ties_go_to_lower_index():
  corpus = np.tile(np.array([[1.0, 0.0], [0.0, 1.0]], np.float32), (10, 1))  # rows 0,2,4.. equal
  _, idx = exact_search(np.array([[1.0, 0.0]], np.float32), corpus, 4, block_size=3)
  np.testing.assert_array_equal(idx[0], [0, 2, 4, 6])


def test_exact_search_float16_storage():
  rng = np.random.default_rng(1)
  corpus = rng.normal(size=(300, 16)).astype(np.float16)
  queries = rng.normal(size=(4, 16)).astype(np.float32)
  scores, idx = exact_search(queries, corpus, 10, block_size=128)
  ref_s, ref_i = _brute(queries.astype(np.float16).astype(np.float32), corpus.astype(np.float32), 10, 16)
  _assert_same_topk(scores, idx, ref_s, ref_i, atol=3e-3)


def test_exact_search_errors():
  c = np.ones((5, 4), np.float32)
  with pytest.raises(ValueError, match=r"k must be an int in \[1, 5\]"):
    exact_search(c, c, 6)
  with pytest.raises(ValueError, match=r"k must be an int in \[1, 5\]"):
    exact_search(c, c, 0)
  with pytest.raises(ValueError, match="queries have d=3 but corpus has d=4"):
    exact_search(np.ones((2, 3), np.float32), c, 1)
