"""Truncation and exact top-k search over Matryoshka prefixes.

Everything that shortens a vector goes through `truncate`, so that a prefix is
always sliced and re-normalised the same way in losses, evaluation and search.
Search walks the corpus in fixed-size blocks with a running top-k merge, so
device memory is bounded by the block size, not by the corpus size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Norms below this are treated as zero: such a vector is returned as all zeros
# instead of being blown up to unit length from numerical noise.
_NORM_EPS = 1e-12


def check_dim(dim, full: int, *, name: str = "dim") -> int:
  """Validates a prefix length against the full vector size and returns it as int."""
  if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {type(dim).__name__} ({dim!r})")
  if not 1 <= int(dim) <= full:
    raise ValueError(f"{name} must be in [1, {full}] (the vector size), got {dim}")
  return int(dim)


def l2_normalize(x: jax.Array) -> jax.Array:
  """Scales each row of `x` to unit L2 norm; all-zero rows stay zero.

  Args:
    x: vectors, with shape [..., d].
  """
  sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
  nonzero = sq > _NORM_EPS**2
  # The double `where` keeps the gradient finite at zero vectors.
  inv = jnp.where(nonzero, jax.lax.rsqrt(jnp.where(nonzero, sq, 1.0)), 0.0)
  return (x * inv).astype(x.dtype)


def truncate(x: jax.Array, dim: int | None = None) -> jax.Array:
  """Keeps the first `dim` coordinates of each vector and re-normalises them.

  Args:
    x: embeddings, with shape [..., d].
    dim: prefix length in [1, d]; None keeps all d coordinates.

  Returns:
    Array of shape [..., dim] whose rows have unit norm (or are zero where the
    prefix is all zeros).
  """
  if x.ndim < 1:
    raise ValueError(f"x must have at least 1 axis [..., d], got shape {x.shape}")
  full = x.shape[-1]
  dim = full if dim is None else check_dim(dim, full)
  return l2_normalize(x[..., :dim])


def _merge_top_k(scores, indices, block_scores, block_indices, k):
  # Earlier (lower-index) candidates come first, and lax.top_k keeps the
  # earlier of equal values, so ties always go to the lower corpus index.
  all_scores = jnp.concatenate([scores, block_scores], axis=1)
  all_indices = jnp.concatenate([indices, block_indices], axis=1)
  top_scores, pos = jax.lax.top_k(all_scores, k)
  return top_scores, jnp.take_along_axis(all_indices, pos, axis=1)


@functools.partial(jax.jit, static_argnames=("k", "block_size"))
def _blocked_top_k(queries, corpus_blocks, n_valid, *, k, block_size):
  """Top-k inner products of `queries` against a corpus in [n_blocks, block, d]."""
  n_q = queries.shape[0]
  init = (
      jnp.full((n_q, k), -jnp.inf, jnp.float32),
      jnp.full((n_q, k), -1, jnp.int32),
  )

  def step(carry, xs):
    block, start = xs
    s = jnp.einsum("qd,bd->qb", queries, block, preferred_element_type=jnp.float32)
    idx = start + jnp.arange(block_size, dtype=jnp.int32)
    s = jnp.where(idx[None, :] < n_valid, s, -jnp.inf)
    kb = min(k, block_size)
    bs, bp = jax.lax.top_k(s, kb)
    return _merge_top_k(*carry, bs, idx[bp], k), None

  starts = jnp.arange(corpus_blocks.shape[0], dtype=jnp.int32) * block_size
  (scores, indices), _ = jax.lax.scan(step, init, (corpus_blocks, starts))
  return scores, indices


def exact_search(
    queries,
    corpus,
    k: int,
    *,
    dim: int | None = None,
    block_size: int = 16384,
    query_batch: int = 1024,
    normalize: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k by inner product at a prefix, walking the corpus in blocks.

  Args:
    queries: query vectors, with shape [n_queries, d].
    corpus: document vectors, with shape [n_docs, d] (float32 or float16).
    k: number of results per query, in [1, n_docs].
    dim: prefix length used for scoring; None means all d coordinates.
    block_size: corpus rows scored at a time; bounds memory.
    query_batch: queries scored at a time; the last batch is padded so that
      every call reuses one compiled program.
    normalize: re-normalise each prefix (cosine); False scores raw prefixes.

  Returns:
    (scores, indices), each with shape [n_queries, k], best first; ties go to
    the lower corpus index.
  """
  queries = jnp.asarray(queries)
  corpus = jnp.asarray(corpus)
  if queries.ndim != 2 or corpus.ndim != 2:
    raise ValueError(
        f"queries and corpus must be 2-D [n, d], got shapes {queries.shape} and {corpus.shape}")
  if queries.shape[1] != corpus.shape[1]:
    raise ValueError(
        f"queries have d={queries.shape[1]} but corpus has d={corpus.shape[1]}")
  n_docs, full = corpus.shape
  if n_docs == 0 or queries.shape[0] == 0:
    raise ValueError(f"empty input: queries {queries.shape}, corpus {corpus.shape}")
  dim = full if dim is None else check_dim(dim, full)
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_docs:
    raise ValueError(f"k must be an int in [1, {n_docs}] (the corpus size), got {k!r}")
  k = int(k)

  prep = truncate if normalize else (lambda x, d: x[:, :d])
  corpus = prep(corpus, dim)
  block_size = int(min(block_size, n_docs))
  n_blocks = -(-n_docs // block_size)
  pad = n_blocks * block_size - n_docs
  blocks = jnp.pad(corpus, ((0, pad), (0, 0))).reshape(n_blocks, block_size, dim)

  n_q = queries.shape[0]
  query_batch = int(min(query_batch, n_q))
  out_s, out_i = [], []
  for start in range(0, n_q, query_batch):
    q = prep(queries[start:start + query_batch], dim).astype(corpus.dtype)
    n = q.shape[0]
    if n < query_batch:
      q = jnp.pad(q, ((0, query_batch - n), (0, 0)))
    s, i = _blocked_top_k(q, blocks, n_docs, k=k, block_size=block_size)
    out_s.append(np.asarray(s[:n]))
    out_i.append(np.asarray(i[:n]))
  return np.concatenate(out_s), np.concatenate(out_i)
