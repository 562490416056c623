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

Scoring plugs into the search core as a `topk.Scorer` (`int8_scorer`,
`binary_scorer`): the same blocked top-k scan and re-ranking as float search,
with ties going to the lower corpus index; adaptor/search.py runs the stages.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from adaptor import topk
from adaptor.checks import check_dim, check_positive
from adaptor.data import InputError
from adaptor.truncation import NORM_EPS, aligned_empty, l2_normalize, truncate

PRECISIONS = ("float32", "int8", "binary")
QUANTISED = ("int8", "binary")
# Rows coded at a time when building or extending a store; bounds the temporaries.
_CODE_ROWS = 65536
# Gathered shortlist rows per chunk of queries are kept under this many bytes
# (counted as in topk.Scorer): chunks that stay in the L2 cache (and need no
# fresh pages) were 3-4x faster than 64 MiB ones.
_GATHER_BYTES = 2**20
# Largest first-stage block per precision (measured, one AVX2 core, 256
# queries): the Hamming tile [block, queries] should stay in the L2 cache
# (1024 rows: 1 MiB of int32 scores; 1.2x faster than 16384), int8 matmuls
# gain nothing beyond 4096 rows.
MAX_BLOCK = {"binary": 1024, "int8": 4096}


def check_precision(precision, *, name: str = "precision") -> str:
  if precision not in PRECISIONS:
    raise InputError(f"{name} must be one of {list(PRECISIONS)}, got {precision!r}")
  return precision


def check_store_dims(precision: str, dims, full: int, *, name: str = "dims") -> int:
  """Validates the dims of a store (or of a quantised query prefix)."""
  dims = check_dim(dims, full, name=name)
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
  """Hamming distances [...] between one packed query [nb] and packed rows [..., >= nb]."""
  nb = q_bytes.shape[0]
  return jnp.sum(jax.lax.population_count(rows[..., :nb] ^ q_bytes), axis=-1, dtype=jnp.int32)


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
  s, i = topk.top_k_scan(binary_scorer(q_bits.shape[1]), _materialised_t(_words(q_bits)), q_bits,
                         (jnp.asarray(doc_bits, jnp.uint8),), k, block_size=block_size)
  return (-s).astype(jnp.int32), i


def binary_scorer(nb: int) -> topk.Scorer:
  """Minus the Hamming distance over the first `nb` bytes, for `topk.top_k_scan` and `topk.rerank`.

  Blocks take the query words from `_materialised_t(_words(q_bits))`, rows
  one packed query [nb]; the documents are (bits [n, >= nb],).
  """

  def block(q_words_t, docs, doc_major):
    # Only the prefix's bytes: past them, the last (padded) word would count store bits.
    s = -_hamming_block(q_words_t, docs[0][:, :nb]).astype(jnp.float32)   # [b, n_q]
    return s if doc_major else s.T

  def rows(q_bytes, gathered):
    return -_hamming_rows(q_bytes, gathered[0]).astype(jnp.float32)

  return topk.Scorer(block=block, rows=rows, cols=(nb,), doc_major=True, group_maxima=True,
                     gather_bytes=_GATHER_BYTES)


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


def int8_scorer(m: int) -> topk.Scorer:
  """t * (q . c) + bias over the first `m` codes, for `topk.top_k_scan` and `topk.rerank`.

  The queries are (codes_q [n_q, m], t [n_q], bias [n_q]): int8 codes from
  `quantize_queries` (exact integer dot products), or float weights with
  t = 1 when re-scoring (see the module docstring); the documents are
  (codes [n, >= m], inv_norms [n] or None).
  """

  def block(q, docs, doc_major):
    codes_q, t, bias = q
    codes, inv = docs
    s = t[None, :] * int8_dot(codes[:, :m], codes_q).astype(jnp.float32) + bias[None, :]  # [b, n_q]
    s = s if inv is None else s * inv[:, None]
    return s if doc_major else s.T

  def rows(q, gathered):
    codes_q, t, bias = q
    codes, inv = gathered
    if codes_q.dtype == jnp.int8:  # A first stage's member rows: the same integer scores.
      dots = jnp.dot(codes[..., :m], codes_q, preferred_element_type=jnp.int32).astype(jnp.float32)
    else:                          # Rescoring: float query x int8 documents.
      dots = jnp.dot(codes[..., :m].astype(jnp.float32), codes_q,
                     precision=jax.lax.Precision.HIGHEST)
    s = t * dots + bias
    return s if inv is None else s * inv

  return topk.Scorer(block=block, rows=rows, cols=(m, None), doc_major=True, group_maxima=True,
                     gather_bytes=_GATHER_BYTES)


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
  return topk.top_k_scan(int8_scorer(q_codes.shape[1]), q, q, (codes, inv_norms), k,
                         block_size=block_size)


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
      x = np.asarray(truncate(np.asarray(vectors[s:s + _CODE_ROWS, :dims], np.float32)))
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
    dim = check_dim(dim, self.dims)
    if dim not in self._inv_norms:
      cal = self.calibration
      out = np.empty(self.n, np.float32)
      for s in range(0, self.n, _CODE_ROWS):
        x = cal.offsets[:dim] + cal.scales[:dim] * self.codes[s:s + _CODE_ROWS, :dim].astype(np.float32)
        sq = np.einsum("ij,ij->i", x, x)
        nonzero = sq > NORM_EPS**2
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
  rows = check_positive(calibration_rows, "calibration_rows")
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
    out[s:s + _CODE_ROWS] = np.asarray(truncate(part))
  return out


def store_from_arrays(precision: str, dims: int, arrays: dict) -> BinaryStore | Int8Store:
  """Rebuilds a store from its saved arrays (`store.arrays()`)."""
  if precision == "binary":
    return BinaryStore(arrays["bits"], dims)
  cal = arrays["calibration"]
  return Int8Store(arrays["codes"], Int8Calibration(offsets=cal[0], scales=cal[1]))


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


def int8_queries(queries, offsets, scales, dim: int, *, quantise: bool):
  """Queries for `int8_scorer(dim)`: their `dim`-prefixes re-normalised, then weighted by the calibration.

  Args:
    queries: adapted queries, with shape [n_q, d] (float32).
    offsets, scales: the store's calibration, [>= dim] each.
    dim: the prefix scored.
    quantise: int8 query codes for a full-corpus scan (`quantize_queries`);
      otherwise float weights with t = 1, for re-scoring a shortlist.

  Returns:
    (codes or weights [n_q, dim], t [n_q], bias [n_q]).
  """
  qn = l2_normalize(queries[:, :dim].astype(jnp.float32))
  if quantise:
    return quantize_queries(qn, offsets, scales)
  w = qn * scales[None, :dim]
  # With t = 1 and float "codes" w, the scorer computes w . c + q . offsets.
  return w, jnp.ones(queries.shape[0], jnp.float32), jnp.dot(qn, offsets[:dim],
                                                              precision=jax.lax.Precision.HIGHEST)
