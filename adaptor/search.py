"""Search: exact top-k at any prefix and funnel search, at any precision, over one core.

    stages = check_schedule("32:500,128:50,768:10", d)        # or [(32, 500), (128, 50), (768, 10)]
    scores, rows = funnel_search(queries, corpus, stages, k=10)
    scores, rows = exact_search(queries, corpus, 10, dim=64)

A schedule is a tuple of `Stage`s (dim, keep, precision): the first stage
scans the whole corpus at its prefix and keeps its `keep` best documents;
each later stage re-scores the survivors with its own prefix (and precision)
and keeps fewer. Exact search is the one-stage schedule [(dim, k)]. Every
stage runs on the kernels of adaptor/topk.py (one blocked top-k scan, one
re-rank), with the scorer of its precision: float cosine at the prefix here,
int8 and binary in adaptor/quant.py. `SearchArrays` holds what a search
reads (vectors, prefix norms, quantised stores, first-stage copies) and runs
schedules over it; an index and its worker processes (adaptor/pool.py) both
search through it.

The cost model at the end estimates a schedule's time per query; the
recall-target planner (adaptor/plan.py) ranks schedules with it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adaptor import quant, topk
from adaptor.checks import check_dim, check_k, check_positive
from adaptor.data import InputError
from adaptor.truncation import aligned_empty, l2_normalize, normalized_prefix, prefix_inv_norms

# Float funnels whose first stage reads at most max(this, d / 8) dims scan a
# contiguous normalised copy of that prefix (see `SearchArrays.prefix`).
FIRST_STAGE_COPY_MIN = 32


# ---------------------------------------------------------------- schedules


class Stage(NamedTuple):
  """One funnel stage: score `dim`-prefixes at `precision`, keep the best `keep` documents."""

  dim: int
  keep: int
  precision: str = "float32"

  def __str__(self) -> str:
    return (f"{self.dim}:{self.keep}" if self.precision == "float32"
            else f"{self.dim}:{self.keep}:{self.precision}")


def parse_schedule(text: str) -> tuple[Stage, ...]:
  """"32:500,128:50,768:10" or "256:400:binary,768:10" -> Stages (not yet checked against a size).

  Raises:
    InputError: `text` is not DIM:KEEP[:PRECISION] stages separated by commas.
  """
  stages = []
  for part in (p.strip() for p in str(text).split(",")):
    fields = part.split(":")
    try:
      if not part or len(fields) not in (2, 3) or (len(fields) == 3 and fields[2] not in
                                                   quant.PRECISIONS):
        raise ValueError
      stages.append(Stage(int(fields[0]), int(fields[1]), *fields[2:]))
    except ValueError:
      raise InputError(
          f"expected DIM:KEEP[:PRECISION] stages separated by commas, precision one of "
          f"{list(quant.PRECISIONS)}, like 32:500,128:50,768:10 or 256:400:binary,768:10; "
          f"got {text!r}") from None
  return tuple(stages)


def format_schedule(schedule) -> str:
  """The text of a schedule, as `parse_schedule` reads it: "256:400:binary,768:10"."""
  return ",".join(str(Stage(*stage)) for stage in schedule)


def check_schedule(schedule, full: int, *, n_docs: int | None = None,
                   k: int | None = None) -> tuple[Stage, ...]:
  """Validates a funnel schedule and returns it as Stages.

  Each stage is (dim, keep) (float32) or (dim, keep, precision), precision
  one of "float32", "int8", "binary"; text is parsed first. Keeps never
  increase; a float32-only schedule's dims strictly increase, and no stage
  repeats the (dim, precision) of the one before it. Binary dims are
  multiples of 8.

  Args:
    schedule: e.g. "32:500,128:50,768:10", [(32, 1000), (128, 100), (768, 10)]
      or [(256, 400, "binary"), (256, 40, "int8"), (768, 10)].
    full: the vector size d (dims must be in [1, d]).
    n_docs: if given, the first keep must be at most the corpus size.
    k: if given, the last keep must be at least k.
  """
  if isinstance(schedule, str):
    schedule = parse_schedule(schedule)
  if isinstance(schedule, bytes) or not isinstance(schedule, Sequence) or not schedule:
    raise ValueError(f"schedule must be a non-empty sequence of (dim, keep[, precision]) "
                     f"stages, got {schedule!r}")
  stages = []
  for i, stage in enumerate(schedule):
    if (isinstance(stage, (str, bytes)) or not isinstance(stage, Sequence)
        or len(stage) not in (2, 3)):
      raise ValueError(f"schedule[{i}] must be (dim, keep) or (dim, keep, precision), got {stage!r}")
    precision = "float32" if len(stage) == 2 else quant.check_precision(
        stage[2], name=f"schedule[{i}] precision")
    dim = quant.check_store_dims(precision, stage[0], full, name=f"schedule[{i}] dim")
    keep = check_positive(stage[1], f"schedule[{i}] keep")
    stages.append(Stage(dim, keep, precision))
  dims = [st.dim for st in stages]
  keeps = [st.keep for st in stages]
  if all(st.precision == "float32" for st in stages):
    if any(a >= b for a, b in zip(dims, dims[1:])):
      raise ValueError(f"schedule dims must strictly increase, got {dims}")
  if any(a < b for a, b in zip(keeps, keeps[1:])):
    raise ValueError(f"schedule keeps must not increase, got {keeps}")
  for i in range(1, len(stages)):
    if stages[i][::2] == stages[i - 1][::2]:
      raise ValueError(f"schedule[{i}] repeats the dim and precision of schedule[{i - 1}] "
                       f"({stages[i].dim}, {stages[i].precision})")
  if n_docs is not None and keeps[0] > n_docs:
    raise ValueError(f"schedule[0] keep must be at most the corpus size {n_docs}, got {keeps[0]}")
  if k is not None and keeps[-1] < k:
    raise ValueError(f"schedule's last keep must be >= k={k}, got {keeps[-1]}")
  return tuple(stages)


# ---------------------------------------------------------------- stages


@functools.partial(jax.jit, static_argnames=("precision", "dim", "keep", "block_size", "normalize"))
def first_stage(queries, data, *, precision: str, dim: int, keep: int, block_size: int,
                normalize: bool = True):
  """A funnel's first stage (or an exact search): top-`keep` over the whole corpus.

  Args:
    queries: adapted queries, with shape [n_q, d] (float32).
    data: the stage's arrays, from `SearchArrays.stage_data`: float32 ->
      (vectors [n, >= dim], inv_norms [n] or None); int8 -> (codes [n, m],
      offsets [m], scales [m], inv_norms [n] or None); binary -> (bits [n, m / 8],).
    precision: "float32", "int8" or "binary".
    dim: the prefix scored.
    keep: results per query.
    block_size: documents scored at a time.
    normalize: float32 only: re-normalise the query prefixes (cosine); False
      scores them as they are.

  Returns:
    (scores, rows) [n_q, keep], best first: cosine (float32, int8) or
    1 - 2 h / dim (binary); ties go to the lower row.
  """
  if precision == "float32":
    vectors, scale = data
    q = queries[:, :dim].astype(jnp.float32)
    q = l2_normalize(q) if normalize else q
    return topk.top_k_scan(topk.float_scorer(dim), q, q, (vectors, scale), keep,
                           block_size=block_size)
  if precision == "int8":
    codes, offsets, scales, inv = data
    q = quant.int8_queries(queries, offsets, scales, dim, quantise=True)
    return topk.top_k_scan(quant.int8_scorer(dim), q, q, (codes, inv), keep,
                           block_size=block_size)
  (bits,) = data
  h, rows = quant.hamming_top_k(quant.pack_bits(queries[:, :dim]), bits, keep,
                                block_size=block_size)
  return 1.0 - 2.0 * h.astype(jnp.float32) / dim, rows


@functools.partial(jax.jit, static_argnames=("precision", "dim", "keep"))
def rerank_stage(queries, data, candidates, *, precision: str, dim: int, keep: int):
  """A later funnel stage: re-scores each query's candidates and keeps the best `keep`.

  int8 re-scoring is float query x int8 documents (see adaptor/quant.py).

  Args:
    queries: adapted queries, with shape [n_q, d] (float32).
    data: the stage's arrays, as for `first_stage`.
    candidates: int32 [n_q, c] corpus rows (rows >= n are padding).
    precision, dim, keep: the stage.

  Returns:
    (scores, rows) [n_q, keep], best first; ties go to the lower row.
  """
  if precision == "float32":
    vectors, scale = data
    q = l2_normalize(queries[:, :dim].astype(jnp.float32))
    return topk.rerank(topk.float_scorer(dim), q, (vectors, scale), candidates, keep)
  if precision == "int8":
    codes, offsets, scales, inv = data
    q = quant.int8_queries(queries, offsets, scales, dim, quantise=False)
    return topk.rerank(quant.int8_scorer(dim), q, (codes, inv), candidates, keep)
  (bits,) = data
  s, rows = topk.rerank(quant.binary_scorer(dim // 8), quant.pack_bits(queries[:, :dim]),
                        (bits,), candidates, keep)
  return 1.0 + 2.0 * s / dim, rows


# ---------------------------------------------------------------- arrays


class SearchArrays:
  """What a search reads: full-size vectors, prefix norms, quantised stores, first-stage copies.

  Host arrays, keyed for sharing with worker processes as ("vectors",),
  ("norms", m), ("prefix", m) and ("store", precision, dims, name); their
  device copies are made on first use and kept. Prefix norms and first-stage
  copies missing at search time are computed once and kept.

  Attributes:
    vectors: [n, d] unit-norm rows (float32 or float16).
    inv_norms: {m: float32 [n]} inverse norms of the m-prefixes.
    stores: {(precision, dims): quant.BinaryStore | quant.Int8Store}.
    prefixes: {m: float32 [n, m]} normalised contiguous m-prefixes.
    alloc: fn(shape, dtype) -> array, where new first-stage copies are made
      (shared memory while worker processes run).
  """

  def __init__(self, vectors, *, inv_norms=None, stores=None, prefixes=None):
    self.vectors = vectors
    self.inv_norms = dict(inv_norms or {})
    self.stores = dict(stores or {})
    self.prefixes = dict(prefixes or {})
    self.alloc = aligned_empty
    self._device = {}

  @property
  def n(self) -> int:
    return self.vectors.shape[0]

  @property
  def d(self) -> int:
    return self.vectors.shape[1]

  def norms(self, dim: int) -> np.ndarray:
    """Inverse norms [n] of the `dim`-prefixes, computed once and kept."""
    dim = check_dim(dim, self.d)
    if dim not in self.inv_norms:
      self.inv_norms[dim] = prefix_inv_norms(self.vectors, dim)
    return self.inv_norms[dim]

  def prefix(self, dim: int) -> np.ndarray | None:
    """The normalised contiguous `dim`-prefix a float funnel's first stage scans.

    Made on first use and kept (n * dim float32s), for prefixes up to
    max(32, d / 8) dims; None for longer ones, whose first stage reads the
    full-size rows (a copy would cost more memory than it saves time).
    """
    if dim in self.prefixes:
      return self.prefixes[dim]
    if dim > max(FIRST_STAGE_COPY_MIN, self.d // 8):
      return None
    self.prefixes[dim] = normalized_prefix(self.vectors, dim, inv_norms=self.norms(dim),
                                           out=self.alloc((self.n, dim), np.float32))
    return self.prefixes[dim]

  def view(self) -> "SearchArrays":
    """New arrays sharing these (vectors, norms, first-stage copies, device copies) with their own stores."""
    out = SearchArrays(self.vectors, stores=self.stores)
    out.inv_norms, out.prefixes, out._device, out.alloc = (self.inv_norms, self.prefixes,
                                                           self._device, self.alloc)
    return out

  def store_for(self, precision: str, dim: int):
    """The smallest store of `precision` holding the `dim`-prefix; InputError if none does."""
    found = [m for p, m in self.stores if p == precision and m >= dim]
    if not found:
      have = ", ".join(f"{p} {m}" for p, m in sorted(self.stores)) or "none"
      raise InputError(f"no {precision} store holds a {dim}-dim prefix: expected a {precision} "
                       f"store with dims >= {dim}, the index has stores [{have}] (add one with "
                       f"index.add_store({precision!r}, {dim}))")
    return self.stores[(precision, min(found))]

  def _on_device(self, key, host):
    if key not in self._device:
      self._device[key] = topk.to_device(host)   # Aliases an aligned buffer on CPU.
    return self._device[key]

  def stage_data(self, stage: Stage, *, copy: bool = False):
    """The device arrays a stage reads (see `first_stage`); `copy`: scan the first-stage copy."""
    dim, _, precision = stage
    if precision != "float32":
      return self.store_for(precision, dim).stage_data(dim)
    if copy and self.prefix(dim) is not None:   # Normalised rows: no per-document scale.
      return (self._on_device(("prefix", dim), self.prefix(dim)), None)
    return (self._on_device(("vectors",), self.vectors),
            self._on_device(("norms", dim), self.norms(dim)))

  def needs(self, stages, *, copy: bool = False) -> dict:
    """{key: host array} of the norms and first-stage copy a search reads (made if missing)."""
    out = {("norms", m): self.norms(m) for m, _, p in stages if p == "float32"}
    m, _, p = stages[0]
    if copy and p == "float32" and self.prefix(m) is not None:
      out[("prefix", m)] = self.prefix(m)
    return out

  def arrays(self) -> dict:
    """{key: host array} of everything held (see the class docstring for the keys)."""
    out = {("vectors",): self.vectors}
    out.update({("norms", m): a for m, a in self.inv_norms.items()})
    out.update({("prefix", m): a for m, a in self.prefixes.items()})
    for (p, m), store in self.stores.items():
      out.update({("store", p, m, name): a for name, a in store.arrays().items()})
    return out

  @classmethod
  def from_arrays(cls, arrays: dict) -> "SearchArrays":
    """The inverse of `arrays()` (e.g. over arrays mapped from shared memory)."""
    stores = {}
    for key in arrays:
      if key[0] == "store" and key[1:3] not in stores:
        p, m = key[1], key[2]
        stores[(p, m)] = quant.store_from_arrays(
            p, m, {k[3]: a for k, a in arrays.items() if k[:3] == ("store", p, m)})
    return cls(arrays[("vectors",)],
               inv_norms={k[1]: a for k, a in arrays.items() if k[0] == "norms"},
               prefixes={k[1]: a for k, a in arrays.items() if k[0] == "prefix"}, stores=stores)

  def adopt(self, key, array) -> None:
    """Replaces the norms or first-stage copy under `key` by an equal array (e.g. a shared copy)."""
    if key[0] not in ("norms", "prefix"):
      raise ValueError(f"only norms and first-stage copies can be adopted, got {key}")
    (self.inv_norms if key[0] == "norms" else self.prefixes)[key[1]] = array
    self._device.pop(key, None)

  def rerank(self, queries, candidates, stage: Stage):
    """(scores, rows) [n_q, keep] of adapted queries [n_q, d] re-scoring candidate rows [n_q, c] at one stage."""
    s, rows = rerank_stage(jnp.asarray(queries), self.stage_data(stage),
                           jnp.asarray(candidates, jnp.int32), precision=stage.precision,
                           dim=stage.dim, keep=stage.keep)
    return np.asarray(s), np.asarray(rows)

  def search(self, queries, stages, k: int, *, block_size: int | None = None,
             query_batch: int | None = None, copy: bool = False):
    """Top-k rows of adapted queries through checked stages, a fixed-size batch at a time.

    Args:
      queries: adapted queries, with shape [n_q, d] (float32).
      stages: Stages from `check_schedule` (one stage: exact search).
      k: results per query (<= the last keep).
      block_size: first-stage corpus rows per block (default: `topk.default_sizes`);
        quantised first stages use at most quant.MAX_BLOCK rows.
      query_batch: queries per batch (default: `topk.default_sizes`); the
        last batch is zero-padded so that every batch reuses the compiled stages.
      copy: a float first stage scans the normalised contiguous copy of its
        prefix (`prefix`; faster, n * dim * 4 bytes, kept).

    Returns:
      (scores, rows): numpy [n_q, k] each, best first; ties go to the lower row.
    """
    (m1, keep1, p1), rest = stages[0], stages[1:]
    copy = copy and p1 == "float32" and self.prefix(m1) is not None
    block, batch = topk.default_sizes(m1, self.n, queries.shape[0], block_size=block_size,
                                      query_batch=query_batch, contiguous=copy, k=keep1,
                                      quantised=p1 != "float32")
    block = min(block, quant.MAX_BLOCK.get(p1, block))
    data = [self.stage_data(st, copy=copy and i == 0) for i, st in enumerate(stages)]

    def step(q):
      s, rows = first_stage(q, data[0], precision=p1, dim=m1, keep=keep1, block_size=block)
      for (m, keep, p), arrays in zip(rest, data[1:]):
        s, rows = rerank_stage(q, arrays, rows, precision=p, dim=m, keep=keep)
      return s, rows

    return topk.run_batches(step, queries, batch, k)


# ---------------------------------------------------------------- arrays in, results out


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


def exact_search(queries, corpus, k: int, *, dim: int | None = None,
                 block_size: int | None = None, query_batch: int | None = None,
                 normalize: bool = True, inv_norms=None) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k by cosine (or inner product) at a prefix, walking the corpus in blocks.

  Args:
    queries: query vectors, with shape [n_queries, d].
    corpus: document vectors, with shape [n_docs, d] (float32 or float16),
      kept at full size; only the first `dim` columns of each block are read.
    k: number of results per query, in [1, n_docs].
    dim: prefix length used for scoring; None means all d coordinates.
    block_size: corpus rows scored at a time; bounds memory (default: by dim,
      see `topk.default_sizes`).
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
  block_size, query_batch = topk.default_sizes(dim, n_docs, queries.shape[0],
                                               block_size=block_size, query_batch=query_batch)
  scale = None
  if normalize:
    scale = prefix_inv_norms(corpus, dim) if inv_norms is None else inv_norms
    if tuple(np.shape(scale)) != (n_docs,):
      raise ValueError(f"inv_norms must have shape ({n_docs},), got {np.shape(scale)}")
    scale = jnp.asarray(scale, jnp.float32)
  data = (topk.to_device(corpus), scale)
  return topk.run_batches(
      lambda q: first_stage(q, data, precision="float32", dim=dim, keep=k, block_size=block_size,
                            normalize=normalize), queries, query_batch)


def funnel_search(queries, corpus, schedule, *, k: int | None = None, inv_norms: dict | None = None,
                  block_size: int | None = None, query_batch: int | None = None,
                  first_stage_copy=None) -> tuple[np.ndarray, np.ndarray]:
  """Adaptive retrieval: shortlist with a short prefix, re-rank with longer ones.

  As in the Matryoshka Representation Learning paper, the first stage is an
  exact blocked search over the whole corpus at the first (short) prefix; each
  later stage gathers the survivors and re-scores them with a longer,
  re-normalised prefix. Every stage is cosine at its own prefix. (Quantised
  stages need an index's stores: `MatryoshkaIndex.search`.)

  Args:
    queries: query vectors, with shape [n_queries, d].
    corpus: document vectors, with shape [n_docs, d] (float32 or float16).
    schedule: float stages, e.g. "32:1000,128:100,768:10" or
      [(32, 1000), (128, 100), (768, 10)]; see `check_schedule`.
    k: results per query (default: the last stage's keep, which must be >= k).
    inv_norms: optional {dim: prefix_inv_norms(corpus, dim)} for the
      schedule's dims, each with shape [n_docs]; missing ones are computed.
    block_size: corpus rows scored at a time in the first stage (default:
      by the first stage's dim, see `topk.default_sizes`).
    query_batch: queries processed at a time (default: by the first stage's dim).
    first_stage_copy: optional `normalized_prefix(corpus, m1)` for the first
      stage's dim m1, with shape [n_docs, m1]: the first stage scans it
      instead of the full-size rows (faster; an index keeps one).

  Returns:
    (scores, indices), each with shape [n_queries, k], best first, scored at
    the last stage's prefix; ties go to the lower corpus index.
  """
  _check_pair(queries, corpus)
  n_docs, full = corpus.shape
  stages = check_schedule(schedule, full, n_docs=n_docs, k=k)
  if any(st.precision != "float32" for st in stages):
    raise InputError(f"funnel_search takes float32 stages, got {format_schedule(stages)}; "
                     f"quantised stages read an index's stores (MatryoshkaIndex.search)")
  k = stages[-1].keep if k is None else check_k(k, n_docs)
  norms = {}
  for m, scale in dict(inv_norms or {}).items():
    if tuple(np.shape(scale)) != (n_docs,):
      raise ValueError(f"inv_norms[{m}] must have shape ({n_docs},), got {np.shape(scale)}")
    norms[m] = np.asarray(scale, np.float32)
  prefixes = {}
  if first_stage_copy is not None:
    want = (n_docs, stages[0].dim)
    if tuple(np.shape(first_stage_copy)) != want or first_stage_copy.dtype != np.float32:
      raise ValueError(f"first_stage_copy must be float32 with shape {want} (the first stage's "
                       f"normalised prefix), got {first_stage_copy.dtype} "
                       f"{tuple(np.shape(first_stage_copy))}")
    prefixes[stages[0].dim] = first_stage_copy
  arrays = SearchArrays(corpus, inv_norms=norms, prefixes=prefixes)
  return arrays.search(queries, stages, k, block_size=block_size, query_batch=query_batch,
                       copy=first_stage_copy is not None)


# The funnel cost model: milliseconds per query on the CPU it was measured on
# (experiments/funnel_costs.py: 1M x 768 float32, 1000 queries, the process
# pinned to one CPU of a 2-core AMD EPYC, as a search worker is), fitted by
# least squares (the script prints the fit). Other machines scale it; the
# planner only ranks estimates and compares them with full-size exact search.
# Scanning, per million documents: base, per dim up to 256, per dim beyond
# (longer prefixes use larger, more efficient tiles; see topk.default_sizes).
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
