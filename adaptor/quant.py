"""Quantised Matryoshka prefixes: int8 and binary stores, exact quantised scoring and top-k.

An index keeps its adapted vectors at full size in float, and may also keep
*stores*: contiguous quantised copies of a prefix, keyed by (precision, dims).
A query at precision p and prefix m' reads the smallest store of precision p
whose dims m >= m', using only its first m' columns (int8) or m'/8 bytes
(binary), so one store serves every shorter prefix.

Binary (`BinaryStore`): the sign bit (x > 0) of each of the first m
coordinates, packed 8 per byte with the first coordinate in the most
significant bit (the layout of `np.packbits`), [n, m / 8] uint8; m and every
queried prefix must be multiples of 8. Queries are binarised the same way and
scored by Hamming distance (XOR + popcount); `hamming_top_k` returns the
smallest distances. Through an index the score is 1 - 2 h / m', the cosine of
the two +-1 sign vectors, so higher is better as everywhere else. Signs do not
change when a vector is re-normalised, so no norms are needed. A block of
documents is scored against all queries at once, each document word broadcast
against contiguous query words (queries along the vector lanes, so the block is
read once), and popcounts are summed through a carry-save adder tree
(`_popcount_sum`); on one AVX2 core this ran about 4.7x faster than a float32
GEMM over the same number of dims.

Int8 (`Int8Store`): the re-normalised m-prefix `truncate(x, m)`, coded per
dimension j as x_j ~ offset_j + scale_j * c_j with c_j in [-128, 127]. The
offsets and scales come from the per-dimension min and max over a calibration
sample of the corpus (all rows, or `calibration_rows` of them: evenly spaced,
or drawn with an explicit `key`), are saved with the index, and code every
later row too (`add`); values outside the calibrated range are clipped.
The same min/max coding as sentence-transformers' int8 quantisation, but the
offsets and scales are kept and used when scoring.

Int8 scoring, for a query q re-normalised at m': with w_j = q_j * scale_j,
  q . x_hat = sum_j q_j offset_j + sum_j w_j c_j,
the first term being one constant per query.
- Full-corpus scans (a first stage, `int8_top_k`) quantise w too, per query:
  t = max_j |w_j| / 127, c^q = round(w / t), and score t * (c^q . c) + q . o.
  c^q . c is an exact int8 x int8 -> int32 dot product (`int8_dot`, an XLA
  integer matmul with int32 accumulation). On the 2-core AMD CPU this was
  measured on, it runs at about float32 GEMM speed (memory is what int8
  saves there); on an AVX2 Intel core it was 2.5x faster than float32.
- Rescoring a shortlist (a later funnel stage) uses the float query against
  the int8 documents (sentence-transformers' rescoring), w . c + q . o in
  float32, with no query quantisation error.
At m' = m the dequantised documents have norm 1 up to quantisation error and
scores are used as they are; at m' < m they are divided by the norm of the
dequantised m'-prefix, computed once per store and prefix (`Int8Store.inv_norms`).

Search walks the corpus in fixed-size blocks like `search.blocked_top_k`; ties
always go to the lower corpus index. Stage functions for mixed-precision funnels
(`first_stage`, `rerank_stage`) are jitted per (precision, dims, keep), so a
planner that tries many schedules compiles each stage once.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adaptor.data import InputError


# The module, not the `adaptor.search` function that adaptor/__init__.py exports
# under the same name.
search_lib = importlib.import_module("adaptor.search")
aligned_empty = search_lib.aligned_empty

PRECISIONS = ("float32", "int8", "binary")
QUANTISED = ("int8", "binary")
# Rows coded at a time when building or extending a store; bounds the temporaries.
_CODE_ROWS = 65536
# Same grouping as search.blocked_top_k: per-group maxima are one vectorised
# pass, and only the members of the k best groups reach lax.top_k.
_GROUP = search_lib.GROUP
# Gathered shortlist rows per chunk of queries are kept under this many bytes:
# chunks that stay in the L2 cache (and need no fresh pages) were 3-4x faster
# than 64 MiB ones.
_GATHER_BYTES = 2**20
# Largest first-stage block per precision (measured, one AVX2 core, 256
# queries): the Hamming tile [block, queries] should stay in the L2 cache
# (1024 rows: 1 MiB of int32 scores; 1.2x faster than 16384), int8 matmuls
# gain nothing beyond 4096 rows.
_MAX_BLOCK = {"binary": 1024, "int8": 4096}
def check_precision(precision, *, name: str = "precision") -> str:
  if precision not in PRECISIONS:
    raise InputError(f"{name} must be one of {list(PRECISIONS)}, got {precision!r}")
  return precision


def check_store_dims(precision: str, dims, full: int, *, name: str = "dims") -> int:
  """Validates the dims of a store (or of a quantised query prefix)."""
  dims = search_lib.check_dim(dims, full, name=name)
  if precision == "binary" and dims % 8:
    raise InputError(f"{name} of a binary prefix must be a multiple of 8 (sign bits are "
                     f"packed 8 per byte), got {dims}")
  return dims


# ---------------------------------------------------------------- binary


def pack_bits(x) -> jax.Array:
  """Sign bits (x > 0) packed 8 per byte, first coordinate in the top bit.

  The layout of `np.packbits(x > 0, axis=-1)`: a prefix of m' coordinates,
  m' a multiple of 8, is the first m' / 8 bytes.

  Args:
    x: vectors, with shape [..., m].

  Returns:
    uint8 array [..., ceil(m / 8)]; missing bits of a last partial byte are 0.
  """
  x = jnp.asarray(x)
  m = x.shape[-1]
  bits = (x > 0).astype(jnp.uint8)
  pad = -m % 8
  if pad:
    bits = jnp.pad(bits, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  bits = bits.reshape(*x.shape[:-1], -1, 8)
  weights = (1 << jnp.arange(7, -1, -1)).astype(jnp.uint8)
  # Distinct powers of two: the uint8 sum is a bitwise OR and cannot overflow.
  return jnp.sum(bits * weights, axis=-1, dtype=jnp.uint8)


def unpack_bits(packed, dim: int) -> jax.Array:
  """Inverse of `pack_bits`: 0/1 bits [..., dim] (uint8) from packed bytes [..., >= dim / 8]."""
  packed = jnp.asarray(packed, jnp.uint8)
  shifts = jnp.arange(7, -1, -1, dtype=jnp.uint8)
  bits = (packed[..., :, None] >> shifts) & jnp.uint8(1)
  return bits.reshape(*packed.shape[:-1], -1)[..., :dim]


def _words(x):
  """Packed bytes [..., nb] as uint32 words [..., ceil(nb / 4)] (zero-padded).

  Hamming distances only count differing bits, so the byte order inside a
  word does not matter, and zero padding adds nothing.
  """
  pad = -x.shape[-1] % 4
  if pad:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  return jax.lax.bitcast_convert_type(x.reshape(*x.shape[:-1], -1, 4), jnp.uint32)


def _materialised_t(x):
  """x.T [b, a] of a 2-D array, laid out row-major in memory.

  XLA would otherwise make the transpose a layout change and let its
  consumer read x with a stride, one scalar insert per element.
  """
  return jax.lax.optimization_barrier(x.T.reshape(-1)).reshape(x.shape[1], x.shape[0])


def _popcount_sum(words):
  """sum_i popcount(words[i]) (int32) through a carry-save adder tree (Harley-Seal).

  Three words of one weight become their bitwise sum (same weight) and their
  carries (twice the weight) in 5 bitwise operations, so only about one word
  per weight - 5 for 24 words - goes through the costly vector popcount.
  """
  levels = [list(words)]
  for level in levels:
    carries = []
    while len(level) >= 3:
      a, b, c = level.pop(), level.pop(), level.pop()
      u = a ^ b
      level.insert(0, u ^ c)
      carries.append((a & b) | (u & c))
    if len(level) == 2:
      a, b = level.pop(), level.pop()
      level.append(a ^ b)
      carries.append(a & b)
    if carries:
      levels.append(carries)
  total = None
  for weight, level in enumerate(levels):
    for x in level:
      count = jax.lax.population_count(x).astype(jnp.int32) << weight
      total = count if total is None else total + count
  return total


def _hamming_block(q_words_t, doc_bytes):
  """Hamming distances [b, n_q] (int32) between a block of documents and the queries.

  Scores are laid out document-major with the queries along the vector lanes:
  each document word is broadcast against contiguous rows of query words that
  stay in L1 cache, so the corpus block is read once for all queries (with
  documents along the lanes every query would stream the whole block again).

  Args:
    q_words_t: query words, with shape [n_w, n_q] (uint32, from `_words` and
      `_materialised_t`).
    doc_bytes: packed documents, with shape [b, nb] (uint8), nb bytes making
      n_w = ceil(nb / 4) words like the queries'.
  """
  n_w = q_words_t.shape[0]
  docs = _words(doc_bytes)
  return _popcount_sum([docs[:, w, None] ^ q_words_t[w][None, :] for w in range(n_w)])


def _hamming_rows(q_bytes, rows):
  """Hamming distances [r] between one packed query [nb] and packed rows [r, >= nb]."""
  nb = q_bytes.shape[0]
  return jnp.sum(jax.lax.population_count(rows[:, :nb] ^ q_bytes[None, :]), axis=1,
                 dtype=jnp.int32)


def hamming_distances(q_bits, doc_bits) -> jax.Array:
  """All Hamming distances between packed queries and packed documents.

  A pure function (jit-compatible); for large corpora use `hamming_top_k`.

  Args:
    q_bits: packed queries, with shape [n_q, nb] (uint8, see `pack_bits`).
    doc_bits: packed documents, with shape [n_docs, >= nb] (uint8); only the
      first nb bytes are compared (a prefix of nb * 8 bits).

  Returns:
    int32 [n_q, n_docs]: the number of differing bits.
  """
  q_bits = jnp.asarray(q_bits, jnp.uint8)
  doc_bits = jnp.asarray(doc_bits, jnp.uint8)[:, :q_bits.shape[1]]
  return _hamming_block(_materialised_t(_words(q_bits)), doc_bits).T


def hamming_top_k(q_bits, doc_bits, k: int, *, block_size: int):
  """Exact k nearest documents by Hamming distance, walking the corpus in blocks.

  A pure function (jit-compatible with `k` and `block_size` static).

  Args:
    q_bits: packed queries, with shape [n_q, nb] (uint8).
    doc_bits: packed documents, with shape [n_docs, >= nb] (uint8); only the
      first nb bytes of each row are read.
    k: results per query, in [1, n_docs].
    block_size: documents scored at a time, in [1, n_docs].

  Returns:
    (distances, indices): int32 [n_q, k] each, smallest distance first; ties
    go to the lower corpus index.
  """
  q_bits = jnp.asarray(q_bits, jnp.uint8)
  block_q = (_materialised_t(_words(q_bits)), q_bits.shape[1])
  s, i = _top_k_scan(_neg_hamming_block, _neg_hamming_rows, block_q, (q_bits,),
                     (jnp.asarray(doc_bits, jnp.uint8),), k, block_size=block_size)
  return (-s).astype(jnp.int32), i


def _neg_hamming_block(q, docs):
  q_t, nb = q
  # Only the prefix's bytes: past them, the last (padded) word would count store bits.
  return -_hamming_block(q_t, docs[0][:, :nb]).astype(jnp.float32)


def _neg_hamming_rows(q, rows):
  return -_hamming_rows(q[0], rows[0]).astype(jnp.float32)


# ---------------------------------------------------------------- int8


@dataclasses.dataclass(frozen=True, eq=False)
class Int8Calibration:
  """Per-dimension int8 coding x_j ~ offsets[j] + scales[j] * c_j, c_j in [-128, 127].

  Attributes:
    offsets: float32 [m], the value of code 0 in each dimension.
    scales: float32 [m], the value step of one code (> 0).
  """

  offsets: np.ndarray
  scales: np.ndarray

  def __post_init__(self):
    o = np.asarray(self.offsets, np.float32)
    s = np.asarray(self.scales, np.float32)
    if o.ndim != 1 or s.shape != o.shape:
      raise InputError(f"int8 calibration offsets and scales must be two [m] arrays, got "
                       f"shapes {o.shape} and {s.shape}")
    if not (np.all(np.isfinite(o)) and np.all(np.isfinite(s)) and np.all(s > 0)):
      raise InputError("int8 calibration must have finite offsets and finite scales > 0")
    object.__setattr__(self, "offsets", o)
    object.__setattr__(self, "scales", s)

  @property
  def dims(self) -> int:
    return self.offsets.shape[0]

  def quantize(self, x) -> np.ndarray:
    """int8 codes [n, m] of vectors [n, m]; values outside the calibrated range are clipped."""
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != self.dims:
      raise InputError(f"vectors to code must have shape [n, {self.dims}], got {x.shape}")
    return np.clip(np.rint((x - self.offsets) / self.scales), -128, 127).astype(np.int8)

  def dequantize(self, codes) -> np.ndarray:
    """float32 [n, m] values of int8 codes [n, m]."""
    return self.offsets + self.scales * np.asarray(codes, np.float32)


def calibrate_int8(x, *, calibration_rows: int | None = None, key=None) -> Int8Calibration:
  """Per-dimension min/max int8 calibration on a sample of the rows of `x`.

  Args:
    x: vectors, with shape [n, m] (numpy or memmap; float).
    calibration_rows: rows to calibrate on (None: all n). Fewer than n rows
      are evenly spaced over the corpus, or drawn without replacement with
      `key` if one is given.
    key: optional jax.random key for the sample.

  Returns:
    An `Int8Calibration` mapping [min_j, max_j] onto codes [-128, 127]. A
    constant dimension gets scale 1 (all its values code to -128, exactly).
  """
  if getattr(x, "ndim", None) != 2 or x.shape[0] == 0:
    raise InputError(f"calibration vectors must be a non-empty [n, m] array, got shape "
                     f"{getattr(x, 'shape', None)}")
  rows = _sample_rows(x.shape[0], calibration_rows, key)
  sample = np.asarray(x if rows is None else x[rows], np.float32)
  lo, hi = sample.min(axis=0), sample.max(axis=0)
  spread = hi - lo
  scales = np.where(spread > 0, spread / 255.0, 1.0).astype(np.float32)
  return Int8Calibration(offsets=(lo + 128.0 * scales).astype(np.float32), scales=scales)


def quantize_queries(q, offsets, scales):
  """Integer query codes for int8 x int8 scoring (see the module docstring).

  A pure function (jit-compatible).

  Args:
    q: queries, with shape [n_q, m] (float32; normalised at m for cosine).
    offsets: calibration offsets, with shape [>= m].
    scales: calibration scales, with shape [>= m].

  Returns:
    (codes, t, bias): int8 [n_q, m], float32 [n_q], float32 [n_q], such that
    t * (codes . c) + bias approximates q . (offsets + scales * c).
  """
  m = q.shape[1]
  w = q * scales[None, :m]
  amax = jnp.max(jnp.abs(w), axis=1)
  t = jnp.where(amax > 0, amax / 127.0, 1.0)
  codes = jnp.clip(jnp.round(w / t[:, None]), -127, 127).astype(jnp.int8)
  bias = jnp.dot(q, offsets[:m], precision=jax.lax.Precision.HIGHEST)
  return codes, t, bias


def int8_dot(a, b) -> jax.Array:
  """Exact int8 x int8 -> int32 dot products of every row pair.

  A pure function (jit-compatible).

  Args:
    a: int8 codes, with shape [n_a, m].
    b: int8 codes, with shape [n_b, m].

  Returns:
    int32 [n_a, n_b].
  """
  a, b = jnp.asarray(a, jnp.int8), jnp.asarray(b, jnp.int8)
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)


def _int8_block(q, docs):
  codes_q, t, bias = q
  codes, inv = docs
  m = codes_q.shape[1]
  s = t[None, :] * int8_dot(codes[:, :m], codes_q).astype(jnp.float32) + bias[None, :]  # [b, n_q]
  return s if inv is None else s * inv[:, None]


def _int8_rows(q, rows):
  codes_q, t, bias = q
  codes, inv = rows
  m = codes_q.shape[0]
  if codes_q.dtype == jnp.int8:  # A first stage's member rows: the same integer scores.
    dots = jnp.dot(codes[:, :m], codes_q, preferred_element_type=jnp.int32).astype(jnp.float32)
  else:                          # Rescoring: float query x int8 documents.
    dots = jnp.dot(codes[:, :m].astype(jnp.float32), codes_q, precision=jax.lax.Precision.HIGHEST)
  s = t * dots + bias
  return s if inv is None else s * inv


def int8_top_k(q_codes, q_scale, q_bias, codes, k: int, *, block_size: int, inv_norms=None):
  """Exact top-k of int8 x int8 scores, walking the corpus in blocks.

  Scores are q_scale * (q_codes . codes[:, :m]) + q_bias, times inv_norms
  when given (see the module docstring). A pure function (jit-compatible with
  `k` and `block_size` static).

  Args:
    q_codes: int8 query codes, with shape [n_q, m] (`quantize_queries`).
    q_scale: float32 [n_q], the query code step t.
    q_bias: float32 [n_q], q . offsets.
    codes: int8 document codes, with shape [n_docs, >= m]; the first m
      columns are read.
    k: results per query, in [1, n_docs].
    block_size: documents scored at a time, in [1, n_docs].
    inv_norms: optional float32 [n_docs] per-document factors.

  Returns:
    (scores, indices): float32 and int32 [n_q, k], best first; ties go to the
    lower corpus index.
  """
  q = (q_codes, q_scale, q_bias)
  return _top_k_scan(_int8_block, _int8_rows, q, q, (codes, inv_norms), k, block_size=block_size)


# ---------------------------------------------------------------- blocked top-k


def _top_k_scan(score_block, score_rows, block_q, row_q, docs, k: int, *, block_size: int):
  """Exact top-k of any per-(query, document) score, over the corpus in fixed-size blocks.

  Args:
    score_block: fn(block_q, docs_block) -> float32 [b, n_q] scores (higher is
      better) of a block of documents against every query, document-major.
    score_rows: fn(one_query, docs_rows) -> float32 [r]: the same scores for
      one query (`row_q` without its leading axis) and gathered rows.
    block_q: the queries as `score_block` wants them (any pytree).
    row_q: tuple of query arrays with leading axis n_q, for `score_rows`.
    docs: tuple of arrays (or None) with leading axis n_docs.
    k: results per query, in [1, n_docs].
    block_size: documents scored at a time, in [1, n_docs].

  Returns:
    (scores, indices), [n_q, k] each, best first; ties go to the lower index.
  """
  leaves = [a for a in docs if a is not None]
  n_docs, n_q = leaves[0].shape[0], row_q[0].shape[0]
  search_lib.check_k(k, n_docs)
  if not 1 <= block_size <= n_docs:
    raise ValueError(f"block_size must be in [1, {n_docs}] (the corpus size), got {block_size}")
  n_full = n_docs // block_size
  tail = n_full * block_size

  def take(start, size):
    return tuple(None if a is None else jax.lax.dynamic_slice_in_dim(a, start, size) for a in docs)

  if n_docs < _GROUP or block_size % _GROUP:
    # Small corpora (tests) or odd blocks: a running top-k merged block by block.
    def block_top(start, masked_below=None):
      s = score_block(block_q, take(start, block_size)).T
      if masked_below is not None:  # Rows already scored by the block before.
        s = jnp.where(start + jnp.arange(block_size) < masked_below, -jnp.inf, s)
      top, idx = jax.lax.top_k(s, min(k, block_size))
      return top, start + idx.astype(jnp.int32)

    def step(carry, start):
      return search_lib.merge_top_k(*carry, *block_top(start), k), None

    init = (jnp.full((n_q, k), -jnp.inf, jnp.float32), jnp.full((n_q, k), -1, jnp.int32))
    carry, _ = jax.lax.scan(step, init, jnp.arange(n_full, dtype=jnp.int32) * block_size)
    if tail < n_docs:
      # The last block ends at the last row; its overlap with the one before is masked.
      carry = search_lib.merge_top_k(*carry, *block_top(jnp.int32(n_docs - block_size), tail), k)
    return carry

  # Group maxima over the whole corpus, then the members of the k best groups
  # (the argument of search._group_maxima_top_k): the scan does no selection.
  def maxima(s):  # [b, n_q] -> [ceil(b / G), n_q]
    pad = -s.shape[0] % _GROUP
    if pad:  # Only the corpus tail: its last group is short.
      s = jnp.pad(s, ((0, pad), (0, 0)), constant_values=-jnp.inf)
    return s.reshape(-1, _GROUP, n_q).max(axis=1)

  def step(_, start):
    return None, maxima(score_block(block_q, take(start, block_size)))

  _, per_block = jax.lax.scan(step, None, jnp.arange(n_full, dtype=jnp.int32) * block_size)
  parts = [per_block.reshape(-1, n_q)]
  if tail < n_docs:
    parts.append(maxima(score_block(block_q, tuple(None if a is None else a[tail:] for a in docs))))
  group_max = (jnp.concatenate(parts) if len(parts) > 1 else parts[0]).T   # [n_q, n_groups]
  g, bound = search_lib.best_groups(group_max, k)

  def one_query(xs):  # lax.map vmaps this over chunks of queries.
    q, gq, t = xs
    # The short last group's slab is shifted back to end at the last row (see
    # search.top_members).
    starts = jnp.minimum(gq * _GROUP, n_docs - _GROUP)
    slabs = tuple(None if a is None else jax.vmap(
        lambda st, a=a: jax.lax.dynamic_slice_in_dim(a, st, _GROUP))(starts).reshape(
            -1, *a.shape[1:]) for a in docs)
    top, rows = search_lib.top_members(score_rows(q, slabs), starts, gq, t, k, _GROUP)
    return top, rows.astype(jnp.int32)

  row_bytes = sum(int(np.prod(a.shape[1:])) * a.dtype.itemsize for a in leaves)
  chunk = max(1, min(n_q, _GATHER_BYTES // max(1, g.shape[1] * _GROUP * row_bytes)))
  return jax.lax.map(one_query, (row_q, g, bound), batch_size=chunk)


def _rerank(score_rows, queries, docs, candidates, keep: int):
  """Re-scores candidate rows per query and keeps the best `keep` (ties: lower index).

  Args:
    score_rows: as in `_top_k_scan`.
    queries: tuple of arrays with leading axis n_q.
    docs: tuple of arrays (or None) with leading axis n_docs.
    candidates: int32 [n_q, c] corpus rows.
    keep: results kept per query, in [1, c].
  """
  candidates = jnp.sort(candidates, axis=1)  # Ascending: lax.top_k then breaks ties by index.

  def one_query(xs):
    q, cand = xs
    rows = tuple(None if a is None else a[cand] for a in docs)
    top, pos = jax.lax.top_k(score_rows(q, rows), keep)
    return top, cand[pos]

  leaves = [a for a in docs if a is not None]
  row_bytes = sum(int(np.prod(a.shape[1:])) * max(4, a.dtype.itemsize) for a in leaves)
  chunk = max(1, min(candidates.shape[0],
                     _GATHER_BYTES // max(1, candidates.shape[1] * row_bytes)))
  return jax.lax.map(one_query, (queries, candidates), batch_size=chunk)


# ---------------------------------------------------------------- stores


class BinaryStore:
  """Packed sign bits of the first `dims` coordinates of each vector.

  Attributes:
    bits: uint8 [n, dims / 8], 4 KiB aligned.
    dims: the number of coordinates (a multiple of 8).
  """

  precision = "binary"

  def __init__(self, bits: np.ndarray, dims: int):
    if bits.dtype != np.uint8 or bits.ndim != 2 or bits.shape[1] * 8 != dims:
      raise InputError(f"binary store bits must be uint8 [n, {dims // 8}], got "
                       f"{bits.dtype} {bits.shape}")
    self.bits, self.dims = bits, int(dims)
    self._device = None

  @classmethod
  def build(cls, vectors, dims: int) -> "BinaryStore":
    """Packs the signs of vectors[:, :dims] ([n, d] float, dims a multiple of 8 <= d)."""
    dims = check_store_dims("binary", dims, vectors.shape[1])
    return cls(cls._code(vectors, dims, aligned_empty((vectors.shape[0], dims // 8), np.uint8)),
               dims)

  @staticmethod
  def _code(vectors, dims, out):
    for s in range(0, vectors.shape[0], _CODE_ROWS):
      out[s:s + _CODE_ROWS] = np.packbits(np.asarray(vectors[s:s + _CODE_ROWS, :dims]) > 0, axis=1)
    return out

  def extended(self, vectors) -> "BinaryStore":
    """A new store with the rows of `vectors` ([m, d] float) appended."""
    n = self.n
    out = aligned_empty((n + vectors.shape[0], self.dims // 8), np.uint8)
    out[:n] = self.bits
    self._code(vectors, self.dims, out[n:])
    return BinaryStore(out, self.dims)

  @property
  def n(self) -> int:
    return self.bits.shape[0]

  @property
  def nbytes(self) -> int:
    return self.bits.nbytes

  def arrays(self) -> dict[str, np.ndarray]:
    return {"bits": self.bits}

  def device(self):
    if self._device is None:
      self._device = jax.device_put(self.bits)
    return self._device

  def stage_data(self, dim: int):
    """The arrays a funnel stage at prefix `dim` reads (see `first_stage`)."""
    return (self.device(),)

  def __repr__(self):
    return f"BinaryStore(n={self.n}, dims={self.dims})"


class Int8Store:
  """int8 codes of the re-normalised `dims`-prefix of each vector, with their calibration.

  Attributes:
    codes: int8 [n, dims], 4 KiB aligned.
    calibration: the `Int8Calibration` (offsets and scales, [dims] each).
    dims: the prefix length coded.
  """

  precision = "int8"

  def __init__(self, codes: np.ndarray, calibration: Int8Calibration):
    if codes.dtype != np.int8 or codes.ndim != 2 or codes.shape[1] != calibration.dims:
      raise InputError(f"int8 store codes must be int8 [n, {calibration.dims}], got "
                       f"{codes.dtype} {codes.shape}")
    self.codes, self.calibration, self.dims = codes, calibration, calibration.dims
    self._inv_norms: dict[int, np.ndarray] = {}
    self._device = None

  @classmethod
  def build(cls, vectors, dims: int, *, calibration: Int8Calibration | None = None,
            calibration_rows: int | None = None, key=None) -> "Int8Store":
    """Codes truncate(vectors, dims) ([n, d] float), calibrating on them unless given one.

    Args:
      vectors: [n, d] float vectors (an index's full-size vectors).
      dims: the prefix to code, in [1, d].
      calibration: a saved calibration to reuse (its dims must equal `dims`).
      calibration_rows, key: see `calibrate_int8`.
    """
    dims = check_store_dims("int8", dims, vectors.shape[1])
    if calibration is None:
      sample = _prefix_sample(vectors, dims, calibration_rows, key)
      calibration = calibrate_int8(sample)
    elif calibration.dims != dims:
      raise InputError(f"calibration must have dims {dims}, got {calibration.dims}")
    out = aligned_empty((vectors.shape[0], dims), np.int8)
    return cls(cls._code(vectors, calibration, out), calibration)

  @staticmethod
  def _code(vectors, calibration, out):
    dims = calibration.dims
    for s in range(0, vectors.shape[0], _CODE_ROWS):
      x = np.asarray(search_lib.truncate(np.asarray(vectors[s:s + _CODE_ROWS, :dims], np.float32)))
      out[s:s + _CODE_ROWS] = calibration.quantize(x)
    return out

  def extended(self, vectors) -> "Int8Store":
    """A new store with `vectors` ([m, d] float) appended, coded with the saved calibration."""
    n = self.n
    out = aligned_empty((n + vectors.shape[0], self.dims), np.int8)
    out[:n] = self.codes
    self._code(vectors, self.calibration, out[n:])
    return Int8Store(out, self.calibration)

  @property
  def n(self) -> int:
    return self.codes.shape[0]

  @property
  def nbytes(self) -> int:
    return (self.codes.nbytes + self.calibration.offsets.nbytes + self.calibration.scales.nbytes
            + sum(v.nbytes for v in self._inv_norms.values()))

  def arrays(self) -> dict[str, np.ndarray]:
    return {"codes": self.codes,
            "calibration": np.stack([self.calibration.offsets, self.calibration.scales])}

  def inv_norms(self, dim: int) -> np.ndarray:
    """Inverse norms [n] of the dequantised `dim`-prefixes, computed once and kept."""
    dim = search_lib.check_dim(dim, self.dims)
    if dim not in self._inv_norms:
      cal = self.calibration
      out = np.empty(self.n, np.float32)
      for s in range(0, self.n, _CODE_ROWS):
        x = cal.offsets[:dim] + cal.scales[:dim] * self.codes[s:s + _CODE_ROWS, :dim].astype(np.float32)
        sq = np.einsum("ij,ij->i", x, x)
        nonzero = sq > search_lib.NORM_EPS**2
        out[s:s + _CODE_ROWS] = np.where(nonzero, 1.0 / np.sqrt(np.where(nonzero, sq, 1.0)), 0.0)
      self._inv_norms[dim] = out
    return self._inv_norms[dim]

  def device(self):
    if self._device is None:
      self._device = (jax.device_put(self.codes), jnp.asarray(self.calibration.offsets),
                      jnp.asarray(self.calibration.scales))
    return self._device

  def stage_data(self, dim: int):
    """The arrays a funnel stage at prefix `dim` reads (see `first_stage`)."""
    codes, offsets, scales = self.device()
    inv = None if dim == self.dims else jnp.asarray(self.inv_norms(dim))
    return (codes, offsets, scales, inv)

  def __repr__(self):
    return f"Int8Store(n={self.n}, dims={self.dims})"


def _sample_rows(n: int, calibration_rows, key) -> np.ndarray | None:
  """Sorted calibration rows (see `calibrate_int8`); None means all n rows."""
  if calibration_rows is None:
    return None
  rows = search_lib.check_positive(calibration_rows, "calibration_rows")
  if rows >= n:
    return None
  if key is None:
    return np.unique(np.linspace(0, n - 1, rows).round().astype(np.int64))
  return np.sort(np.asarray(jax.random.choice(key, n, (rows,), replace=False)))


def _prefix_sample(vectors, dims, calibration_rows, key):
  """Re-normalised dims-prefixes of the calibration rows (see `calibrate_int8`)."""
  rows = _sample_rows(vectors.shape[0], calibration_rows, key)
  rows = np.arange(vectors.shape[0]) if rows is None else rows
  out = np.empty((len(rows), dims), np.float32)
  for s in range(0, len(rows), _CODE_ROWS):
    part = np.asarray(vectors[rows[s:s + _CODE_ROWS], :dims], np.float32)
    out[s:s + _CODE_ROWS] = np.asarray(search_lib.truncate(part))
  return out


def store_from_arrays(precision: str, dims: int, arrays: dict) -> BinaryStore | Int8Store:
  """Rebuilds a store from its saved arrays (`store.arrays()`)."""
  if precision == "binary":
    return BinaryStore(arrays["bits"], dims)
  cal = arrays["calibration"]
  return Int8Store(arrays["codes"], Int8Calibration(offsets=cal[0], scales=cal[1]))


# ---------------------------------------------------------------- funnel stages


def check_schedule(schedule, full: int, *, n_docs: int | None = None,
                   k: int | None = None) -> tuple[tuple[int, int, str], ...]:
  """Validates a mixed-precision funnel schedule; returns (dim, keep, precision) triples.

  Each stage is (dim, keep) (float32, as in `search.check_schedule`) or
  (dim, keep, precision) with precision in "float32", "int8", "binary". The
  first stage scans the whole corpus; each later stage re-scores the
  survivors of the one before. Keeps never increase, and no stage repeats the
  (dim, precision) of the one before it. A float32-only schedule must also
  satisfy `search.check_schedule` (dims strictly increase). Binary dims are
  multiples of 8.

  Args:
    schedule: e.g. [(256, 400, "binary"), (256, 40, "int8"), (768, 10)].
    full: the vector size d.
    n_docs: if given, the first keep must be at most the corpus size.
    k: if given, the last keep must be at least k.
  """
  if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence) or not schedule:
    raise ValueError(f"schedule must be a non-empty sequence of (dim, keep[, precision]) "
                     f"stages, got {schedule!r}")
  stages = []
  for i, stage in enumerate(schedule):
    if (isinstance(stage, (str, bytes)) or not isinstance(stage, Sequence)
        or len(stage) not in (2, 3)):
      raise ValueError(f"schedule[{i}] must be (dim, keep) or (dim, keep, precision), got {stage!r}")
    precision = "float32" if len(stage) == 2 else check_precision(
        stage[2], name=f"schedule[{i}] precision")
    dim = check_store_dims(precision, stage[0], full, name=f"schedule[{i}] dim")
    keep = search_lib.check_positive(stage[1], f"schedule[{i}] keep")
    stages.append((dim, keep, precision))
  if all(p == "float32" for _, _, p in stages):
    search_lib.check_schedule([(m, c) for m, c, _ in stages], full, n_docs=n_docs, k=k)
    return tuple(stages)
  keeps = [c for _, c, _ in stages]
  if any(a < b for a, b in zip(keeps, keeps[1:])):
    raise ValueError(f"schedule keeps must not increase, got {keeps}")
  for i in range(1, len(stages)):
    if stages[i][0] == stages[i - 1][0] and stages[i][2] == stages[i - 1][2]:
      raise ValueError(f"schedule[{i}] repeats the dim and precision of schedule[{i - 1}] "
                       f"({stages[i][0]}, {stages[i][2]})")
  if n_docs is not None and keeps[0] > n_docs:
    raise ValueError(f"schedule[0] keep must be at most the corpus size {n_docs}, got {keeps[0]}")
  if k is not None and keeps[-1] < k:
    raise ValueError(f"schedule's last keep must be >= k={k}, got {keeps[-1]}")
  return tuple(stages)


def format_schedule(schedule) -> str:
  """The CLI text of a schedule: DIM:KEEP[:PRECISION] stages separated by commas."""
  parts = []
  for stage in schedule:
    m, c = stage[0], stage[1]
    p = stage[2] if len(stage) > 2 else "float32"
    parts.append(f"{m}:{c}" if p == "float32" else f"{m}:{c}:{p}")
  return ",".join(parts)


def parse_schedule(text: str) -> list[tuple]:
  """The inverse of `format_schedule`: "256:400:binary,768:10" -> [(256, 400, "binary"), (768, 10)].

  Raises:
    InputError: `text` is not DIM:KEEP[:PRECISION] stages separated by commas.
  """
  stages = []
  for part in (p.strip() for p in text.split(",")):
    fields = part.split(":")
    try:
      if not part or len(fields) not in (2, 3) or (len(fields) == 3 and fields[2] not in
                                                   PRECISIONS):
        raise ValueError
      stage = (int(fields[0]), int(fields[1])) + tuple(fields[2:])
    except ValueError:
      raise InputError(
          f"expected DIM:KEEP[:PRECISION] stages separated by commas, precision one of "
          f"{list(PRECISIONS)}, like 256:400:binary,256:40:int8,768:10; got {text!r}") from None
    stages.append(stage)
  return stages


def parse_stores(text: str) -> list[tuple[str, int]]:
  """PRECISION:DIMS items separated by commas -> (precision, dims) pairs, e.g. "binary:768,int8:256".

  Raises:
    InputError: `text` is not in that form, or names a precision not in `QUANTISED`.
  """
  out = []
  for part in (p.strip() for p in text.split(",")):
    p, _, m = part.partition(":")
    if p not in QUANTISED or not m.isdigit():
      raise InputError(
          f"expected PRECISION:DIMS items separated by commas, precision one of "
          f"{list(QUANTISED)}, like binary:768,int8:256; got {text!r}")
    out.append((p, int(m)))
  return out


def _prepare_int8_query(q, offsets, scales, dim, *, quantise: bool):
  qn = search_lib.l2_normalize(q[:, :dim].astype(jnp.float32))
  if quantise:
    return quantize_queries(qn, offsets, scales)
  w = qn * scales[None, :dim]
  # With t = 1 and float "codes" w, _int8_rows computes w . c + q . offsets.
  return w, jnp.ones(q.shape[0], jnp.float32), jnp.dot(qn, offsets[:dim],
                                                        precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("precision", "dim", "keep", "block_size"))
def first_stage(queries, data, *, precision: str, dim: int, keep: int, block_size: int):
  """The first funnel stage: exact top-`keep` over the whole corpus at one precision.

  Args:
    queries: adapted queries, with shape [n_q, d] (float32).
    data: the stage's arrays: float32 -> (vectors [n, d], inv_norms [n]);
      int8 -> (codes [n, m], offsets [m], scales [m], inv_norms [n] or None);
      binary -> (bits [n, m / 8],), as given by `Int8Store.stage_data` etc.
    precision: "float32", "int8" or "binary".
    dim: the prefix scored.
    keep: results per query.
    block_size: documents scored at a time.

  Returns:
    (scores, indices) [n_q, keep], best first: cosine (float32, int8) or
    1 - 2 h / dim (binary).
  """
  if precision == "float32":
    corpus, scale = data
    q = search_lib.l2_normalize(queries[:, :dim].astype(jnp.float32))
    return search_lib.blocked_top_k(q, corpus, keep, block_size=block_size, scale=scale)
  if precision == "int8":
    codes, offsets, scales, inv = data
    cq, t, bias = _prepare_int8_query(queries, offsets, scales, dim, quantise=True)
    return int8_top_k(cq, t, bias, codes, keep, block_size=block_size, inv_norms=inv)
  (bits,) = data
  h, idx = hamming_top_k(pack_bits(queries[:, :dim]), bits, keep, block_size=block_size)
  return 1.0 - 2.0 * h.astype(jnp.float32) / dim, idx


@functools.partial(jax.jit, static_argnames=("precision", "dim", "keep"))
def rerank_stage(queries, data, candidates, *, precision: str, dim: int, keep: int):
  """A later funnel stage: re-scores each query's candidates and keeps the best `keep`.

  int8 rescoring is float query x int8 documents (see the module docstring).

  Args:
    queries: adapted queries, with shape [n_q, d] (float32).
    data: the stage's arrays, as for `first_stage`.
    candidates: int32 [n_q, c] corpus rows from the previous stage.
    precision, dim, keep: the stage.

  Returns:
    (scores, indices) [n_q, keep], best first; ties go to the lower index.
  """
  if precision == "float32":
    corpus, scale = data
    q = search_lib.l2_normalize(queries[:, :dim].astype(jnp.float32))
    return search_lib.rerank(q, corpus, candidates, keep, scale=scale)
  if precision == "int8":
    codes, offsets, scales, inv = data
    q = _prepare_int8_query(queries, offsets, scales, dim, quantise=False)
    return _rerank(_int8_rows, q, (codes, inv), candidates, keep)
  (bits,) = data
  s, idx = _rerank(_neg_hamming_rows, (pack_bits(queries[:, :dim]),), (bits,), candidates, keep)
  return 1.0 + 2.0 * s / dim, idx


def funnel(queries, schedule, stage_data, *, k: int, block_size: int, query_batch: int = 256):
  """Runs a checked mixed-precision schedule over adapted queries, a batch at a time.

  Args:
    queries: adapted queries, with shape [n_q, d] (float32 numpy).
    schedule: (dim, keep, precision) triples from `check_schedule`.
    stage_data: fn(precision, dim) -> the arrays of that stage.
    k: results per query (<= the last keep).
    block_size: first-stage block size (<= n_docs); quantised first stages
      use at most _MAX_BLOCK[precision] rows.
    query_batch: queries per batch; the last batch is zero-padded so that
      every batch reuses the compiled stages.

  Returns:
    (scores, indices): float32 and int64... [n_q, k] numpy arrays, best first.
  """
  data = [stage_data(p, m) for m, _, p in schedule]
  query_batch = min(query_batch, queries.shape[0])
  (m1, keep1, p1), rest = schedule[0], schedule[1:]
  block = min(block_size, _MAX_BLOCK.get(p1, block_size))

  def step(q):
    q = jnp.asarray(q)
    s, i = first_stage(q, data[0], precision=p1, dim=m1, keep=keep1, block_size=block)
    for (m, keep, p), d in zip(rest, data[1:]):
      s, i = rerank_stage(q, d, i, precision=p, dim=m, keep=keep)
    return s, i

  return search_lib.run_batches(step, queries, query_batch, k)
