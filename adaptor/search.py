"""Truncation, exact top-k search and funnel search over Matryoshka prefixes.

Everything that shortens a vector goes through `truncate`, so that a prefix is
always sliced and re-normalised the same way in losses, evaluation and search.

Search keeps the corpus once, at full size, and reads only the first `dim`
columns of each block it scores. Cosine scores at a prefix are the raw prefix
inner products times the inverse prefix norm of each document, which
`prefix_inv_norms` computes once per corpus and prefix (an index caches them),
so no truncated, re-normalised copy of the corpus is ever made.

The corpus is walked in fixed-size blocks with a running top-k merge, so the
memory a search needs is bounded by the block and query-batch sizes, not by
the corpus size. Ties always go to the lower corpus index.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import os
import threading
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Norms below this are treated as zero: such a vector is returned as all zeros
# instead of being blown up to unit length from numerical noise.
NORM_EPS = 1e-12
# Within a block, scores are cut into contiguous groups of this many documents.
# Only the k groups with the best maxima can hold the block's top k, so
# lax.top_k runs over block/GROUP group maxima plus k * GROUP candidates
# instead of the whole block: the maxima are one vectorised pass, while
# lax.top_k on CPU is a per-row partial sort several times slower per element.
GROUP = 32
# Re-ranking gathers [queries, candidates, dim] vectors; query chunks are sized
# so that one chunk holds at most this many floats (4 MiB): gathered rows that
# stay in cache are scored 2-3x faster than a 64 MiB chunk (measured on CPU).
RERANK_FLOATS = 2**20


def default_sizes(dim: int, n_docs: int, n_queries: int, *, block_size: int | None = None,
                  query_batch: int | None = None, contiguous: bool = False,
                  k: int | None = None, quantised: bool = False) -> tuple[int, int]:
  """(block_size, query_batch) for scoring `dim`-prefixes; given values are kept.

  Measured on a 2-core x86 CPU (AMD EPYC), 1M x 768 corpus, 1000 queries.
  XLA spreads a matmul over every CPU the process may use and runs the rest
  of a search on one, so the best tiles depend on whether the process has
  one CPU (pinned: a single-threaded run, or a search worker, see
  adaptor/pool.py) or several:
  - up to 256 dims of the full-size rows, a score tile must stay in the L2
    cache (1024 documents x 256 queries = 1 MiB), which makes 16- and 64-dim
    search 2-3x faster than 16384-document blocks; from 65 to 256 dims, with
    several CPUs, 512 queries per block are 1.0-1.15x faster than 256 (on one
    CPU 256 is 1.05x faster);
  - beyond 256 dims the matmul dominates, and 1024 queries per corpus pass
    halve how often each 4096-document block is read (1.05-1.4x faster);
  - a `contiguous` store of only the prefix (`normalized_prefix`) of up to 64
    dims, with more than 32 results kept, is read fastest in 4096 x 1024 tiles
    with several CPUs (1.15-1.2x faster than 1024 x 256) and in 1024 x 512
    tiles on one (1.1-1.15x faster than 4096 x 1024); with k <= 32 each block
    keeps its own top k, which is 1.5x slower in the larger tiles;
  - `quantised` (int8 or binary) first stages keep 256 queries up to 256
    dims (see quant._MAX_BLOCK for their blocks);
  - with several CPUs, a batch holds at most ceil(n_queries / CPUs) queries
    (rounded up to 8), so that `run_batches` gives each CPU a batch of its
    own (1.14-1.4x faster than one batch at a time, see `query_threads`).
  On a GPU or TPU, where each block is a kernel launch and caches are not the
  limit, blocks of 65536 documents and 1024 queries are used at every dim.
  Both are clipped to the corpus and query counts.
  """
  accelerator = jax.default_backend() != "cpu"
  cpus = 0 if accelerator else len(available_cpus())
  one_cpu = cpus == 1
  first_stage = contiguous and dim <= 64 and (k is None or k > 32)
  if block_size is None:
    block_size = (65536 if accelerator else 4096 if dim > 256 or (first_stage and not one_cpu)
                  else 1024)
  if query_batch is None:
    if accelerator or dim > 256 or (first_stage and not one_cpu):
      query_batch = 1024
    elif first_stage or (dim > 64 and not quantised and not one_cpu):
      query_batch = 512
    else:
      query_batch = 256
    if cpus > 1:
      # At least one batch per CPU, so that `run_batches` keeps every CPU busy.
      per_cpu = -(-n_queries // cpus)
      query_batch = min(query_batch, -(-per_cpu // 8) * 8)
  block_size = min(check_positive(block_size, "block_size"), n_docs)
  query_batch = min(check_positive(query_batch, "query_batch"), n_queries)
  return block_size, query_batch


def available_cpus() -> list[int]:
  """The CPUs this process may run on (its affinity mask, where the OS has one), in order."""
  if hasattr(os, "sched_getaffinity"):
    return sorted(os.sched_getaffinity(0))
  return list(range(os.cpu_count() or 1))


def check_dim(dim, full: int, *, name: str = "dim") -> int:
  """Validates a prefix length against the full vector size and returns it as int."""
  if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {type(dim).__name__} ({dim!r})")
  if not 1 <= int(dim) <= full:
    raise ValueError(f"{name} must be in [1, {full}] (the vector size), got {dim}")
  return int(dim)


def check_k(k, n: int, *, name: str = "k", what: str = "the corpus size") -> int:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
    raise ValueError(f"{name} must be an int in [1, {n}] ({what}), got {k!r}")
  return int(k)


def check_positive(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return int(value)


def l2_normalize(x: jax.Array) -> jax.Array:
  """Scales each row of `x` to unit L2 norm; all-zero rows stay zero.

  Args:
    x: vectors, with shape [..., d].
  """
  sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
  nonzero = sq > NORM_EPS**2
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


def prefix_inv_norms(corpus, dim: int, *, block_size: int = 65536) -> np.ndarray:
  """Inverse L2 norms of the first `dim` coordinates of each row, in blocks.

  Scaling prefix inner products by these gives the cosine of re-normalised
  prefixes, exactly as `truncate` would, without a truncated copy of the corpus.

  Args:
    corpus: vectors, with shape [n, d] (float32 or float16; numpy or jax).
    dim: prefix length in [1, d].
    block_size: rows converted to float32 at a time; bounds the temporaries.

  Returns:
    np.ndarray float32 [n]; 0 where the prefix is all zeros.
  """
  if getattr(corpus, "ndim", None) != 2:
    raise ValueError(f"corpus must be 2-D [n, d], got shape {getattr(corpus, 'shape', None)}")
  dim = check_dim(dim, corpus.shape[1])
  block_size = check_positive(block_size, "block_size")
  host = np.asarray(corpus)  # A view, not a copy, for numpy and CPU jax arrays.
  out = np.empty(host.shape[0], np.float32)
  for start in range(0, host.shape[0], block_size):
    x = host[start:start + block_size, :dim].astype(np.float32)
    sq = np.einsum("ij,ij->i", x, x)
    nonzero = sq > NORM_EPS**2
    out[start:start + block_size] = np.where(nonzero, 1.0 / np.sqrt(np.where(nonzero, sq, 1.0)), 0.0)
  return out


def normalized_prefix(corpus, dim: int, *, inv_norms=None, block_size: int = 65536,
                      out=None) -> np.ndarray:
  """A contiguous float32 copy of the first `dim` columns, each row re-normalised.

  Funnel search reads it in its first stage instead of the strided prefix of
  the full-size rows (measured on CPU, 1M docs: 15-25% faster at 16-64 dims),
  at the cost of n * dim * 4 bytes; an index makes it once and keeps it.

  Args:
    corpus: vectors, with shape [n, d] (float32 or float16).
    dim: prefix length in [1, d].
    inv_norms: optional `prefix_inv_norms(corpus, dim)`, with shape [n].
    block_size: rows converted at a time; bounds the temporaries.
    out: optional float32 array [n, dim] to write into (e.g. shared memory).

  Returns:
    np.ndarray float32 [n, dim] (`out`, or a new one aligned so that
    `jax.device_put` does not copy it on CPU); rows whose prefix is all zeros
    stay zero.
  """
  if getattr(corpus, "ndim", None) != 2:
    raise ValueError(f"corpus must be 2-D [n, d], got shape {getattr(corpus, 'shape', None)}")
  dim = check_dim(dim, corpus.shape[1])
  inv = prefix_inv_norms(corpus, dim) if inv_norms is None else np.asarray(inv_norms, np.float32)
  if inv.shape != (corpus.shape[0],):
    raise ValueError(f"inv_norms must have shape ({corpus.shape[0]},), got {inv.shape}")
  host = np.asarray(corpus)
  if out is None:
    out = aligned_empty((host.shape[0], dim), np.float32)
  elif out.shape != (host.shape[0], dim) or out.dtype != np.float32:
    raise ValueError(f"out must be float32 of shape {(host.shape[0], dim)}, got {out.dtype} {out.shape}")
  for start in range(0, host.shape[0], block_size):
    stop = start + block_size
    np.multiply(host[start:stop, :dim], inv[start:stop, None], out=out[start:stop],
                dtype=np.float32)
  return out


_ALIGN = 4096


def aligned_empty(shape, dtype) -> np.ndarray:
  """An uninitialised array whose data starts on a 4 KiB boundary.

  jax.device_put aliases such a buffer on CPU instead of copying it, so an
  index holds one copy of its vectors and stores, not two.
  """
  nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
  raw = np.empty(nbytes + _ALIGN, np.uint8)
  offset = (-raw.ctypes.data) % _ALIGN
  return raw[offset:offset + nbytes].view(dtype).reshape(shape)


# ---------------------------------------------------------------- exact top-k


def merge_top_k(scores, indices, block_scores, block_indices, k):
  # Earlier (lower-index) candidates come first, and lax.top_k keeps the
  # earlier of equal values, so ties always go to the lower corpus index.
  all_scores = jnp.concatenate([scores, block_scores], axis=1)
  all_indices = jnp.concatenate([indices, block_indices], axis=1)
  top_scores, pos = jax.lax.top_k(all_scores, k)
  return top_scores, jnp.take_along_axis(all_indices, pos, axis=1)


def _group_size(size: int, k: int) -> int:
  """Largest power of two <= GROUP dividing `size` with k groups at most a quarter of it."""
  group = GROUP
  while group > 1 and (size % group or 4 * k * group > size):
    group //= 2
  return group


def _block_top_k(queries, block, scale, start, *, k, masked_below):
  """Top-min(k, block) of one block; returns (scores, corpus indices), best first."""
  n_q, dim = queries.shape
  size = block.shape[0]
  s = jnp.einsum("qd,bd->qb", queries, block[:, :dim].astype(queries.dtype),
                 preferred_element_type=jnp.float32)
  if scale is not None:
    s = s * scale[None, :]
  if masked_below is not None:  # Rows already scored by an earlier block.
    s = jnp.where(start + jnp.arange(size) < masked_below, -jnp.inf, s)
  group = _group_size(size, k)
  if group > 1:
    # Exact: the groups holding the top k all have a maximum >= the k-th best
    # score, so they are among the k best groups. Taking equal maxima by lower
    # group index, and candidates in ascending document order, keeps ties
    # going to the lower index.
    groups = s.reshape(n_q, size // group, group)
    _, g = jax.lax.top_k(groups.max(axis=-1), k)
    g = jnp.sort(g, axis=1)
    cand = jnp.take_along_axis(groups, g[:, :, None], axis=1).reshape(n_q, k * group)
    top, pos = jax.lax.top_k(cand, k)
    idx = jnp.take_along_axis(g, pos // group, axis=1) * group + pos % group
  else:
    top, idx = jax.lax.top_k(s, min(k, size))
  return top, start + idx.astype(jnp.int32)


def blocked_top_k(queries, corpus, k: int, *, block_size: int, scale=None):
  """Exact top-k inner products, walking the corpus in fixed-size blocks.

  A pure function of arrays: it may be called as it is or under `jax.jit`
  (with `k` and `block_size` static). Only the first `queries.shape[1]`
  columns of the corpus are read; the corpus itself is never copied.

  Args:
    queries: query vectors, with shape [n_queries, dim] (float32).
    corpus: document vectors, with shape [n_docs, d] with d >= dim (float32 or
      float16); only [:, :dim] is scored.
    k: results per query, in [1, n_docs].
    block_size: corpus rows scored at a time, in [1, n_docs]; bounds memory.
    scale: optional per-document factors, with shape [n_docs] (e.g. inverse
      prefix norms from `prefix_inv_norms`, for cosine scores).

  Returns:
    (scores, indices), each with shape [n_queries, k], best first; ties go to
    the lower corpus index.
  """
  n_docs = corpus.shape[0]
  n_q = queries.shape[0]
  check_k(k, n_docs)
  if not 1 <= block_size <= n_docs:
    raise ValueError(f"block_size must be in [1, {n_docs}] (the corpus size), got {block_size}")
  # Measured on CPU: whole-corpus group maxima win for short prefixes (cheap
  # slab gathers) and whenever k is too large for 32-wide groups in one block.
  if block_size % GROUP == 0 and (queries.shape[1] <= 32 or _group_size(block_size, k) < GROUP):
    return _group_maxima_top_k(queries, corpus, k, block_size=block_size, scale=scale)
  n_full = n_docs // block_size
  take = lambda x, start: jax.lax.dynamic_slice_in_dim(x, start, block_size)

  def step(carry, start):
    sc = None if scale is None else take(scale, start)
    block = _block_top_k(queries, take(corpus, start), sc, start, k=k, masked_below=None)
    return merge_top_k(*carry, *block, k), None

  init = (jnp.full((n_q, k), -jnp.inf, jnp.float32), jnp.full((n_q, k), -1, jnp.int32))
  starts = jnp.arange(n_full, dtype=jnp.int32) * block_size
  carry, _ = jax.lax.scan(step, init, starts)
  if n_full * block_size < n_docs:
    # The last block ends at the last row and overlaps the one before it; the
    # overlap is masked. Padding the corpus instead would copy all of it.
    start = n_docs - block_size
    sc = None if scale is None else scale[start:]
    block = _block_top_k(queries, corpus[start:], sc, jnp.int32(start), k=k,
                         masked_below=n_full * block_size)
    carry = merge_top_k(*carry, *block, k)
  return carry


def _group_maxima_top_k(queries, corpus, k, *, block_size, scale):
  """Exact top-k for large k: best groups over the whole corpus, then their members.

  One blocked pass keeps only the maximum of each run of GROUP consecutive
  documents; the k groups with the best maxima hold the top k (the argument
  of `_block_top_k`, over the whole corpus), so their k * GROUP members are
  gathered and re-scored. This avoids a k-wide selection in every block,
  which dominates the time when k is in the hundreds or thousands.
  """
  n_docs, n_q, group = corpus.shape[0], queries.shape[0], GROUP
  dim = queries.shape[1]
  n_full = n_docs // block_size

  # Up to 32 dims, scores laid out [documents, queries] (group maxima reduce
  # along the first axis) scan 1.05-1.11x faster than [queries, documents],
  # measured on CPU with one CPU and with two (1M docs, 500 kept); at 64
  # dims it is no faster.
  doc_major = dim <= 32

  def maxima(block, sc):
    if doc_major:
      s = jnp.einsum("bd,qd->bq", block[:, :dim].astype(queries.dtype), queries,
                     preferred_element_type=jnp.float32)
      if sc is not None:
        s = s * sc[:, None]
      pad = -s.shape[0] % group
      if pad:  # Only the corpus tail: its last group is short.
        s = jnp.pad(s, ((0, pad), (0, 0)), constant_values=-jnp.inf)
      return s.reshape(-1, group, n_q).max(axis=1)
    s = jnp.einsum("qd,bd->qb", queries, block[:, :dim].astype(queries.dtype),
                   preferred_element_type=jnp.float32)
    if sc is not None:
      s = s * sc[None, :]
    pad = -s.shape[1] % group
    if pad:  # Only the corpus tail: its last group is short.
      s = jnp.pad(s, ((0, 0), (0, pad)), constant_values=-jnp.inf)
    return s.reshape(n_q, -1, group).max(axis=-1)

  def step(_, start):
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, block_size)
    return None, maxima(take(corpus), None if scale is None else take(scale))

  _, per_block = jax.lax.scan(step, None, jnp.arange(n_full, dtype=jnp.int32) * block_size)
  if doc_major:
    parts = [jnp.transpose(per_block, (2, 0, 1)).reshape(n_q, -1)]
  else:
    parts = [jnp.transpose(per_block, (1, 0, 2)).reshape(n_q, -1)]
  tail = n_full * block_size
  if tail < n_docs:
    m = maxima(corpus[tail:], None if scale is None else scale[tail:])
    parts.append(m.T if doc_major else m)
  group_max = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
  g, bound = best_groups(group_max, k)

  def one_query(xs):  # lax.map vmaps this over chunks of queries.
    q, gq, t = xs
    # Each group is one contiguous [group, dim] slab. The short last group's
    # slab is shifted back to end at the last row; rows it borrows from the
    # group before are masked, so no row is counted twice.
    starts = jnp.minimum(gq * group, n_docs - group)
    slabs = jax.vmap(lambda st: jax.lax.dynamic_slice(corpus, (st, 0), (group, dim)))(starts)
    s = jnp.einsum("kgd,d->kg", slabs.astype(jnp.float32), q, preferred_element_type=jnp.float32)
    if scale is not None:
      s = s * jax.vmap(lambda st: jax.lax.dynamic_slice(scale, (st,), (group,)))(starts)
    return top_members(s, starts, gq, t, k, group)

  chunk = max(1, min(n_q, RERANK_FLOATS // max(1, g.shape[1] * group * dim)))
  return jax.lax.map(one_query, (queries, g, bound), batch_size=chunk)


# Members are re-scored apart from the blocked matmul that found their group's
# maximum, so a score may differ from it in the last bits: `best_groups`
# places its bound this far below the k-th best maximum (relative, and
# absolute near zero).
_BOUND_SLACK = 1e-4


def best_groups(group_max, k: int):
  """The k groups with the best maxima, ascending, and a bound below which no top-k member lies.

  Args:
    group_max: float32 [n_q, n_groups], each group's best score per query.
    k: the number of best members wanted (groups kept: min(k, n_groups)).

  Returns:
    (groups, bound): int32 [n_q, min(k, n_groups)] group indices in
    ascending order (equal maxima go to the lower index), and float32 [n_q]
    just below the k-th best maximum (-inf with fewer than k groups). The
    members of these groups hold at least k scores at or above that maximum,
    so members below the bound cannot be among the k best and may be masked
    before their top k. lax.top_k on CPU is a partial sort whose cost lies in
    pushing each element that beats its running k-th into a heap; masked
    members never do, and a 32:500 first stage over 1M documents runs 1.06x
    faster (measured side by side on one CPU).
  """
  n_q, n_groups = group_max.shape
  best, g = jax.lax.top_k(group_max, min(k, n_groups))
  g = jnp.sort(g, axis=1)
  if k > n_groups:   # Every group is kept, and fewer than k maxima bound nothing.
    return g, jnp.full((n_q,), -jnp.inf, jnp.float32)
  # The minimum of the values, not their last column: XLA turns a top-k of
  # which one column alone is used into a full sort, 10x slower.
  kth = best.min(axis=1)
  return g, kth - _BOUND_SLACK * (1 + jnp.abs(kth))


def top_members(scores, starts, groups, bound, k: int, group: int):
  """One query's top k among the members of its best groups: (scores [k], rows [k]).

  Args:
    scores: the members' scores, [n_groups_kept * group] or [n_groups_kept, group].
    starts: int [n_groups_kept], the first row of each scored slab: a group's
      own first row, or for the corpus's short last group a slab shifted back
      to end at the last row (the rows it borrows from the group before are
      masked, so no row is counted twice).
    groups: int [n_groups_kept], the groups (ascending, from `best_groups`).
    bound: this query's bound from `best_groups`; members below it are masked.
    k: results kept.
    group: documents per group.
  """
  rows = starts[:, None] + jnp.arange(group, dtype=starts.dtype)
  s = scores.reshape(rows.shape)
  s = jnp.where((rows >= groups[:, None] * group) & (s >= bound), s, -jnp.inf).reshape(-1)
  top, pos = jax.lax.top_k(s, k)
  return top, rows.reshape(-1)[pos]


@functools.partial(jax.jit, static_argnames=("k", "dim", "block_size", "normalize"))
def _search_batch(queries, corpus, scale, *, k, dim, block_size, normalize):
  q = queries[:, :dim].astype(jnp.float32)
  q = l2_normalize(q) if normalize else q
  return blocked_top_k(q, corpus, k, block_size=block_size, scale=scale)


def _as_corpus(corpus) -> jax.Array:
  if isinstance(corpus, jax.Array):
    return corpus
  corpus = np.asarray(corpus)
  if corpus.dtype not in (np.float32, np.float16):
    corpus = corpus.astype(np.float32)
  # device_put does not copy a suitably aligned numpy array on CPU.
  return jax.device_put(corpus)


def _check_pair(queries, corpus):
  if getattr(queries, "ndim", None) != 2 or getattr(corpus, "ndim", None) != 2:
    raise ValueError(
        f"queries and corpus must be 2-D [n, d], got shapes "
        f"{getattr(queries, 'shape', None)} and {getattr(corpus, 'shape', None)}")
  if queries.shape[1] != corpus.shape[1]:
    raise ValueError(
        f"queries have d={queries.shape[1]} but corpus has d={corpus.shape[1]}")
  if corpus.shape[0] == 0 or queries.shape[0] == 0:
    raise ValueError(f"empty input: queries {queries.shape}, corpus {corpus.shape}")


def query_threads(n_batches: int) -> int:
  """Threads that run a search's query batches at once: one per CPU, on a CPU backend.

  XLA's CPU runtime spreads a matmul over every CPU the process may use but
  runs the rest of a search (top-k selection, shortlist gathers) on the
  calling thread, and one process runs its jitted calls one after another
  however they are dispatched. Batches run from one thread per CPU overlap
  that serial part: a 32:500,128:50,768:10 funnel over 1M x 768 ran 1.3-1.4x
  faster on 2 CPUs (1000 queries as two batches, measured side by side).
  On an accelerator, or with one CPU, batches run one at a time.
  """
  if n_batches < 2 or jax.default_backend() != "cpu":
    return 1
  return min(n_batches, len(available_cpus()))


_EXECUTORS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_EXECUTORS_LOCK = threading.Lock()


def _executor(threads: int) -> concurrent.futures.ThreadPoolExecutor:
  with _EXECUTORS_LOCK:
    if threads not in _EXECUTORS:
      _EXECUTORS[threads] = concurrent.futures.ThreadPoolExecutor(
          threads, thread_name_prefix="matryoshka-search")
    return _EXECUTORS[threads]


def run_batches(step, queries, query_batch: int, k: int | None = None):
  """(scores, indices) of `step` over the fixed-size batches of `queries`, in order.

  Args:
    step: fn(batch [query_batch, d] float32 numpy) -> (scores, indices),
      arrays with query_batch rows.
    queries: [n_q, d] queries; the last batch is zero-padded (one compiled
      program for all batches) and its padding rows dropped.
    query_batch: queries per batch.
    k: columns kept of each result (default: all).

  Batches run on `query_threads` threads at once, at most that many in
  flight, so memory stays bounded by the batch size; the results are the
  same as one batch at a time.
  """
  n_batches = -(-queries.shape[0] // query_batch)
  threads = query_threads(n_batches)

  def one(item):
    q, n = item
    s, i = step(q)
    return np.asarray(s[:n, :k]), np.asarray(i[:n, :k])

  if threads == 1:
    parts = [one(item) for item in _query_batches(queries, query_batch)]
  else:
    pool, pending, parts = _executor(threads), collections.deque(), []
    try:
      for item in _query_batches(queries, query_batch):
        pending.append(pool.submit(one, item))
        if len(pending) >= threads:
          parts.append(pending.popleft().result())
      while pending:
        parts.append(pending.popleft().result())
    except BaseException:
      for f in pending:   # A failed batch (or an interrupt) fails the search: start no more.
        f.cancel()
      raise
  return np.concatenate([s for s, _ in parts]), np.concatenate([i for _, i in parts])


def _query_batches(queries, query_batch: int):
  """Yields (batch, n_real): fixed-size float32 batches, the last one zero-padded."""
  n_q = queries.shape[0]
  for start in range(0, n_q, query_batch):
    q = np.asarray(queries[start:start + query_batch], np.float32)
    n = q.shape[0]
    if n < query_batch:
      q = np.pad(q, ((0, query_batch - n), (0, 0)))
    yield q, n


def search(
    queries,
    corpus,
    k: int,
    *,
    dim: int | None = None,
    block_size: int | None = None,
    query_batch: int | None = None,
    normalize: bool = True,
    inv_norms=None,
) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k by cosine (or inner product) at a prefix, walking the corpus in blocks.

  Args:
    queries: query vectors, with shape [n_queries, d].
    corpus: document vectors, with shape [n_docs, d] (float32 or float16),
      kept at full size; only the first `dim` columns of each block are read.
    k: number of results per query, in [1, n_docs].
    dim: prefix length used for scoring; None means all d coordinates.
    block_size: corpus rows scored at a time; bounds memory (default: by dim,
      see `default_sizes`).
    query_batch: queries scored at a time; the last batch is padded so that
      every call reuses one compiled program (default: by dim).
    normalize: re-normalise each prefix (cosine); False scores raw prefixes.
    inv_norms: optional precomputed `prefix_inv_norms(corpus, dim)`, with
      shape [n_docs]; computed here (one pass over the corpus) when omitted.

  Returns:
    (scores, indices), each with shape [n_queries, k], best first; ties go to
    the lower corpus index.
  """
  _check_pair(queries, corpus)
  n_docs, full = corpus.shape
  dim = full if dim is None else check_dim(dim, full)
  k = check_k(k, n_docs)
  block_size, query_batch = default_sizes(dim, n_docs, queries.shape[0], block_size=block_size,
                                          query_batch=query_batch)
  scale = None
  if normalize:
    scale = prefix_inv_norms(corpus, dim) if inv_norms is None else inv_norms
    if tuple(np.shape(scale)) != (n_docs,):
      raise ValueError(f"inv_norms must have shape ({n_docs},), got {np.shape(scale)}")
    scale = jnp.asarray(scale, jnp.float32)
  corpus = _as_corpus(corpus)
  return run_batches(lambda q: _search_batch(q, corpus, scale, k=k, dim=dim,
                                             block_size=block_size, normalize=normalize),
                     queries, query_batch)


def exact_search(queries, corpus, k: int, *, dim: int | None = None,
                 block_size: int | None = None, query_batch: int | None = None,
                 normalize: bool = True,
                 inv_norms=None) -> tuple[np.ndarray, np.ndarray]:
  """The same as `search` (its earlier name, kept for callers)."""
  return search(queries, corpus, k, dim=dim, block_size=block_size, query_batch=query_batch,
                normalize=normalize, inv_norms=inv_norms)


# ---------------------------------------------------------------- funnel


def check_schedule(schedule, full: int, *, n_docs: int | None = None,
                   k: int | None = None) -> tuple[tuple[int, int], ...]:
  """Validates a funnel schedule and returns it as a tuple of (dim, keep) int pairs.

  A schedule [(m1, K1), (m2, K2), ...] first keeps the K1 best documents by
  the m1-dim prefix over the whole corpus, then re-ranks those with m2 dims and
  keeps K2, and so on: dims strictly increase and counts never increase.

  Args:
    schedule: sequence of (dim, keep) pairs, e.g. [(32, 1000), (128, 100), (768, 10)].
    full: the vector size d (dims must be in [1, d]).
    n_docs: if given, the first keep must be at most the corpus size.
    k: if given, the last keep must be at least k.
  """
  if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence) or not schedule:
    raise ValueError(f"schedule must be a non-empty sequence of (dim, keep) pairs, got {schedule!r}")
  stages = []
  for i, stage in enumerate(schedule):
    if isinstance(stage, (str, bytes)) or not isinstance(stage, Sequence) or len(stage) != 2:
      raise ValueError(f"schedule[{i}] must be a (dim, keep) pair, got {stage!r}")
    dim = check_dim(stage[0], full, name=f"schedule[{i}] dim")
    keep = check_positive(stage[1], f"schedule[{i}] keep")
    stages.append((dim, keep))
  dims = [m for m, _ in stages]
  keeps = [c for _, c in stages]
  if any(a >= b for a, b in zip(dims, dims[1:])):
    raise ValueError(f"schedule dims must strictly increase, got {dims}")
  if any(a < b for a, b in zip(keeps, keeps[1:])):
    raise ValueError(f"schedule keeps must not increase, got {keeps}")
  if n_docs is not None and keeps[0] > n_docs:
    raise ValueError(
        f"schedule[0] keep must be at most the corpus size {n_docs}, got {keeps[0]}")
  if k is not None and keeps[-1] < k:
    raise ValueError(f"schedule's last keep must be >= k={k}, got {keeps[-1]}")
  return tuple(stages)


def rerank(queries, corpus, candidates, keep: int, *, scale=None, presorted: bool = False):
  """Re-scores candidate documents with a longer prefix and keeps the best.

  A pure function of arrays (jit-compatible with `keep` static). The shortlist
  is gathered with indexed reads, a chunk of queries at a time, so memory
  stays bounded for any number of queries.

  Args:
    queries: query vectors, with shape [n_queries, dim] (already normalised).
    corpus: document vectors, with shape [n_docs, d], d >= dim.
    candidates: corpus indices, with shape [n_queries, n_candidates];
      indices >= n_docs are padding and never returned (unless keep exceeds
      the real candidates).
    keep: how many to keep, in [1, n_candidates].
    scale: optional inverse prefix norms, with shape [n_docs].
    presorted: the candidates are already in ascending order.

  Returns:
    (scores, indices), each with shape [n_queries, keep], best first; ties go
    to the lower corpus index.
  """
  n_q, dim = queries.shape
  n_docs = corpus.shape[0]
  n_cand = candidates.shape[1]
  if not presorted:  # Ascending order makes lax.top_k settle ties by lower index.
    candidates = jnp.sort(candidates, axis=1)

  def one_query(xs):  # lax.map vmaps this over chunks of queries.
    q, cand = xs
    valid = cand < n_docs
    cand = jnp.where(valid, cand, n_docs - 1)
    vecs = corpus[cand, :dim].astype(jnp.float32)            # [n_candidates, dim]
    s = jnp.dot(vecs, q, preferred_element_type=jnp.float32)
    if scale is not None:
      s = s * scale[cand]
    s = jnp.where(valid, s, -jnp.inf)
    top, pos = jax.lax.top_k(s, keep)
    return top, cand[pos]

  chunk = max(1, min(n_q, RERANK_FLOATS // max(1, n_cand * dim)))
  return jax.lax.map(one_query, (queries, candidates), batch_size=chunk)


@functools.partial(jax.jit, static_argnames=("schedule", "block_size"))
def _funnel_batch(queries, corpus, scales, first_stage, *, schedule, block_size):
  def prefix(m):
    return l2_normalize(queries[:, :m].astype(jnp.float32))

  m, keep = schedule[0]
  if first_stage is None:
    scores, idx = blocked_top_k(prefix(m), corpus, keep, block_size=block_size, scale=scales[0])
  else:  # Already normalised rows: no per-document scaling.
    scores, idx = blocked_top_k(prefix(m), first_stage, keep, block_size=block_size)
  for (m, keep), scale in zip(schedule[1:], scales[1:]):
    scores, idx = rerank(prefix(m), corpus, idx, keep, scale=scale)
  return scores, idx


def funnel_search(
    queries,
    corpus,
    schedule,
    *,
    k: int | None = None,
    inv_norms: dict | None = None,
    block_size: int | None = None,
    query_batch: int | None = None,
    first_stage=None,
) -> tuple[np.ndarray, np.ndarray]:
  """Adaptive retrieval: shortlist with a short prefix, re-rank with longer ones.

  As in the Matryoshka Representation Learning paper, the first stage is an
  exact blocked search over the whole corpus at the first (short) prefix; each
  later stage gathers the survivors and re-scores them with a longer,
  re-normalised prefix. Every stage is cosine at its own prefix.

  Args:
    queries: query vectors, with shape [n_queries, d].
    corpus: document vectors, with shape [n_docs, d] (float32 or float16).
    schedule: (dim, keep) pairs, e.g. [(32, 1000), (128, 100), (768, 10)];
      see `check_schedule`.
    k: results per query (default: the last stage's keep, which must be >= k).
    inv_norms: optional {dim: prefix_inv_norms(corpus, dim)} for the
      schedule's dims, each with shape [n_docs]; missing ones are computed.
    block_size: corpus rows scored at a time in the first stage (default:
      by the first stage's dim, see `default_sizes`).
    query_batch: queries processed at a time (default: by the first stage's dim).
    first_stage: optional `normalized_prefix(corpus, m1)` for the first
      stage's dim m1, with shape [n_docs, m1]: the first stage scans it
      instead of the full-size rows (faster; an index keeps one).

  Returns:
    (scores, indices), each with shape [n_queries, k], best first, scored at
    the last stage's prefix; ties go to the lower corpus index.
  """
  _check_pair(queries, corpus)
  n_docs, full = corpus.shape
  schedule = check_schedule(schedule, full, n_docs=n_docs, k=k)
  k = schedule[-1][1] if k is None else check_k(k, n_docs)
  block_size, query_batch = default_sizes(schedule[0][0], n_docs, queries.shape[0],
                                          block_size=block_size, query_batch=query_batch,
                                          contiguous=first_stage is not None,
                                          k=schedule[0][1])
  inv_norms = dict(inv_norms or {})
  scales = []
  for m, _ in schedule:
    scale = inv_norms[m] if m in inv_norms else prefix_inv_norms(corpus, m)
    if tuple(np.shape(scale)) != (n_docs,):
      raise ValueError(f"inv_norms[{m}] must have shape ({n_docs},), got {np.shape(scale)}")
    scales.append(jnp.asarray(scale, jnp.float32))
  if first_stage is not None:
    want = (n_docs, schedule[0][0])
    if tuple(np.shape(first_stage)) != want or first_stage.dtype != np.float32:
      raise ValueError(f"first_stage must be float32 with shape {want} (the first stage's "
                       f"normalised prefix), got {first_stage.dtype} {tuple(np.shape(first_stage))}")
    first_stage = _as_corpus(first_stage)
  corpus = _as_corpus(corpus)
  scales = tuple(scales)
  return run_batches(lambda q: _funnel_batch(q, corpus, scales, first_stage, schedule=schedule,
                                             block_size=block_size),
                     queries, query_batch, k)


# The funnel cost model: milliseconds per query on the CPU it was measured on
# (experiments/funnel_costs.py: 1M x 768 float32, 1000 queries, the process
# pinned to one CPU of a 2-core AMD EPYC, as a search worker is), fitted by
# least squares (the script prints the fit). Other machines scale it; the
# planner only ranks estimates and compares them with full-size exact search.
# Scanning, per million documents: base, per dim up to 256, per dim beyond
# (longer prefixes use larger, more efficient tiles; see default_sizes).
_SCAN_MS = (0.460, 0.0233, 0.0237)
# Selecting the first stage's keep, per thousand kept: base, per dim (top-k of
# group maxima, then re-scoring the members of the best groups).
_SELECT_MS = (0.738, 0.0326)
# Re-ranking, per thousand candidates: base (the gather), per dim; per thousand kept.
_RERANK_MS = (0.191, 0.00043, 0.115)


def first_stage_cost(n_docs: int, dim: int, keep: int) -> float:
  """Estimated ms per query of an exact top-`keep` over `n_docs` documents at `dim` dims."""
  base, short, long = _SCAN_MS
  scan = n_docs / 1e6 * (base + short * min(dim, 256) + long * max(dim - 256, 0))
  return scan + keep / 1000 * (_SELECT_MS[0] + _SELECT_MS[1] * dim)


def rerank_cost(n_candidates: int, dim: int, keep: int) -> float:
  """Estimated ms per query of re-scoring `n_candidates` gathered rows at `dim` dims."""
  base, per_dim, per_kept = _RERANK_MS
  return n_candidates / 1000 * (base + per_dim * dim) + keep / 1000 * per_kept


def schedule_cost(schedule, n_docs: int) -> float:
  """Estimated cost per query of a funnel schedule, in ms on the reference CPU.

  The first stage scans all `n_docs` documents at its prefix m1 and selects
  its K1 best (`first_stage_cost`); each later stage re-scores the previous
  stage's survivors (`rerank_cost`). Full-size exact search is the one-stage
  schedule [(d, k)]. The constants were measured with
  experiments/funnel_costs.py, which also prints how well they predict the
  machine it runs on.
  """
  (m, keep), rest = schedule[0], schedule[1:]
  cost = first_stage_cost(n_docs, m, keep)
  prev = keep
  for m, keep in rest:
    cost += rerank_cost(prev, m, keep)
    prev = keep
  return cost
