"""Blocked exact top-k and re-ranking over any score: the kernels every search runs.

A `Scorer` says how one precision scores queries against documents: float
inner products (`float_scorer`, cosine with inverse prefix norms) here, int8
and Hamming scores in adaptor/quant.py. `top_k_scan` finds each query's exact
top k over the whole corpus, walking it in fixed-size blocks so that memory is
bounded by the block and query-batch sizes, not the corpus size; `rerank`
re-scores a shortlist. Both are pure functions of arrays, and ties always go
to the lower corpus index. `run_batches` runs a search step over fixed-size
query batches (one compiled program), one thread per CPU, and
`default_sizes` picks the block and batch sizes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from adaptor.checks import check_k, check_positive

# Within a block, scores are cut into contiguous groups of this many documents.
# Only the k groups with the best maxima can hold the block's top k, so
# lax.top_k runs over block/GROUP group maxima plus k * GROUP candidates
# instead of the whole block: the maxima are one vectorised pass, while
# lax.top_k on CPU is a per-row partial sort several times slower per element.
GROUP = 32
# Gathered float rows per chunk of queries (re-ranking, group members) are kept
# under 4 MiB: rows that stay in cache are scored 2-3x faster than a 64 MiB
# chunk (measured on CPU).
FLOAT_GATHER_BYTES = 4 * 2**20


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
    dims (see quant.MAX_BLOCK for their blocks);
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



# ---------------------------------------------------------------- scorers


@dataclasses.dataclass(frozen=True)
class Scorer:
  """How one precision scores queries against documents, for `top_k_scan` and `rerank`.

  Higher scores are better. The documents are a tuple of arrays with a
  leading axis n_docs (entries may be None, e.g. no per-document scale);
  the queries come in two forms, one for blocks and one for single queries.

  Attributes:
    block: fn(block_q, docs, doc_major) -> float32 scores of a block of
      documents (each array of `docs` sliced to the block's rows) against every
      query, with shape [b, n_q] if doc_major else [n_q, b].
    rows: fn(q, rows) -> float32 scores [...] of one query (`row_q` without
      its leading axis) against gathered rows (each array of `docs` indexed
      to shape [..., cols] or [...]).
    cols: for each array of `docs`, the leading columns that are read (None:
      all, or a 1-D array).
    doc_major: the layout of the group-maxima pass (see `top_k_scan`).
    group_maxima: always select through whole-corpus group maxima; otherwise
      only when k is too large for groups within a block.
    gather_bytes: gathered rows per chunk of queries are kept under this many
      bytes, counting each gathered value as at least 32 bits (it is widened
      to 32 bits to be scored).
  """

  block: Callable
  rows: Callable
  cols: tuple
  doc_major: bool
  group_maxima: bool
  gather_bytes: int


def float_scorer(dim: int) -> Scorer:
  """Inner products of float query prefixes [n_q, dim] with documents (vectors [n, >= dim], scale [n] or None).

  The scale multiplies each document's score: inverse prefix norms give the
  cosine of re-normalised prefixes (see `truncation.prefix_inv_norms`).
  """

  def block(q, docs, doc_major):
    vectors, scale = docs
    x = vectors[:, :dim].astype(q.dtype)
    if doc_major:
      s = jnp.einsum("bd,qd->bq", x, q, preferred_element_type=jnp.float32)
      return s if scale is None else s * scale[:, None]
    s = jnp.einsum("qd,bd->qb", q, x, preferred_element_type=jnp.float32)
    return s if scale is None else s * scale[None, :]

  def rows(q, gathered):
    vectors, scale = gathered
    s = jnp.einsum("...d,d->...", vectors.astype(jnp.float32), q,
                   preferred_element_type=jnp.float32)
    return s if scale is None else s * scale

  # Measured on CPU: whole-corpus group maxima win for short prefixes (cheap
  # slab gathers), and up to 32 dims scores laid out [documents, queries]
  # (maxima reduce along the first axis) scan 1.05-1.11x faster than
  # [queries, documents] with one CPU and with two (1M docs, 500 kept); at
  # 64 dims it is no faster.
  return Scorer(block=block, rows=rows, cols=(dim, None), doc_major=dim <= 32,
                group_maxima=dim <= 32, gather_bytes=FLOAT_GATHER_BYTES)


# ---------------------------------------------------------------- exact top-k


def top_k_scan(scorer: Scorer, block_q, row_q, docs, k: int, *, block_size: int):
  """Exact top-k of a `Scorer`'s scores, walking the corpus in fixed-size blocks.

  A pure function of arrays: call it as it is or under `jax.jit` (with `k`
  and `block_size` static). Two strategies give the same results:
  - group maxima: one blocked pass keeps only the maximum of each run of GROUP
    consecutive documents; the k groups with the best maxima hold the top k,
    so their k * GROUP members are gathered and re-scored (no k-wide selection
    in every block, which dominates when k is in the hundreds or thousands);
  - a running top-k merged block by block, each block's top k found through
    its own group maxima (small k, long prefixes).

  Args:
    scorer: how queries and documents are scored.
    block_q: the queries as `scorer.block` takes them (any pytree).
    row_q: the queries as `scorer.rows` takes them, arrays with leading axis n_q.
    docs: tuple of document arrays (or None) with leading axis n_docs.
    k: results per query, in [1, n_docs].
    block_size: documents scored at a time, in [1, n_docs]; bounds memory.

  Returns:
    (scores, indices), [n_q, k] each, best first; ties go to the lower corpus index.
  """
  leaves = [a for a in docs if a is not None]
  n_docs = leaves[0].shape[0]
  check_k(k, n_docs)
  if not 1 <= block_size <= n_docs:
    raise ValueError(f"block_size must be in [1, {n_docs}] (the corpus size), got {block_size}")
  if block_size % GROUP == 0 and (scorer.group_maxima or _group_size(block_size, k) < GROUP):
    return _group_maxima_top_k(scorer, block_q, row_q, docs, k, block_size=block_size)
  return _running_top_k(scorer, block_q, row_q, docs, k, block_size=block_size)


def _rows_of(docs, start, size):
  return tuple(None if a is None else jax.lax.dynamic_slice_in_dim(a, start, size) for a in docs)


def _running_top_k(scorer, block_q, row_q, docs, k, *, block_size):
  n_docs = next(a for a in docs if a is not None).shape[0]
  n_q = jax.tree_util.tree_leaves(row_q)[0].shape[0]
  n_full = n_docs // block_size

  def step(carry, start):
    block = _block_top_k(scorer, block_q, _rows_of(docs, start, block_size), start, k=k,
                         masked_below=None)
    return merge_top_k(*carry, *block, k), None

  init = (jnp.full((n_q, k), -jnp.inf, jnp.float32), jnp.full((n_q, k), -1, jnp.int32))
  carry, _ = jax.lax.scan(step, init, jnp.arange(n_full, dtype=jnp.int32) * block_size)
  if n_full * block_size < n_docs:
    # The last block ends at the last row and overlaps the one before it; the
    # overlap is masked. Padding the corpus instead would copy all of it.
    start = n_docs - block_size
    block = _block_top_k(scorer, block_q, tuple(None if a is None else a[start:] for a in docs),
                         jnp.int32(start), k=k, masked_below=n_full * block_size)
    carry = merge_top_k(*carry, *block, k)
  return carry


def _block_top_k(scorer, block_q, block, start, *, k, masked_below):
  """Top-min(k, block) of one block; returns (scores, corpus indices), best first."""
  s = scorer.block(block_q, block, False)   # [n_q, size]
  n_q, size = s.shape
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


def _group_maxima_top_k(scorer, block_q, row_q, docs, k, *, block_size):
  """Exact top-k through whole-corpus group maxima (see `top_k_scan`)."""
  n_docs = next(a for a in docs if a is not None).shape[0]
  n_q = jax.tree_util.tree_leaves(row_q)[0].shape[0]
  group, doc_major = GROUP, scorer.doc_major
  n_full = n_docs // block_size

  def maxima(block):
    s = scorer.block(block_q, block, doc_major)
    if doc_major:
      pad = -s.shape[0] % group
      if pad:  # Only the corpus tail: its last group is short.
        s = jnp.pad(s, ((0, pad), (0, 0)), constant_values=-jnp.inf)
      return s.reshape(-1, group, n_q).max(axis=1)
    pad = -s.shape[1] % group
    if pad:
      s = jnp.pad(s, ((0, 0), (0, pad)), constant_values=-jnp.inf)
    return s.reshape(n_q, -1, group).max(axis=-1)

  def step(_, start):
    return None, maxima(_rows_of(docs, start, block_size))

  _, per_block = jax.lax.scan(step, None, jnp.arange(n_full, dtype=jnp.int32) * block_size)
  if doc_major:
    parts = [jnp.transpose(per_block, (2, 0, 1)).reshape(n_q, -1)]
  else:
    parts = [jnp.transpose(per_block, (1, 0, 2)).reshape(n_q, -1)]
  tail = n_full * block_size
  if tail < n_docs:
    m = maxima(tuple(None if a is None else a[tail:] for a in docs))
    parts.append(m.T if doc_major else m)
  group_max = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
  g, bound = best_groups(group_max, k)

  def slabs(a, starts, cols):
    """[n_groups_kept, group, cols] (or [n_groups_kept, group]) contiguous slabs of `a`."""
    size = (group,) + ((cols or a.shape[1],) if a.ndim == 2 else ())
    return jax.vmap(lambda st: jax.lax.dynamic_slice(a, (st,) + (0,) * (a.ndim - 1), size))(starts)

  def one_query(xs):  # lax.map vmaps this over chunks of queries.
    q, gq, t = xs
    # Each group is one contiguous slab. The short last group's slab is
    # shifted back to end at the last row; rows it borrows from the group
    # before are masked, so no row is counted twice.
    starts = jnp.minimum(gq * group, n_docs - group)
    gathered = tuple(None if a is None else slabs(a, starts, c) for a, c in zip(docs, scorer.cols))
    return top_members(scorer.rows(q, gathered), starts, gq, t, k, group)

  per_row = _row_bytes(docs, scorer.cols)
  chunk = max(1, min(n_q, scorer.gather_bytes // max(1, g.shape[1] * group * per_row)))
  return jax.lax.map(one_query, (row_q, g, bound), batch_size=chunk)


def _row_bytes(docs, cols) -> int:
  """Bytes one gathered row takes once scored: each value widened to at least 32 bits."""
  out = 0
  for a, c in zip(docs, cols):
    if a is not None:
      width = 1 if a.ndim == 1 else (c or int(np.prod(a.shape[1:])))
      out += width * max(4, a.dtype.itemsize)
  return out


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


# ---------------------------------------------------------------- re-ranking


def rerank(scorer: Scorer, queries, docs, candidates, keep: int, *, presorted: bool = False):
  """Re-scores each query's candidate documents and keeps the best `keep`.

  A pure function of arrays (jit-compatible with `keep` static). The
  shortlist is gathered with indexed reads, a chunk of queries at a time, so
  memory stays bounded for any number of queries.

  Args:
    scorer: how queries and documents are scored.
    queries: the queries as `scorer.rows` takes them, arrays with leading axis n_q.
    docs: tuple of document arrays (or None) with leading axis n_docs.
    candidates: int corpus rows, with shape [n_q, n_candidates]; rows >=
      n_docs are padding and never returned (unless keep exceeds the real
      candidates).
    keep: how many to keep, in [1, n_candidates].
    presorted: the candidates are already in ascending order.

  Returns:
    (scores, indices), each with shape [n_q, keep], best first; ties go to
    the lower corpus index.
  """
  n_docs = next(a for a in docs if a is not None).shape[0]
  n_q, n_cand = candidates.shape
  if not presorted:  # Ascending order makes lax.top_k settle ties by lower index.
    candidates = jnp.sort(candidates, axis=1)

  def gather(a, rows, cols):
    return a[rows] if a.ndim == 1 else a[rows, :cols or a.shape[1]]

  def one_query(xs):  # lax.map vmaps this over chunks of queries.
    q, cand = xs
    valid = cand < n_docs
    cand = jnp.where(valid, cand, n_docs - 1)
    rows = tuple(None if a is None else gather(a, cand, c) for a, c in zip(docs, scorer.cols))
    s = jnp.where(valid, scorer.rows(q, rows), -jnp.inf)
    top, pos = jax.lax.top_k(s, keep)
    return top, cand[pos]

  chunk = max(1, min(n_q, scorer.gather_bytes // max(1, n_cand * _row_bytes(docs, scorer.cols))))
  return jax.lax.map(one_query, (queries, candidates), batch_size=chunk)


# ---------------------------------------------------------------- query batches


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



def to_device(corpus) -> jax.Array:
  """A corpus as a jax array (float32 or float16); an aligned numpy array is not copied on CPU."""
  if isinstance(corpus, jax.Array):
    return corpus
  corpus = np.asarray(corpus)
  if corpus.dtype not in (np.float32, np.float16):
    corpus = corpus.astype(np.float32)
  return jax.device_put(corpus)
