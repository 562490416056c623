"""A saved Matryoshka search index: adapted vectors, ids, prefix norms, the adaptor.

    index = MatryoshkaIndex.build(corpus_embeddings, ids=doc_ids, adaptor=model)
    scores, ids = index.search(query_embeddings, 10, dim=64)
    scores, ids = index.search(query_embeddings, 10, schedule=[(32, 1000), (768, 10)])
    index.save("indexes/scifact"); index = MatryoshkaIndex.load("indexes/scifact")
    index = MatryoshkaIndex.load("indexes/big", workers=None)   # one search process per CPU (pool.py)

    # Quantised stores (adaptor/quant.py) and mixed-precision funnels:
    index = MatryoshkaIndex.build(corpus_embeddings, adaptor=model, stores={"binary": 768, "int8": 256})
    scores, ids = index.search(query_embeddings, 10, dim=512, precision="binary")
    scores, ids = index.search(query_embeddings, 10,
                               schedule=[(256, 400, "binary"), (256, 40, "int8"), (768, 10)])

Raw embeddings of the frozen model go in, for documents and queries alike: the
index applies its adaptor (if any) to both, so they always match. Vectors are
stored once, at full size, L2-normalised, in float32 or float16, in a 4 KiB
aligned buffer that JAX reads without copying. Inverse norms of each stored
prefix are computed once, at build (or on first use of a new prefix), never per
query.

On disk an index is a directory

  index.json     sizes, precision, prefix dims, adaptor fingerprint, versions
  vectors.npy    [n, d] float32/float16
  inv_norms.npy  [len(dims), n] float32, one row per stored prefix
  ids.json       the n document ids
  store-binary-M-bits.npy         [n, M / 8] uint8, for each binary store (optional)
  store-int8-M-codes.npy          [n, M] int8, for each int8 store (optional)
  store-int8-M-calibration.npy    [2, M] float32: offsets, scales
  adaptor/       the adaptor checkpoint, if the index has one
  COMPLETE       an empty marker, written last

written in a sibling temporary directory and renamed into place, so a crash
mid-save leaves the previous index intact.

index.json lists the stores ("stores": [{"precision", "dims", "files"}]) and
an optional default funnel ("schedule", e.g. from `matryoshka-adaptor plan`,
used by `search` when no dim, precision or schedule is given). Both keys are
optional, so indexes written before stores existed load unchanged, and the
format version stays 1: a reader that ignores them still searches the float
vectors correctly.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from pathlib import Path

import jax
import numpy as np

from adaptor._version import __version__
from adaptor import checkpoint, quant
from adaptor.checks import check_dim, check_k, check_positive
from adaptor.search import SearchArrays, check_schedule, format_schedule
from adaptor.truncation import aligned_empty, prefix_inv_norms, truncate
# Renamed: MatryoshkaIndex's methods take an argument called `adaptor`.
from adaptor.api import load as load_adaptor
from adaptor.model import adaptor_fingerprint, default_dims
from adaptor.data import (InputError, as_id_list, check_embeddings, check_ids, fsync_dir,
                          links_leaving, member_path, temp_dir)

FORMAT_VERSION = 1
_META = "index.json"
_VECTORS = "vectors.npy"
_NORMS = "inv_norms.npy"
_IDS = "ids.json"
_ADAPTOR = "adaptor"
_MARKER = "COMPLETE"
# The float precisions an index can store its vectors in (`MatryoshkaIndex.build(precision=)`).
VECTOR_DTYPES = {"float32": np.float32, "float16": np.float16}
# Rows adapted, normalised and copied at a time when building or adding.
_BUILD_ROWS = 65536


def _exclusive(method):
  """Runs `method` holding the index's lock (see MatryoshkaIndex, "Threads")."""
  @functools.wraps(method)
  def locked(self, *args, **kwargs):
    with self._lock:
      return method(self, *args, **kwargs)
  return locked


class MatryoshkaIndex:
  """Full-size adapted document vectors with ids, searched at any prefix.

  Threads: one index may be shared by threads that search and add. `add`
  replaces several arrays, and `search` fills caches (device copies, norms)
  from them, so the two cannot interleave consistently; every public method
  that reads or changes them holds one lock, and each search sees the index
  entirely before or entirely after an `add`. Searches from several threads
  therefore run one at a time (each already spreads its query batches over
  every CPU); for parallel searches use worker processes (`start_workers`).

  Attributes:
    vectors: np.ndarray [n, d] of unit-norm rows (float32 or float16).
    ids: the n document ids (str).
    adaptor: the `Adaptor` applied to documents and queries, or None.
    precision: "float32" or "float16".
    d_in: the size of the raw embeddings it accepts (adaptor.d_in, or d).
    stores: {(precision, dims): quantised store} (see adaptor/quant.py).
    schedule: the default funnel of `search` (checked (dim, keep, precision)
      triples), or None for full-size exact search.
  """

  def __init__(self, vectors, ids, *, adaptor=None, precision="float32", inv_norms=None,
               block_size=None, stores=None, schedule=None):
    # What searches read: the vectors, prefix norms, stores and first-stage
    # copies, with their device copies (search.SearchArrays).
    self._arrays = SearchArrays(vectors, inv_norms=inv_norms, stores=stores)
    self.ids = ids
    self.adaptor = adaptor
    self.precision = precision
    self.block_size = block_size
    self.schedule = None
    if schedule is not None:
      self.schedule = check_schedule(schedule, self.d, n_docs=self.n)
    self._row_of = None
    self._pool = None   # A running pool.SearchPool, or None.
    self._load_shared = None   # Arrays `load` read into shared memory for the workers.
    self._lock = threading.RLock()  # See "Threads" above.

  # ------------------------------------------------------------ properties

  @property
  def vectors(self) -> np.ndarray:
    """[n, d] unit-norm rows (float32 or float16)."""
    return self._arrays.vectors

  n = property(lambda self: self._arrays.n, doc="The number of documents.")
  d = property(lambda self: self._arrays.d, doc="The size of the stored (adapted) vectors.")

  @property
  def d_in(self) -> int:
    return self.adaptor.d_in if self.adaptor is not None else self.d

  @property
  def dims(self) -> tuple[int, ...]:
    """The prefixes whose inverse norms are stored."""
    return tuple(sorted(self._arrays.inv_norms))

  @property
  def nbytes(self) -> int:
    """Bytes held by the vectors, prefix norms, quantised stores and first-stage copies."""
    a = self._arrays
    return (a.vectors.nbytes + sum(v.nbytes for v in a.inv_norms.values())
            + sum(st.nbytes for st in a.stores.values())
            + sum(v.nbytes for v in a.prefixes.values()))

  @property
  def stores(self) -> dict:
    """{(precision, dims): store} of the quantised stores, in (precision, dims) order."""
    return dict(sorted(self._arrays.stores.items()))

  def __len__(self):
    return self.n

  def __repr__(self):
    stores = "".join(f", {p}:{m}" for p, m in sorted(self._arrays.stores))
    return (f"MatryoshkaIndex(n={self.n}, d={self.d}, precision={self.precision!r}, "
            f"adaptor={'yes' if self.adaptor is not None else 'none'}, dims={list(self.dims)}"
            f"{', stores=[' + stores[2:] + ']' if stores else ''})")

  # ------------------------------------------------------------ building

  @classmethod
  def build(cls, corpus_embeddings, *, ids=None, adaptor=None, precision: str = "float32",
            dims=None, block_size: int | None = None, stores=None, calibration_rows: int | None = None,
            key=None, schedule=None) -> "MatryoshkaIndex":
    """Adapts (if an adaptor is given), normalises and stores the corpus.

    Args:
      corpus_embeddings: raw document embeddings, with shape [n, d_in] (array
        or memmap); with an adaptor, d_in = adaptor.d_in.
      ids: n unique str (or int) ids; default "0", "1", ... in row order.
      adaptor: a fitted `Adaptor` applied once to the corpus here, and to
        every query at search time; None stores the embeddings as they are.
      precision: "float32" or "float16" storage.
      dims: prefixes whose inverse norms are stored now (default: the
        adaptor's dims and powers of two from 16, plus d); others are
        computed on first use.
      block_size: corpus rows per search block (default: by prefix length, see
        `search.default_sizes`).
      stores: quantised stores to add, {precision: dims} (e.g. {"binary":
        768, "int8": 256}), or a sequence of (precision, dims) pairs or of
        {"precision", "dims"} dicts (a plan config's "stores"); see `add_store`.
      calibration_rows, key: int8 calibration sample (see `add_store`).
      schedule: default funnel for `search` (see `search`), e.g. a planned one.
    """
    if precision not in VECTOR_DTYPES:
      raise InputError(f"precision must be one of {sorted(VECTOR_DTYPES)}, got {precision!r}")
    _check_adaptor(adaptor)
    d_in = adaptor.d_in if adaptor is not None else None
    name = "corpus_embeddings"
    x = check_embeddings(corpus_embeddings, name=name, dim=d_in)
    if adaptor is not None and x.shape[1] != adaptor.d_in:
      raise InputError(f"{name} must have d={adaptor.d_in} (the adaptor's d_in), got {x.shape}")
    index = cls(aligned_empty((0, adaptor.d_out if adaptor else x.shape[1]),
                              VECTOR_DTYPES[precision]), [], adaptor=adaptor,
                precision=precision,
                block_size=None if block_size is None else check_positive(block_size, "block_size"))
    wanted = _store_specs(stores, index.d)  # Checked before the corpus is adapted.
    vectors, index.ids = index._prepared(x, ids, name=name, ids_name="ids")
    index._arrays = SearchArrays(vectors)
    trained = () if adaptor is None else tuple(m for m in adaptor.dims if m <= index.d)
    for m in (sorted(set(default_dims(index.d)) | set(trained)) if dims is None else dims):
      index.prefix_inv_norms(m)
    for p, m in wanted:
      index.add_store(p, m, calibration_rows=calibration_rows, key=key)
    if schedule is not None:
      index.schedule = check_schedule(schedule, index.d, n_docs=index.n)
      index._store_for_schedule(index.schedule)
    return index

  @_exclusive
  def add_store(self, precision: str, dims: int, *, calibration_rows: int | None = None,
                key=None):
    """Adds (or returns the existing) quantised store of the first `dims` coordinates.

    Args:
      precision: "int8" (per-dimension calibrated codes of the re-normalised
        dims-prefix) or "binary" (packed sign bits; dims a multiple of 8).
      dims: the prefix length stored, in [1, d]; queries may use any shorter
        prefix of it (binary: a multiple of 8).
      calibration_rows: int8 only: calibrate on this many rows (default all),
        evenly spaced, or drawn with `key`; the calibration is saved and codes
        every later `add`.
      key: optional jax.random key for the calibration sample.

    Returns:
      the `quant.BinaryStore` or `quant.Int8Store`.
    """
    if precision not in quant.QUANTISED:
      raise InputError(f"store precision must be one of {list(quant.QUANTISED)} (float32 is the "
                       f"index's own vectors), got {precision!r}")
    dims = quant.check_store_dims(precision, dims, self.d, name=f"{precision} store dims")
    stores = self._arrays.stores
    if (precision, dims) not in stores:
      if precision == "binary":
        store = quant.BinaryStore.build(self.vectors, dims)
      else:
        store = quant.Int8Store.build(self.vectors, dims, calibration_rows=calibration_rows, key=key)
      stores[(precision, dims)] = store
      self._restart_workers()
    return stores[(precision, dims)]

  def store_for(self, precision: str, dim: int):
    """The smallest store of `precision` holding the `dim`-prefix; InputError if none does."""
    return self._arrays.store_for(precision, dim)

  def _store_for_schedule(self, stages) -> None:
    for m, _, p in stages:
      if p != "float32":
        self.store_for(p, m)

  def view(self) -> "MatryoshkaIndex":
    """A new index sharing this one's vectors, ids, norms and stores; stores added to it are its own."""
    view = MatryoshkaIndex(self.vectors, self.ids, adaptor=self.adaptor, precision=self.precision,
                           block_size=self.block_size, schedule=self.schedule)
    view._arrays = self._arrays.view()
    view._row_of = self._row_of
    return view

  def _prepared(self, x, ids, *, name, ids_name, first_id: int = 0):
    """Existing vectors and ids with `x` (validated) adapted, normalised and appended."""
    n_new = x.shape[0]
    ids = [str(first_id + i) for i in range(n_new)] if ids is None else as_id_list(ids, ids_name)
    check_ids(ids, n_new, ids_name, name)
    if self.ids:
      row_of = self._rows()
      taken = [v for v in ids if v in row_of]
      if taken:
        raise InputError(f"{ids_name} must be new, got {len(taken)} ids already in the index "
                         f"(first {taken[:5]})")
    out = aligned_empty((self.n + n_new, self.d), self.vectors.dtype)
    out[:self.n] = self.vectors
    for start in range(0, n_new, _BUILD_ROWS):
      part = x[start:start + _BUILD_ROWS]
      if self.adaptor is not None:
        part = self.adaptor.apply(part)            # unit norm at full size
      else:
        part = np.asarray(part, np.float32)
        part = part / np.linalg.norm(part, axis=1, keepdims=True)  # Rows are non-zero (checked).
      out[self.n + start:self.n + start + len(part)] = part
    return out, list(self.ids) + ids

  @_exclusive
  def add(self, corpus_embeddings, *, ids=None) -> None:
    """Appends documents (raw embeddings [m, d_in]) with m new unique ids.

    Default ids continue the row numbers ("n", "n+1", ...). The stored vectors
    are reallocated once per call; prefix norms are extended for new rows only.
    """
    name = "corpus_embeddings"
    x = check_embeddings(corpus_embeddings, name=name, dim=self.d_in)
    old_n = self.n
    vectors, ids = self._prepared(x, ids, name=name, ids_name="ids", first_id=old_n)
    new_rows = vectors[old_n:]
    norms = {m: np.concatenate([v, prefix_inv_norms(new_rows, m)])
             for m, v in self._arrays.inv_norms.items()}
    # Stores code the new rows with their saved calibration.
    stores = {key: st.extended(new_rows) for key, st in self._arrays.stores.items()}
    self._arrays = SearchArrays(vectors, inv_norms=norms, stores=stores)
    self.ids = ids
    self._row_of = None
    self._restart_workers()

  def _restart_workers(self) -> None:
    if self._pool is not None:
      self.start_workers(self._pool.workers)

  # ------------------------------------------------------------ lookups

  def _rows(self) -> dict[str, int]:
    if self._row_of is None:
      self._row_of = {v: i for i, v in enumerate(self.ids)}
    return self._row_of

  @_exclusive
  def rows(self, ids) -> np.ndarray:
    """Row numbers of document ids; InputError naming any unknown ids."""
    ids = as_id_list([ids] if isinstance(ids, str) else ids, "ids")
    row_of = self._rows()
    unknown = [v for v in ids if v not in row_of]
    if unknown:
      raise InputError(f"ids must be in the index ({self.n} documents), got {len(unknown)} "
                       f"unknown ids (first {unknown[:5]})")
    return np.array([row_of[v] for v in ids], np.int64)

  @_exclusive
  def get_vectors(self, ids, *, dim: int | None = None) -> np.ndarray:
    """The stored vectors [len(ids), dim] of documents, re-normalised at `dim`."""
    rows = self.rows(ids)
    dim = self.d if dim is None else check_dim(dim, self.d)
    return np.asarray(truncate(np.asarray(self.vectors[rows], np.float32), dim))

  def prefix_inv_norms(self, dim: int) -> np.ndarray:
    """Inverse norms [n] of the stored `dim`-prefixes, computed once and kept."""
    return self._arrays.norms(dim)

  # ------------------------------------------------------------ workers

  @property
  def workers(self) -> int:
    """How many worker processes search this index (0: it searches in this process)."""
    return 0 if self._pool is None else self._pool.workers

  @property
  def worker_pids(self) -> list[int]:
    """The process ids of the worker processes (empty: it searches in this process)."""
    return [] if self._pool is None else self._pool.pids

  @property
  def worker_cpus(self) -> list[int]:
    """The CPU each worker process is pinned to, in the order of `worker_pids`."""
    return [] if self._pool is None else list(self._pool.cpus)

  def start_workers(self, workers: int | None = None) -> None:
    """Searches from now on run in `workers` processes, one per CPU (see adaptor/pool.py).

    The index's arrays move into shared memory, which every worker maps
    without copying; each search splits its queries between the workers, and
    returns exactly what a search in this process would. `add` and
    `add_store` restart the workers. CPU backends only.

    Args:
      workers: default one per CPU this process may run on.
    """
    from adaptor import pool
    self.stop_workers()
    self._pool = pool.SearchPool(self._arrays, workers, shared=self._load_shared)
    self._arrays = self._pool.arrays   # The same arrays, now in shared memory.
    self._load_shared = None

  def stop_workers(self) -> None:
    """Stops the worker processes (if any); searches run in this process again."""
    if self._pool is not None:
      pool, self._pool = self._pool, None
      pool.close()

  # ------------------------------------------------------------ search

  def prepare_queries(self, query_embeddings, *, adapted: bool = False) -> np.ndarray:
    """Validates raw query embeddings [n_q, d_in] and adapts them: [n_q, d] float32.

    With adapted=True they are already adapted vectors [n_q, d]: validated only.
    """
    if adapted:
      q = check_embeddings(query_embeddings, name="query_embeddings", dim=self.d)
      return np.asarray(q, np.float32)
    q = check_embeddings(query_embeddings, name="query_embeddings", dim=self.d_in)
    if self.adaptor is not None:
      return self.adaptor.apply(q)
    return np.asarray(q, np.float32)

  @_exclusive
  def search_rows(self, query_embeddings, k: int, *, dim: int | None = None, schedule=None,
                  precision: str | None = None, query_batch: int | None = None, adapted: bool = False):
    """Like `search`, but returns corpus row numbers instead of ids.

    Args:
      adapted: the queries are already adapted vectors [n_q, d] (skips the adaptor).
    """
    if dim is not None and schedule is not None:
      raise ValueError(f"give dim or schedule, not both (got dim={dim}, schedule={schedule})")
    if precision is not None and schedule is not None:
      raise ValueError(f"give precision (with dim) or a schedule whose stages name their "
                       f"precisions, not both (got precision={precision!r}, schedule={schedule})")
    if precision is not None:
      quant.check_precision(precision)
    q = self.prepare_queries(query_embeddings, adapted=adapted)
    k = check_k(k, self.n, what="the index size")
    if schedule is None and dim is None and precision is None and self.schedule is not None:
      if self.schedule[-1][1] < k:
        raise ValueError(f"k={k} exceeds the last keep {self.schedule[-1][1]} of the index's "
                         f"default schedule {format_schedule(self.schedule)}; pass dim= or "
                         f"schedule= to search otherwise")
      schedule = self.schedule
    if schedule is None:   # Exact search: the one-stage schedule.
      dim = self.d if dim is None else check_dim(dim, self.d)
      stages = check_schedule([(dim, k, precision or "float32")], self.d, n_docs=self.n, k=k)
    else:
      stages = check_schedule(schedule, self.d, n_docs=self.n, k=k)
    self._store_for_schedule(stages)
    # Float funnels scan a contiguous copy of their first prefix (kept); exact
    # search reads the full-size rows, so a search at one dim copies nothing.
    how = {"block_size": self.block_size, "query_batch": query_batch,
           "copy": schedule is not None and all(p == "float32" for _, _, p in stages)}
    if self._pool is not None:
      try:
        return self._pool.search(q, stages, k, **how)
      except BaseException:
        if self._pool.closed:   # A worker died: later searches run here.
          self._pool = None
        raise
    return self._arrays.search(q, stages, k, **how)

  @_exclusive
  def rerank_rows(self, query_embeddings, candidates, keep: int, *, dim: int | None = None,
                  precision: str = "float32", adapted: bool = False):
    """Re-scores given candidate rows of each query at one prefix and keeps the best `keep`.

    A funnel's later stage on a shortlist found elsewhere (another search, a
    vector database, a cached first stage).

    Args:
      query_embeddings: raw queries [n_q, d_in] (or adapted [n_q, d] with adapted=True).
      candidates: int row numbers, with shape [n_q, c]; rows >= n are padding.
      keep: results kept per query, in [1, c].
      dim: the prefix scored (default: all d).
      precision: "float32" (the vectors) or a store's "int8" or "binary".

    Returns:
      (scores, rows): numpy [n_q, keep] each, best first; ties go to the lower row.
    """
    q = self.prepare_queries(query_embeddings, adapted=adapted)
    candidates = np.asarray(candidates)
    if candidates.ndim != 2 or candidates.shape[0] != q.shape[0] or \
        not np.issubdtype(candidates.dtype, np.integer):
      raise InputError(f"candidates must be int rows [{q.shape[0]}, c], got {candidates.dtype} "
                       f"{candidates.shape}")
    dim = self.d if dim is None else check_dim(dim, self.d)
    stage = check_schedule([(dim, check_k(keep, candidates.shape[1], name="keep",
                                         what="the candidates per query"), precision)], self.d)[0]
    return self._arrays.rerank(q, candidates, stage)

  @_exclusive
  def search(self, query_embeddings, k: int, *, dim: int | None = None, schedule=None,
             precision: str | None = None, query_batch: int | None = None, adapted: bool = False):
    """Top-k documents for each query, exact at one prefix or through a funnel.

    Args:
      query_embeddings: raw query embeddings, with shape [n_queries, d_in];
        the index applies its adaptor to them.
      k: results per query, in [1, n].
      dim: prefix length for exact search (default: all d dims).
      schedule: instead of dim, a funnel of (dim, keep) float stages or
        (dim, keep, precision) stages, e.g. [(256, 400, "binary"),
        (256, 40, "int8"), (768, 10)], or their text "256:400:binary,256:40:int8,768:10"
        (see `search.check_schedule`); the last
        keep must be >= k. Quantised stages read the index's stores.
      precision: with dim, exact search over one store: "int8" or "binary"
        (or "float32", the default: the index's float vectors, whether they
        are stored as float32 or float16).
      query_batch: queries scored at a time.
      adapted: the queries are already adapted vectors [n_queries, d].

    With none of dim, schedule and precision, an index with a default
    schedule (`index.schedule`, e.g. built from a `plan` config) searches
    with it; otherwise the search is exact at all d dims.

    Returns:
      (scores, ids): float32 scores [n_queries, k] and an object array
      [n_queries, k] of document ids, best first; ties go to the lower row.
      Scores are cosines at the last stage's prefix (int8: of the dequantised
      documents), or 1 - 2 * hamming / dim for binary.
    """
    scores, rows = self.search_rows(query_embeddings, k, dim=dim, schedule=schedule,
                                    precision=precision, query_batch=query_batch, adapted=adapted)
    ids = np.asarray(self.ids, dtype=object)
    return scores, ids[rows]

  # ------------------------------------------------------------ FAISS

  def to_faiss(self, dim: int | None = None, *, refine: bool = True, kind: str = "hnsw",
               hnsw_m: int = 32, ef_construction: int = 200, ef_search: int = 128,
               k_factor: float = 10.0):
    """A FAISS index of the stored vectors: a `dim`-prefix first stage, re-scored at full size.

    With `refine` (the default) it is the two-stage funnel [(dim, k * k_factor),
    (d, k)]: an `IndexRefineFlat` whose base searches the re-normalised
    `dim`-prefix (an `IndexPreTransform` that keeps the first `dim`
    coordinates and L2-normalises them, over an `IndexHNSWFlat`, or an exact
    `IndexFlatIP` with kind="flat") and whose refine stage re-scores the
    base's k * k_factor candidates by inner product with the full-size rows
    (cosine: they have unit norm). Without `refine`, it is the base alone,
    scoring cosine at the prefix. With kind="flat" or a large `ef_search` its
    results are this index's `search(schedule=[(dim, k * k_factor), (d, k)])`
    (tests/test_index.py).

    Queries go in adapted: `index.prepare_queries(raw)` ([n_queries, d] float32);
    results are row numbers: `np.asarray(index.ids)[I]`. Save it with
    `faiss.write_index`. Needs faiss (the `bench` extra: faiss-cpu).

    Args:
      dim: prefix length of the first stage, in [1, d] (default d).
      refine: re-score the first stage's candidates at full size.
      kind: "hnsw" (approximate graph search) or "flat" (exact) first stage.
      hnsw_m, ef_construction, ef_search: HNSW graph degree and beam widths.
      k_factor: the first stage returns k * k_factor candidates (with refine).

    Returns:
      a faiss.Index over the n rows, with metric inner product.
    """
    try:
      import faiss
    except ImportError:
      raise InputError("to_faiss needs faiss: pip install 'matryoshka-adaptor[bench]' "
                       "(faiss-cpu)") from None
    dim = self.d if dim is None else check_dim(dim, self.d)
    if kind not in ("hnsw", "flat"):
      raise InputError(f"kind must be 'hnsw' or 'flat', got {kind!r}")
    if kind == "hnsw":
      base = faiss.IndexHNSWFlat(dim, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
      base.hnsw.efConstruction = int(ef_construction)
      base.hnsw.efSearch = int(ef_search)
    else:
      base = faiss.IndexFlatIP(dim)
    if dim < self.d:  # Keep the first dim coordinates (uniform=False), then re-normalise.
      pre = faiss.IndexPreTransform(faiss.NormalizationTransform(dim, 2.0), base)
      pre.prepend_transform(faiss.RemapDimensionsTransform(self.d, dim, False))
      base = pre
    out = base
    if refine:
      out = faiss.IndexRefineFlat(base)
      out.k_factor = float(k_factor)
    for start in range(0, self.n, _BUILD_ROWS):
      out.add(np.ascontiguousarray(self.vectors[start:start + _BUILD_ROWS], np.float32))
    return out

  # ------------------------------------------------------------ disk

  @_exclusive
  def save(self, directory, *, overwrite: bool = False) -> None:
    """Atomically writes the index to `directory` (see the module docstring).

    An existing index there is replaced only with `overwrite=True`.
    """
    directory = Path(directory).absolute()
    if directory.exists():
      if not overwrite:
        raise InputError(f"{directory}: expected a new path (overwrite=False), found an existing one")
      if not (directory.is_dir() and ((directory / _MARKER).is_file() or not any(directory.iterdir()))):
        raise InputError(f"{directory}: refusing to replace it, expected an index (with a "
                         f"{_MARKER} marker) or an empty directory, found other contents")
    dims = self.dims
    meta = {
        "format": "matryoshka-index", "format_version": FORMAT_VERSION,
        "library_version": __version__, "n": self.n, "d": self.d, "d_in": self.d_in,
        "precision": self.precision, "dims": list(dims), "block_size": self.block_size,
        "adaptor": None if self.adaptor is None else {
            "config": self.adaptor.config.to_dict(),
            "fingerprint": adaptor_fingerprint(self.adaptor)},
        "stores": [{"precision": p, "dims": m,
                    "files": {name: _store_file(p, m, name) for name in st.arrays()}}
                   for (p, m), st in sorted(self._arrays.stores.items())],
        "schedule": None if self.schedule is None else [list(st) for st in self.schedule],
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(temp_dir(directory.parent, prefix=f"{directory.name}.tmp-"))
    try:
      with open(tmp / _VECTORS, "wb") as f:
        np.save(f, self.vectors)
      with open(tmp / _NORMS, "wb") as f:
        np.save(f, np.stack([self._arrays.inv_norms[m] for m in dims]) if dims
                else np.zeros((0, self.n), np.float32))
      (tmp / _IDS).write_text(json.dumps(self.ids))
      for (p, m), st in self._arrays.stores.items():
        for name, array in st.arrays().items():
          with open(tmp / _store_file(p, m, name), "wb") as f:
            np.save(f, array)
      if self.adaptor is not None:
        self.adaptor.save(tmp / _ADAPTOR)
      (tmp / _META).write_text(json.dumps(meta, indent=2) + "\n")
      checkpoint.fsync_tree(tmp)
      with open(tmp / _MARKER, "w") as f:  # The marker goes last.
        f.flush()
        os.fsync(f.fileno())
      fsync_dir(tmp)
      checkpoint.swap_into_place(tmp, directory)
    except BaseException:
      checkpoint.remove_tree(tmp)
      raise

  @classmethod
  def load(cls, directory, *, adaptor=None, workers: int | None = 0) -> "MatryoshkaIndex":
    """Reads an index written by `save`, checking every file against index.json.

    Args:
      directory: the index directory.
      adaptor: optional; if given it must be the adaptor the index was built
        with (same fingerprint), else InputError. By default the stored one.
      workers: search in this many worker processes (see `start_workers`;
        None: one per CPU); the arrays are read straight into shared memory.
        0 (the default): search in this process.
    """
    shared = None
    if workers != 0:
      from adaptor import pool
      shared = pool.SharedArrays()
    alloc = aligned_empty if shared is None else shared.empty
    directory = Path(directory).absolute()
    if not directory.is_dir():  # A save killed between its two renames left the old one aside.
      directory = checkpoint.recover_moved_aside(directory) or directory
    if not (directory / _MARKER).is_file():
      raise InputError(f"{directory}: expected a complete index with a {_MARKER} marker, found "
                       "none (an interrupted save, or not an index)")
    leaving = links_leaving(directory)
    if leaving:  # Every file of an index lies in its folder.
      raise InputError(f"{directory}: expected every file inside the index folder, found links "
                       f"leaving it: {leaving[:5]}")
    try:
      meta = json.loads((directory / _META).read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise InputError(f"{directory / _META}: expected the index's JSON metadata, got error: {e}") from None
    if meta.get("format") != "matryoshka-index" or meta.get("format_version") != FORMAT_VERSION:
      raise InputError(f"{directory / _META}: expected a matryoshka-index format_version "
                       f"{FORMAT_VERSION}, found {meta.get('format')!r} {meta.get('format_version')!r}")
    n, d, precision = meta["n"], meta["d"], meta["precision"]
    vectors = _read_npy(directory / _VECTORS, (n, d), np.dtype(VECTOR_DTYPES[precision]), alloc)
    dims = tuple(meta["dims"])
    norms = _read_npy(directory / _NORMS, (len(dims), n), np.dtype(np.float32))
    norms = {m: norms[i] if shared is None else shared.share(norms[i])
             for i, m in enumerate(dims)}
    ids = json.loads((directory / _IDS).read_text())
    if not isinstance(ids, list) or len(ids) != n or not all(isinstance(v, str) for v in ids):
      raise InputError(f"{directory / _IDS}: expected a JSON list of {n} str ids")
    stored = meta.get("adaptor")
    if stored is None and adaptor is not None:
      raise InputError(f"{directory}: the index was built without an adaptor, got one ({adaptor!r})")
    if stored is not None:
      if adaptor is None:
        adaptor = load_adaptor(directory / _ADAPTOR)
      found = adaptor_fingerprint(adaptor)
      if found != stored["fingerprint"]:
        raise InputError(f"{directory}: adaptor mismatch: the index was built with adaptor "
                         f"fingerprint {stored['fingerprint']}, got {found} ({adaptor!r})")
    stores = {}
    for entry in meta.get("stores") or []:  # Absent from indexes written before stores.
      try:
        p, m = entry["precision"], int(entry["dims"])
        files = entry["files"]
      except (KeyError, TypeError, ValueError):
        raise InputError(f"{directory / _META}: expected stores as {{precision, dims, files}}, "
                         f"found {entry!r}") from None
      if p not in quant.QUANTISED or not 1 <= m <= d:
        raise InputError(f"{directory / _META}: expected a store precision in "
                         f"{list(quant.QUANTISED)} with dims in [1, {d}], found {p!r} {m}")
      if not isinstance(files, dict):
        raise InputError(f"{directory / _META}: expected a store's files as a JSON object, "
                         f"found {files!r}")
      paths = {name: member_path(directory, files.get(name, _store_file(p, m, name)),
                                 what=str(directory / _META))
               for name in _store_layout(p, m, n)}
      arrays = {name: _read_npy(paths[name], shape, np.dtype(dtype), alloc)
                for name, (shape, dtype) in _store_layout(p, m, n).items()}
      try:
        stores[(p, m)] = quant.store_from_arrays(p, m, arrays)
      except InputError as e:  # e.g. a calibration with NaN or non-positive scales
        where = paths.get("calibration", paths[next(iter(paths))])
        raise InputError(f"{where}: {e}") from None
    schedule = meta.get("schedule")
    try:
      schedule = None if schedule is None else check_schedule(schedule, d, n_docs=n)
    except ValueError as e:
      raise InputError(f"{directory / _META}: bad default schedule: {e}") from None
    index = cls(vectors, ids, adaptor=adaptor, precision=precision,
                inv_norms=norms, block_size=meta.get("block_size"), stores=stores,
                schedule=schedule)
    if schedule is not None:
      index._store_for_schedule(schedule)
    if shared is not None:
      index._load_shared = shared
      index.start_workers(workers)
    return index


def _store_file(precision: str, dims: int, name: str) -> str:
  return f"store-{precision}-{dims}-{name}.npy"


def _store_layout(precision: str, dims: int, n: int) -> dict:
  """{array name: (shape, dtype)} of a saved store."""
  if precision == "binary":
    return {"bits": ((n, dims // 8), np.uint8)}
  return {"codes": ((n, dims), np.int8), "calibration": ((2, dims), np.float32)}


def _store_specs(stores, d: int) -> list[tuple[str, int]]:
  """(precision, dims) pairs from {precision: dims}, pairs, or "precision:dims" strings."""
  if stores is None:
    return []
  items = stores.items() if isinstance(stores, dict) else stores
  out = []
  for item in items:
    if isinstance(item, str):
      p, _, m = item.partition(":")
      item = (p, m)
    elif isinstance(item, dict):  # As listed in a plan config.
      item = (item.get("precision"), item.get("dims"))
    try:
      p, m = item
      m = int(m)
    except (TypeError, ValueError):
      raise InputError(f"stores must be {{precision: dims}} or (precision, dims) pairs like "
                       f"('int8', 256), got {item!r}") from None
    if p not in quant.QUANTISED:
      raise InputError(f"store precision must be one of {list(quant.QUANTISED)} (float32 is the "
                       f"index's own vectors), got {p!r}")
    out.append((p, quant.check_store_dims(p, m, d, name=f"{p} store dims")))
  return list(dict.fromkeys(out))


def _check_adaptor(model) -> None:
  if model is not None and not all(hasattr(model, a) for a in ("apply", "d_in", "d_out", "config")):
    raise InputError(f"adaptor must be a fitted adaptor.Adaptor (or None), got {type(model).__name__}")


def _read_npy(path: Path, shape, dtype, alloc=aligned_empty) -> np.ndarray:
  """Reads a .npy file straight into `alloc(shape, dtype)`, checking its shape and dtype."""
  try:
    with open(path, "rb") as f:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      found_shape, fortran, found_dtype = read_header(f)
      if tuple(found_shape) != tuple(shape) or found_dtype != dtype or fortran:
        raise InputError(f"{path}: expected a C-order {dtype} array of shape {tuple(shape)}, "
                         f"found {found_dtype} {tuple(found_shape)}{' (Fortran order)' if fortran else ''}")
      out = alloc(shape, dtype)
      view = memoryview(out.reshape(-1).view(np.uint8))
      got = 0
      while got < out.nbytes:
        r = f.readinto(view[got:])
        if not r:
          break
        got += r
      if got != out.nbytes:
        raise InputError(f"{path}: expected {out.nbytes} bytes of data, found {got} (truncated file)")
  except OSError as e:
    raise InputError(f"{path}: cannot read: {e}") from None
  except ValueError as e:
    if isinstance(e, InputError):
      raise
    raise InputError(f"{path}: expected a .npy file, got error: {e}") from None
  return out

