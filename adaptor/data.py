"""Data I/O and input validation for cached embeddings, ids and relevance judgements.

Every loader ends in `check_embeddings`, so whatever the source (.npy, .npz,
Parquet, a Hugging Face dataset or an array), training and evaluation receive a
2-D float16/float32 array with finite, non-zero rows whose L2 norm float32
normalisation can use (in [1e-12, ~1.8e19]). Every bad input raises
`InputError` with a message that names the argument or path, what was expected
and what was found; the CLI maps it to exit code 2.

Large arrays are never pulled into memory just to be checked: NaN/Inf/zero-row
scans and fingerprints walk the rows in bounded chunks, so a memory-mapped .npy
bigger than RAM can still be validated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import tempfile
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from adaptor.checks import InputError  # Defined with the argument checks; raised all over data I/O.

# Row chunks for scans hold at most this many bytes (and at most _CHUNK_ROWS
# rows), which bounds the temporaries of isnan/isinf on wide arrays too.
_CHUNK_BYTES = 64 * 2**20
_CHUNK_ROWS = 65536
# How many offending row indices or ids an error message lists.
MAX_SHOWN = 5
_QRELS_SPLITS = ("train", "dev", "test")
# Norm bounds of a usable row: `search.l2_normalize` treats norms <= 1e-12
# (its NORM_EPS) as zero, and a float32 squared norm above float32's max is Inf.
_MIN_NORM = 1e-12
_MAX_SQ_NORM = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True, eq=False)
class Embeddings:
  """Validated embeddings with optional ids.

  Attributes:
    vectors: float16 or float32 array, with shape [n, d]; may be a np.memmap.
    ids: n unique, non-empty string ids (row i has id ids[i]), or None.
  """

  vectors: np.ndarray
  ids: list[str] | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class RetrievalData:
  """A corpus, its queries and qrels per split, with ids checked against each other.

  Attributes:
    corpus: document embeddings [n_docs, d] with ids.
    queries: query embeddings [n_queries, d] with ids (all splits together).
    qrels: split name -> {query id: {doc id: graded relevance}}.
  """

  corpus: Embeddings
  queries: Embeddings
  qrels: dict[str, dict[str, dict[str, int]]]

  def split_queries(self, split: str) -> tuple[np.ndarray, list[str], dict[str, dict[str, int]]]:
    """Returns the queries judged in `split`, in query-id order.

    Returns:
      (vectors [n_split, d], ids of those n_split queries, the split's qrels).
    """
    if split not in self.qrels:
      raise InputError(f"split must be one of {sorted(self.qrels)}, got {split!r}")
    judged = self.qrels[split]
    pos = [i for i, q in enumerate(self.queries.ids) if q in judged]
    return np.asarray(self.queries.vectors[pos]), [self.queries.ids[i] for i in pos], judged


# ---------------------------------------------------------------------------
# Arrays


def _row_chunks(n: int, row_bytes: int, chunk_rows: int | None = None) -> Iterator[slice]:
  if chunk_rows is None:
    chunk_rows = max(1, min(_CHUNK_ROWS, _CHUNK_BYTES // max(1, row_bytes)))
  for start in range(0, n, chunk_rows):
    yield slice(start, min(start + chunk_rows, n))


def _describe_rows(count: int, what: str, rows: list[int]) -> str:
  noun = "row" if count == 1 else "rows"
  return f"{count} {noun} {what} (first rows {rows})"


def row_problems(x: np.ndarray, chunk_rows: int | None = None) -> list[str]:
  """Describes the rows of [n, d] `x` with NaN, Inf, all zeros, or a norm normalisation cannot use."""
  counts = {key: [0, 0, []] for key in ("nan", "inf", "zero", "tiny", "huge")}  # rows, values, first

  def note(key, bad_rows, start, n_values):
    idx = np.flatnonzero(bad_rows)
    entry = counts[key]
    entry[0] += idx.size
    entry[1] += n_values
    if len(entry[2]) < MAX_SHOWN:
      entry[2].extend(int(i) + start for i in idx[:MAX_SHOWN - len(entry[2])])

  for sl in _row_chunks(x.shape[0], x.shape[1] * x.itemsize, chunk_rows):
    chunk = np.asarray(x[sl])
    if not np.isfinite(chunk).all():
      nan = np.isnan(chunk)
      if nan.any():
        note("nan", nan.any(axis=1), sl.start, int(nan.sum()))
      inf = np.isinf(chunk)
      if inf.any():
        note("inf", inf.any(axis=1), sl.start, int(inf.sum()))
    # -0.0 counts as zero; NaN is truthy, so a NaN row is never also a zero row.
    zero = ~chunk.any(axis=1)
    if zero.any():
      note("zero", zero, sl.start, 0)
    # Rows are L2-normalised in float32 downstream (`search.l2_normalize`),
    # which returns a zero vector when the squared norm is at most
    # _MIN_NORM**2 or overflows: such a row would silently become the zero
    # vector (or, after the adaptor, the adaptor's image of zero). The squared
    # norm is taken in float64 so this check itself neither under- nor overflows.
    with np.errstate(invalid="ignore"):
      sq = np.einsum("ij,ij->i", chunk, chunk, dtype=np.float64)
      tiny = (sq > 0) & (sq <= _MIN_NORM**2)
      huge = np.isfinite(sq) & (sq > _MAX_SQ_NORM)
    if tiny.any():
      note("tiny", tiny, sl.start, 0)
    if huge.any():
      note("huge", huge, sl.start, 0)

  problems = []
  rows, values, first = counts["nan"]
  if rows:
    problems.append(_describe_rows(rows, f"with NaN ({values} NaN values)", first))
  rows, values, first = counts["inf"]
  if rows:
    problems.append(_describe_rows(rows, f"with Inf ({values} Inf values)", first))
  rows, _, first = counts["zero"]
  if rows:
    problems.append(_describe_rows(rows, "all zeros", first))
  rows, _, first = counts["tiny"]
  if rows:
    problems.append(_describe_rows(
        rows, f"with an L2 norm below {_MIN_NORM:g} (too small to normalise in float32)", first))
  rows, _, first = counts["huge"]
  if rows:
    problems.append(_describe_rows(
        rows, f"with an L2 norm above {np.sqrt(_MAX_SQ_NORM):.3g} (its square overflows float32)",
        first))
  return problems


def _scan_rows(x: np.ndarray, name: str, chunk_rows: int | None = None) -> None:
  """Raises InputError if any row of [n, d] `x` is listed by `row_problems`."""
  problems = row_problems(x, chunk_rows)
  if problems:
    raise InputError(
        f"{name} must have finite, non-zero rows; got " + "; ".join(problems)
        + f" out of {x.shape[0]} rows")


def check_embeddings(
    x,
    *,
    name: str = "embeddings",
    dim: int | None = None,
    allow_float16: bool = True,
) -> np.ndarray:
  """Validates an embedding matrix and returns it as float16/float32.

  float32 (and float16 when `allow_float16`) arrays are returned as they are, so
  a np.memmap stays a memmap; float64 and integer arrays are converted to
  float32 (in memory). The NaN/Inf/zero-row scan walks the rows in chunks; it
  also refuses rows whose L2 norm is below 1e-12 or whose squared norm
  overflows float32, which normalisation would silently turn into zero vectors.

  Args:
    x: embeddings, with shape [n, d], n >= 1 and d >= 1.
    name: what to call `x` in error messages (an argument name or a path).
    dim: required d, or None for any.
    allow_float16: keep float16 as is; otherwise convert it to float32.

  Returns:
    The validated array, with shape [n, d].
  """
  if isinstance(x, (str, os.PathLike)) or type(x).__module__.split(".")[0] == "datasets":
    # A path or a datasets.Dataset, as the README lists among the inputs.
    x = load_embeddings(x, name=name if isinstance(x, (str, os.PathLike)) else None).vectors
  if not isinstance(x, np.ndarray):
    try:
      x = np.asarray(x)
    except (TypeError, ValueError) as e:
      raise InputError(f"{name} must be a 2-D array [n, d], got {type(x).__name__}: {e}") from e
  if x.ndim != 2:
    raise InputError(f"{name} must be 2-D [n, d], got {x.ndim}-D array with shape {x.shape}")
  n, d = x.shape
  if n < 1 or d < 1:
    raise InputError(f"{name} must have at least 1 row and 1 column [n, d], got shape {x.shape}")
  if dim is not None and d != dim:
    raise InputError(f"{name} must have d={dim} columns, got shape {x.shape}")

  kind = x.dtype.kind
  if kind == "f" and x.dtype.itemsize == 2:
    if not allow_float16:
      x = x.astype(np.float32)
  elif kind == "f" and x.dtype.itemsize == 4:
    pass
  elif kind in "fiu":
    # float64 -> float32 may overflow to Inf; the scan below reports it.
    with np.errstate(over="ignore"):
      x = x.astype(np.float32)
  else:
    raise InputError(
        f"{name} must have a real float or integer dtype, got dtype {x.dtype}")
  _scan_rows(x, name)
  return x


def fingerprint(x) -> str:
  """A short, stable hex digest of an array's shape, dtype and bytes.

  Hashes row chunks so a memory-mapped array is never loaded whole. Two arrays
  get the same fingerprint iff they have the same shape, dtype (byte order
  included) and bytes.

  Args:
    x: array of any shape, e.g. embeddings [n, d].

  Returns:
    16 hex characters (the first 64 bits of a sha256).
  """
  if not isinstance(x, np.ndarray):
    x = np.asarray(x)
  if x.dtype.hasobject:
    raise InputError(f"fingerprint needs a numeric array, got dtype {x.dtype}")
  h = hashlib.sha256()
  h.update(f"shape={x.shape};dtype={x.dtype.str};".encode())
  if x.ndim == 0:
    h.update(x.tobytes())
  else:
    row_bytes = x.itemsize * (x.size // x.shape[0] if x.shape[0] else 0)
    for sl in _row_chunks(x.shape[0], row_bytes):
      h.update(np.ascontiguousarray(x[sl]).data)
  return h.hexdigest()[:16]


# ---------------------------------------------------------------------------
# Ids


def load_ids(path) -> list[str]:
  """Reads one id per line; trailing whitespace is stripped, trailing blank lines skipped."""
  path = Path(path)
  text = _read_text(path, "ids file")
  lines = [line.rstrip() for line in text.splitlines()]
  while lines and not lines[-1]:
    lines.pop()
  if not lines:
    raise InputError(f"ids file {path} must hold one id per line, got an empty file")
  for i, line in enumerate(lines):
    if not line:
      raise InputError(f"ids file {path}: line {i + 1} is empty; expected one id per line")
  return lines


def as_id_list(ids, name: str) -> list[str]:
  if isinstance(ids, np.ndarray):
    ids = ids.tolist()
  out = []
  for i, v in enumerate(ids):
    if isinstance(v, str):
      out.append(str(v))
    elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
      out.append(str(int(v)))
    else:
      raise InputError(f"{name}[{i}] must be a str (or int) id, got {type(v).__name__} {v!r}")
  return out


def check_ids(ids: list[str], n: int, name: str, rows_of: str) -> None:
  if len(ids) != n:
    raise InputError(f"{name} must have one id per row of {rows_of} ({n}), got {len(ids)} ids")
  seen: dict[str, int] = {}
  for i, v in enumerate(ids):
    if not v.strip():
      raise InputError(f"{name} must be non-empty strings, got {v!r} at position {i}")
    if v in seen:
      raise InputError(
          f"{name} must be unique, got duplicate id {v!r} at positions {seen[v]} and {i}")
    seen[v] = i


# ---------------------------------------------------------------------------
# Embedding sources


def _read_text(path: Path, what: str) -> str:
  if not path.exists():
    raise InputError(f"{what} {path} does not exist")
  if not path.is_file():
    raise InputError(f"{what} {path} must be a file, got a directory")
  try:
    return path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise InputError(f"{what} {path} could not be read as UTF-8 text: {e}") from e


def _npy_dtype(path: Path):
  """The dtype in a .npy header, or None if the header cannot be read."""
  try:
    with open(path, "rb") as f:
      fmt = np.lib.format
      read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(
          fmt.read_magic(f))
      return None if read is None else read(f)[2]
  except Exception:  # Any failure just means no better message.
    return None


def load_npy(path: Path, mmap: bool) -> np.ndarray:
  try:
    x = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    dtype = _npy_dtype(path)
    if dtype is not None and dtype.hasobject:  # Not corrupt: pickled Python objects.
      raise InputError(
          f"{path} must hold a numeric array, got dtype {dtype} (Python objects, "
          "which are never unpickled)") from e
    raise InputError(
        f"{path} is not a readable .npy array (truncated or corrupt?): {e}") from e
  if not isinstance(x, np.ndarray):
    x.close()
    raise InputError(f"{path} must be a .npy array file, got an .npz archive")
  return x


def load_npz(path: Path, column: str | None) -> np.ndarray:
  try:
    with np.load(path, allow_pickle=False) as z:
      if not isinstance(z, np.lib.npyio.NpzFile):
        raise InputError(f"{path} must be an .npz archive, got a .npy array")
      names = list(z.files)
      if column is None:
        if len(names) != 1:
          raise InputError(
              f"{path} holds {len(names)} arrays {names}; pass column= to pick one")
        column = names[0]
      elif column not in names:
        raise InputError(f"{path} has no array {column!r}; available arrays: {names}")
      return z[column]
  except InputError:
    raise
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise InputError(f"{path} is not a readable .npz archive (truncated or corrupt?): {e}") from e


def _first_true(mask) -> int:
  return int(np.flatnonzero(np.asarray(mask))[0])


def vectors_from_arrow(table, column: str, where: str) -> np.ndarray:
  """[n, d] array from a list<num> or fixed_size_list<num> column of a pyarrow Table."""
  import pyarrow as pa
  import pyarrow.compute as pc

  if column not in table.column_names:
    raise InputError(f"{where} has no column {column!r}; available columns: {table.column_names}")
  col = table.column(column).combine_chunks()
  t = col.type
  if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
    raise InputError(
        f"column {column!r} of {where} must be list<float> or fixed_size_list<float>, got {t}")
  n = len(col)
  if n == 0:
    raise InputError(f"column {column!r} of {where} must have at least 1 row, got 0 rows")
  if col.null_count:
    first = _first_true(col.is_null().to_numpy(zero_copy_only=False))
    raise InputError(
        f"column {column!r} of {where} must have no null rows, got {col.null_count} "
        f"(first at row {first})")
  if pa.types.is_fixed_size_list(t):
    d = t.list_size
  else:
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    d = int(lengths[0])
    ragged = lengths != d
    if ragged.any():
      first = _first_true(ragged)
      raise InputError(
          f"column {column!r} of {where} must have rows of equal length; row 0 has {d} "
          f"values but row {first} has {int(lengths[first])}")
  values = col.flatten()
  if values.null_count:
    raise InputError(
        f"column {column!r} of {where} must have no null values inside rows, "
        f"got {values.null_count}")
  if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
    raise InputError(
        f"column {column!r} of {where} must hold float or integer values, got {t}")
  return values.to_numpy(zero_copy_only=False).reshape(n, d)


def ids_from_arrow(table, ids_column: str, where: str) -> list[str]:
  import pyarrow as pa

  if ids_column not in table.column_names:
    raise InputError(
        f"{where} has no ids column {ids_column!r}; available columns: {table.column_names}")
  col = table.column(ids_column)
  t = col.type
  if pa.types.is_dictionary(t):
    t = t.value_type
  if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)):
    raise InputError(
        f"ids column {ids_column!r} of {where} must hold strings or integers, got {col.type}")
  if col.null_count:
    raise InputError(
        f"ids column {ids_column!r} of {where} must have no nulls, got {col.null_count}")
  return [str(v) for v in col.to_pylist()]


def read_parquet(path: Path, columns: list[str]):
  import pyarrow as pa
  import pyarrow.parquet as pq

  try:
    names = pq.read_schema(path).names
    missing = [c for c in columns if c not in names]
    if missing:
      raise InputError(f"{path} has no column {missing[0]!r}; available columns: {names}")
    return pq.read_table(path, columns=columns)
  except (pa.ArrowException, OSError) as e:
    raise InputError(f"{path} is not a readable Parquet file: {e}") from e


def _is_hf_dataset(obj) -> bool:
  # Only a process that already imported `datasets` can hold one of its objects,
  # so there is no need to pay for the import here.
  if "datasets" not in sys.modules:
    return False
  import datasets
  return isinstance(obj, (datasets.Dataset, datasets.DatasetDict))


def hf_table(ds, columns: list[str], where: str, split: str | None):
  import datasets

  if isinstance(ds, datasets.DatasetDict):
    splits = list(ds.keys())
    if split is None:
      if len(splits) != 1:
        raise InputError(f"{where} is a DatasetDict with splits {splits}; pass split= to pick one")
      split = splits[0]
    elif split not in splits:
      raise InputError(f"{where} has no split {split!r}; available splits: {splits}")
    ds = ds[split]
    where = f"{where}[{split!r}]"
  elif split is not None:
    raise InputError(f"split={split!r} needs a DatasetDict, but {where} is a single Dataset")
  missing = [c for c in columns if c not in ds.column_names]
  if missing:
    raise InputError(f"{where} has no column {missing[0]!r}; available columns: {ds.column_names}")
  # The arrow format honours any indices mapping (select/shuffle), unlike ds.data.
  return ds.select_columns(columns).with_format("arrow")[:], where


def load_embeddings(
    source,
    *,
    column: str | None = None,
    ids=None,
    ids_column: str | None = None,
    name: str | None = None,
    mmap: bool = True,
    split: str | None = None,
) -> Embeddings:
  """Loads and validates embeddings (and their ids) from a file, dataset or array.

  Args:
    source: one of
      - a `.npy` path (memory-mapped when `mmap`);
      - a `.npz` path (the array `column`, or the only array in it);
      - a `.parquet` path (list or fixed_size_list column `column`, default
        "embedding");
      - a directory written by `datasets.Dataset.save_to_disk`, or a
        `datasets.Dataset`/`DatasetDict` (column `column`, default "embedding");
      - an array, with shape [n, d].
    column: which array/column holds the vectors (see above).
    ids: n ids as a sequence of str (ints are converted), or the path of a text
      file with one id per line.
    ids_column: Parquet/dataset column holding the ids (instead of `ids`).
    name: what to call the source in error messages (e.g. the CLI flag); a
      file's path is always named too.
    mmap: memory-map `.npy` files instead of reading them.
    split: the split to use when the dataset is a DatasetDict with several.

  Returns:
    Embeddings with vectors [n, d] (float16/float32) and ids (or None).
  """
  if ids is not None and ids_column is not None:
    raise InputError("pass ids or ids_column, not both")
  ids_list = None
  table_columns = None

  if isinstance(source, (str, os.PathLike)):
    path = Path(source)
    where = f"{name} {path}" if name else str(path)  # e.g. "--corpus data/x.npy"
    suffix = path.suffix.lower()
    if not path.exists():
      raise InputError(f"embeddings path {path} does not exist")
    if path.is_dir():
      table_columns = [column or "embedding"] + ([ids_column] if ids_column else [])
      import datasets
      try:
        ds = datasets.load_from_disk(str(path))
      except (FileNotFoundError, ValueError, OSError) as e:
        raise InputError(
            f"embeddings directory {path} must be a dataset written by "
            f"Dataset.save_to_disk: {e}") from e
      table, where = hf_table(ds, table_columns, where, split)
    elif suffix == ".parquet":
      table_columns = [column or "embedding"] + ([ids_column] if ids_column else [])
      table = read_parquet(path, table_columns)
    elif suffix in (".npy", ".npz"):
      if ids_column is not None:
        raise InputError(f"ids_column needs a Parquet file or dataset, got {suffix} file {path}")
      if suffix == ".npy":
        if column is not None:
          raise InputError(f"column applies to .npz, Parquet and datasets, got .npy file {path}")
        vectors = load_npy(path, mmap)
      else:
        vectors = load_npz(path, column)
    else:
      raise InputError(
          f"embeddings path {path} must be a .npy, .npz or .parquet file or a dataset "
          f"directory, got suffix {path.suffix!r}")
  elif _is_hf_dataset(source):
    where = name or f"dataset ({type(source).__name__})"
    table_columns = [column or "embedding"] + ([ids_column] if ids_column else [])
    table, where = hf_table(source, table_columns, where, split)
  else:
    where = name or "embeddings"
    if column is not None or ids_column is not None:
      raise InputError(
          f"column/ids_column need a file or dataset source, got {type(source).__name__}")
    vectors = source

  if table_columns is not None:
    vectors = vectors_from_arrow(table, table_columns[0], where)
    if ids_column is not None:
      ids_list = ids_from_arrow(table, ids_column, where)

  vectors = check_embeddings(vectors, name=where)
  if ids is not None:
    if isinstance(ids, (str, os.PathLike)):
      ids_list = load_ids(ids)
      ids_name = f"ids file {ids}"
    else:
      ids_list = as_id_list(ids, "ids")
      ids_name = "ids"
  else:
    ids_name = f"ids column {ids_column!r}"
  if ids_list is not None:
    check_ids(ids_list, vectors.shape[0], ids_name, where)
  return Embeddings(vectors=vectors, ids=ids_list)


# ---------------------------------------------------------------------------
# Qrels


def _parse_int(s: str) -> int | None:
  try:
    return int(s)
  except ValueError:
    return None


def load_qrels(path) -> dict[str, dict[str, int]]:
  """Reads graded relevance judgements.

  Accepts BEIR TSV (`query-id<TAB>corpus-id<TAB>score`, with or without a header
  line) and TREC qrels (`qid iter docid rel`, whitespace separated). A first
  line whose score is not an integer is taken as the header.

  Returns:
    {query id: {doc id: relevance}}, in file order.
  """
  path = Path(path)
  text = _read_text(path, "qrels file")
  qrels: dict[str, dict[str, int]] = {}
  n_fields = None
  first = True
  for lineno, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    if "\t" in line:
      fields = [f.strip() for f in line.split("\t")]
    else:
      fields = line.split()
    if len(fields) == 3:
      qid, did, score = fields
    elif len(fields) == 4:
      qid, _, did, score = fields
    else:
      raise InputError(
          f"{path}:{lineno}: expected 3 fields (query-id, corpus-id, score) or 4 "
          f"(qid, iter, docid, rel), got {len(fields)}: {line!r}")
    rel = _parse_int(score)
    if first:
      first = False
      if rel is None and len(fields) == 3:
        continue  # header
    if rel is None:
      raise InputError(f"{path}:{lineno}: score must be an integer, got {score!r}")
    if n_fields is None:
      n_fields = len(fields)
    elif len(fields) != n_fields:
      raise InputError(
          f"{path}:{lineno}: expected {n_fields} fields like the lines before, "
          f"got {len(fields)}: {line!r}")
    if not qid or not did:
      raise InputError(f"{path}:{lineno}: query and document ids must be non-empty: {line!r}")
    judged = qrels.setdefault(qid, {})
    if did in judged and judged[did] != rel:
      raise InputError(
          f"{path}:{lineno}: pair ({qid!r}, {did!r}) judged again with {rel}, "
          f"earlier with {judged[did]}")
    judged[did] = rel
  if not qrels:
    raise InputError(f"qrels file {path} must hold at least one judgement, got none")
  return qrels


def check_qrels(qrels, *, query_ids, doc_ids, name: str = "qrels") -> None:
  """Raises InputError if `qrels` mentions a query or document id not in the given ids."""
  known_q = set(query_ids)
  unknown_q = [q for q in qrels if q not in known_q]
  if unknown_q:
    raise InputError(
        f"{name} has {len(unknown_q)} query ids not in the query ids "
        f"(first: {unknown_q[:MAX_SHOWN]})")
  known_d = set(doc_ids)
  unknown_d = list(dict.fromkeys(d for docs in qrels.values() for d in docs if d not in known_d))
  if unknown_d:
    raise InputError(
        f"{name} has {len(unknown_d)} document ids not in the corpus ids "
        f"(first: {unknown_d[:MAX_SHOWN]})")


def load_beir(root, model: str) -> RetrievalData:
  """Loads a BEIR-style directory with cached embeddings.

  Expects `root/embeddings/<model>/{corpus.npy, corpus_ids.txt, queries.npy,
  query_ids.txt}` and one or more of `root/qrels/{train,dev,test}.tsv`. The
  .npy files are memory-mapped.
  """
  root = Path(root)
  emb = root / "embeddings" / model
  if not emb.is_dir():
    parent = root / "embeddings"
    available = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
    raise InputError(f"model directory {emb} does not exist; available models: {available}")
  corpus = load_embeddings(emb / "corpus.npy", ids=emb / "corpus_ids.txt")
  queries = load_embeddings(emb / "queries.npy", ids=emb / "query_ids.txt")
  if corpus.vectors.shape[1] != queries.vectors.shape[1]:
    raise InputError(
        f"{emb}: queries must have the corpus width d={corpus.vectors.shape[1]}, "
        f"got d={queries.vectors.shape[1]}")
  qrels = {}
  for split in _QRELS_SPLITS:
    path = root / "qrels" / f"{split}.tsv"
    if path.exists():
      qrels[split] = load_qrels(path)
      check_qrels(qrels[split], query_ids=queries.ids, doc_ids=corpus.ids, name=str(path))
  if not qrels:
    raise InputError(
        f"{root / 'qrels'} must hold at least one of "
        f"{[s + '.tsv' for s in _QRELS_SPLITS]}, found none")
  return RetrievalData(corpus=corpus, queries=queries, qrels=qrels)


def current_umask() -> int:
  """The process's file-mode creation mask, read without changing it where possible.

  Linux shows it in /proc/self/status; elsewhere it is set and restored at
  once (os.umask offers nothing else), which another thread could race with.
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def temp_file(folder, *, prefix: str, suffix: str = "") -> tuple[int, str]:
  """`tempfile.mkstemp` in `folder`, with the mode `open` would give (0666 minus the umask).

  mkstemp makes files owner-only (0600) whatever the umask; a temporary file
  renamed into place would make every output owner-only.

  Returns:
    (open file descriptor, path).
  """
  fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
  try:
    os.fchmod(fd, 0o666 & ~current_umask())
  except BaseException:
    os.close(fd)
    os.remove(path)
    raise
  return fd, path


def temp_dir(folder, *, prefix: str) -> str:
  """`tempfile.mkdtemp` in `folder`, with the mode `mkdir` would give (0777 minus the umask)."""
  path = tempfile.mkdtemp(prefix=prefix, dir=folder)
  try:
    os.chmod(path, 0o777 & ~current_umask())
  except BaseException:
    os.rmdir(path)
    raise
  return path


def _inside(path, folder) -> bool:
  real = os.path.realpath(folder)
  return os.path.realpath(path).startswith(real + os.sep)


def member_path(folder, name, *, what: str) -> Path:
  """`folder / name` for a file name read from a metadata file, or InputError.

  A manifest, index.json or config.json is data from disk, not trusted code:
  a name that is absolute, holds a separator or `..`, or that is a symlink
  resolving outside `folder`, would make a loader read (or a rerun delete)
  a file that is not part of the output. It is refused.

  Args:
    folder: the folder the metadata describes.
    name: the file name it lists.
    what: the metadata file, for the message (e.g. "dir/manifest.json").
  """
  if (not isinstance(name, str) or not name or name in (".", "..") or os.path.isabs(name)
      or "/" in name or "\\" in name or os.sep in name):
    raise InputError(f"{what}: expected a plain file name inside {folder}, got {name!r}")
  path = Path(folder) / name
  if os.path.lexists(path) and not _inside(path, folder):
    raise InputError(f"{what}: expected {path} inside {folder}, found a link to "
                     f"{os.path.realpath(path)}")
  return path


def links_leaving(folder) -> list[str]:
  """Every symlink under `folder` that resolves outside it (a checkpoint or index must not)."""
  out = []
  for dirpath, dirnames, filenames in os.walk(folder):
    for name in dirnames + filenames:
      p = os.path.join(dirpath, name)
      if os.path.islink(p) and not _inside(p, folder):
        out.append(p)
  return out


def check_output(path, *, name: str, overwrite: bool, members=(), hint: str = "overwrite=True"):
  """Refuses, before any work, an output that exists (unless `overwrite`) or cannot be written.

  Every writing command calls this first, so that an existing result is
  never replaced silently and an unwritable folder is found before the work
  that would fill it, not after.

  Args:
    path: the output file or folder.
    name: what names it in messages, e.g. "--out".
    overwrite: whether an existing output may be replaced.
    members: for a folder output that may exist (e.g. eval's --out), the
      files in it that the command writes; only those count as existing.
    hint: how to allow the replacement (the CLI words overwrite=True as --overwrite).
  """
  path = Path(path)
  if members:
    existing = [str(path / m) for m in members if (path / m).exists()]
  elif path.is_dir():
    existing = [str(path)] if any(path.iterdir()) else []
  else:
    existing = [str(path)] if path.exists() or path.is_symlink() else []
  if existing and not overwrite:
    raise InputError(f"{name} {path}: expected a new output, found an existing "
                     f"{', '.join(existing)}; pass {hint} to replace it")
  folder = path if (members or path.is_dir()) else path.parent
  folder = Path(os.path.abspath(folder))
  while not folder.exists():  # What the command's makedirs would create entries in.
    folder = folder.parent
  if not folder.is_dir():
    raise InputError(f"{name} {path}: expected a folder at {folder}, found a file")
  try:
    fd, probe = temp_file(folder, prefix=".probe-")
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise InputError(f"{name} {path}: could not write in {folder}: {e.strerror or e}") from None


def fsync_dir(path) -> None:
  """Makes the renames and creations inside the folder `path` durable (a no-op off POSIX)."""
  if os.name == "posix":  # Directories cannot be opened for fsync on Windows.
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


@contextlib.contextmanager
def atomic_file(path, mode: str = "w"):
  """Yields a temporary file beside `path`; on success it is fsynced and renamed onto `path`.

  A failure (or a kill) at any moment leaves `path` as it was, never half written,
  and removes the temporary file unless the process was killed.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = temp_file(folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
  try:
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
