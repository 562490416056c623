"""Apache Beam: apply a fitted adaptor to sharded embeddings with `RunInference`.

    python -m adaptor.beam --checkpoint checkpoints/scifact --inputs 'shards/*.npy' \
        --output out/ --dim 64 --dtype float16 [--runner=DataflowRunner ...]

The pipeline is read -> apply -> write:

- `ReadEmbeddings` matches the inputs (`.npy` shards, or Parquet files with an
  embedding column and optionally an ids column), reads only their headers at
  construction, and splits every file into row ranges (Parquet: row groups) so
  that one large file is read by many workers. Each range is read with one
  ranged read through Beam's `FileSystems` (so gs://, s3:// and hdfs:// work;
  a memmap would only work for local files) and emitted row by row as
  `((file, row), vector)`, or `((file, row, id), vector)` with an ids column.
- `ApplyAdaptor` is `RunInference` with a `KeyedModelHandler` around
  `AdaptorModelHandler`, which loads the checkpoint once per worker process and
  applies it to the batches Beam forms.
- `WriteEmbeddings` writes one output per input file, named like it, rows in
  input order:

      OUTPUT/<input file name>.npy      [rows, dim] array, row i = input row i
      OUTPUT/<input file name>.parquet  ids column (if any, as strings) and the
                                        embedding column as fixed_size_list<dim>
      OUTPUT/manifest.json              written last: the inputs, outputs and
                                        row counts, the checkpoint, dim, dtype

  Rows are first grouped into row-range parts under OUTPUT/.parts/ (so no
  worker holds a whole file), then each file is concatenated from its parts and
  written atomically; .parts/ is removed once every file is written. A file
  present without an up-to-date manifest.json is from an unfinished run.

Results are bitwise those of `Adaptor.apply(rows, dim=, dtype=, batch_size=B)`
for the handler's batch size B: Beam's batches vary in size, and XLA's matmuls
may round a row differently in a batch of another size, so every batch is
padded to exactly B rows before it reaches the device (as `apply` pads its
last batch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

try:
  import apache_beam as beam
  from apache_beam.io.filesystem import CompressionTypes
  from apache_beam.io.filesystems import FileSystems
  from apache_beam.ml.inference.base import (
    KeyedModelHandler,
    ModelHandler,
    PredictionResult,
    RunInference,
  )
  from apache_beam.options.pipeline_options import PipelineOptions
except ImportError as e:
  raise ImportError(
      "adaptor.beam needs Apache Beam, which is not installed: "
      "pip install 'matryoshka-adaptor[beam]'") from e

import numpy as np

from adaptor._version import __version__
from adaptor.api import Adaptor, load
from adaptor.checkpoint import CheckpointError
from adaptor.data import (
  InputError,
  ids_from_arrow,
  vectors_from_arrow,
  atomic_file,
  check_embeddings,
)
from adaptor.model import apply_adaptor
from adaptor.checks import check_dim, check_positive

DTYPES = ("float32", "float16")
_KINDS = {".npy": "npy", ".parquet": "parquet"}
_PARTS = ".parts"
_MANIFEST = "manifest.json"
ROWS_PER_SPLIT = 65536
BATCH_SIZE = 512


# ---------------------------------------------------------------------------
# Files, through Beam's FileSystems so that remote paths work too


def _is_local(path: str) -> bool:
  return FileSystems.get_scheme(path) is None


def _open(path: str):
  # UNCOMPRESSED: AUTO would guess from the suffix, and ranged reads need the raw bytes.
  return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


@contextlib.contextmanager
def _create(path: str):
  """A binary file to write `path` with; readers never see it half written."""
  if _is_local(path):
    with atomic_file(path, "wb") as f:
      yield f
  else:
    # Closing a remote file publishes it even after a failed write, so the bytes
    # go to a temporary name that is renamed only once they are all written.
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    f = FileSystems.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED)
    try:
      try:
        yield f
      finally:
        f.close()
      FileSystems.rename([tmp], [path])
    except BaseException:
      if FileSystems.exists(tmp):
        FileSystems.delete([tmp])
      raise


def _delete_stale_temporaries(output: str) -> None:
  """Removes the temporary files of a killed run's writes (see `_create`) from `output`."""
  if _is_local(output):
    stale = glob.glob(os.path.join(glob.escape(output), ".tmp-*"))
  else:
    stale = _match_paths(FileSystems.join(output, "*.tmp-*"))
  if stale:
    FileSystems.delete(stale)


def _match_paths(pattern: str) -> list[str]:
  return [m.path for m in FileSystems.match([pattern])[0].metadata_list]


def _delete_tree(path: str) -> None:
  if _is_local(path):
    shutil.rmtree(path, ignore_errors=True)
    return
  found = _match_paths(FileSystems.join(path, "**"))
  if found:
    FileSystems.delete(found)


@contextlib.contextmanager
def _local_checkpoint(checkpoint: str):
  """Yields a local directory holding `checkpoint` (copied first if it is remote)."""
  checkpoint = os.fspath(checkpoint)
  if _is_local(checkpoint):
    yield checkpoint
    return
  root = checkpoint.rstrip("/")
  found = _match_paths(root + "/**")
  if not found:
    raise CheckpointError(f"{checkpoint}: expected a checkpoint directory, found no files under it")
  with tempfile.TemporaryDirectory(prefix="adaptor-ckpt-") as tmp:
    for path in found:
      local = os.path.join(tmp, *path[len(root) + 1:].split("/"))
      os.makedirs(os.path.dirname(local), exist_ok=True)
      with _open(path) as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst)
    yield tmp


def _load(checkpoint: str) -> Adaptor:
  with _local_checkpoint(checkpoint) as local:
    return load(local)


def _check_dtype(dtype) -> str:
  try:
    name = np.dtype(dtype).name
  except TypeError:
    name = None
  if name not in DTYPES:
    raise InputError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
  return name


def _check_out_dim(dim, d_out: int) -> int:
  if dim is None:
    return d_out
  try:
    return check_dim(dim, d_out, name="dim")
  except (TypeError, ValueError) as e:
    raise InputError(f"{e} (the adaptor's d_out)") from None


# ---------------------------------------------------------------------------
# Inference


class AdaptorModelHandler(ModelHandler[np.ndarray, Any, Adaptor]):
  """Applies a saved adaptor to batches of embeddings in Beam's `RunInference`.

  Each element is one embedding, a 1-D array [d_in]; each output is its adapted
  vector [dim] (unit norm, `dtype`), or a `PredictionResult(example, inference,
  model_id=checkpoint)` with `prediction_result=True`. Wrap it in
  `KeyedModelHandler` to carry keys, as `ApplyAdaptor` does.

  Args:
    checkpoint: directory written by `Adaptor.save`; any path Beam's FileSystems
      can read (remote ones are copied to a temporary directory to load).
    dim: output prefix length (default the adaptor's d_out).
    dtype: "float32" or "float16" output.
    batch_size: rows per device call. Beam batches up to this many elements and
      each batch is padded to exactly this size, so results do not depend on
      how Beam grouped the elements.
    prediction_result: emit `PredictionResult`s instead of bare arrays.
  """

  def __init__(self, checkpoint, *, dim: int | None = None, dtype="float32",
               batch_size: int = BATCH_SIZE, prediction_result: bool = False):
    batch_size = check_positive(batch_size, "batch_size")
    if dim is not None:
      check_positive(dim, "dim")  # Its upper bound, d_out, is known once the model is loaded.
    # min == max: a batch below the padded size wastes device work, so Beam should
    # only emit a smaller one at the end of a bundle.
    super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
    self._checkpoint = os.fspath(checkpoint)
    self._dim = dim
    self._dtype = _check_dtype(dtype)
    self._batch_size = batch_size
    self._prediction_result = prediction_result

  def load_model(self) -> Adaptor:
    """Loads the adaptor; RunInference calls this once per worker process."""
    model = _load(self._checkpoint)
    _check_out_dim(self._dim, model.d_out)
    return model

  def run_inference(self, batch: Sequence[np.ndarray], model: Adaptor,
                    inference_args: dict[str, Any] | None = None) -> Iterable[Any]:
    """Adapts a batch of embeddings.

    Args:
      batch: n embeddings, each with shape [d_in].
      model: the loaded adaptor.
      inference_args: unused; must be empty.

    Returns:
      n arrays with shape [dim] (or PredictionResults holding them), in batch order.
    """
    name = f"batch of {len(batch)} embeddings given to AdaptorModelHandler"
    for i, v in enumerate(batch):
      shape = np.shape(v)
      if shape != (model.d_in,):
        raise InputError(
            f"{name}: each element must be a vector of shape ({model.d_in},) (the adaptor's "
            f"d_in), got shape {shape} at position {i}")
    x = check_embeddings(np.stack([np.asarray(v) for v in batch]), name=name, dim=model.d_in)
    out = _apply_padded(model, x, dim=self._dim, dtype=self._dtype, batch_size=self._batch_size)
    if self._prediction_result:
      return [PredictionResult(e, y, model_id=self._checkpoint) for e, y in zip(batch, out)]
    return list(out)

  def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
    # The base class pickles the whole batch just to measure it.
    return sum(np.asarray(v).nbytes for v in batch)

  def get_metrics_namespace(self) -> str:
    return "matryoshka_adaptor"

  def share_model_across_processes(self) -> bool:
    # An adaptor is a few MB: a copy per process is cheaper than sending every
    # batch to a shared process and back.
    return False

  def validate_inference_args(self, inference_args: dict[str, Any] | None) -> None:
    if inference_args:
      raise InputError(f"AdaptorModelHandler takes no inference_args, got {sorted(inference_args)}")


def _apply_padded(model: Adaptor, x: np.ndarray, *, dim, dtype, batch_size: int) -> np.ndarray:
  """`model.apply` with every device call on exactly `batch_size` rows.

  Args:
    model: the adaptor.
    x: validated embeddings, with shape [n, d_in].
    dim, dtype: as for `Adaptor.apply`.
    batch_size: rows per device call; shorter pieces are zero-padded to it.

  Returns:
    np.ndarray [n, dim].
  """
  pieces = []
  for start in range(0, len(x), batch_size):
    part = x[start:start + batch_size]
    m = len(part)
    # apply_adaptor shrinks its batch to n when n < batch_size; padding first keeps
    # the compiled shape, and so the rounding, the same as for a full batch.
    part = np.pad(part, ((0, batch_size - m), (0, 0)))
    out = apply_adaptor(model.module, part, dim=dim, dtype=dtype, batch_size=batch_size)
    pieces.append(out[:m])
  return np.concatenate(pieces)


class ApplyAdaptor(beam.PTransform):
  """`(key, embedding [d_in])` -> `(key, adapted vector [dim])` with RunInference.

  Args:
    checkpoint: directory written by `Adaptor.save` (local or remote).
    dim, dtype, batch_size: as for `AdaptorModelHandler`.
  """

  def __init__(self, checkpoint, *, dim: int | None = None, dtype="float32",
               batch_size: int = BATCH_SIZE):
    super().__init__()
    self._handler = KeyedModelHandler(
        AdaptorModelHandler(checkpoint, dim=dim, dtype=dtype, batch_size=batch_size))

  def expand(self, pcoll):
    return pcoll | "RunInference" >> RunInference(self._handler)


# ---------------------------------------------------------------------------
# Reading


@dataclasses.dataclass(frozen=True)
class Shard:
  """One input file, as `ReadEmbeddings` found it from its header.

  Attributes:
    path: the matched path.
    kind: "npy" or "parquet".
    rows: number of rows.
    d: embedding size, or None where the header does not tell (Parquet list columns).
    dtype: the .npy dtype (as `np.dtype.str`), or None for Parquet.
    offset: byte offset of the .npy data, or 0 for Parquet.
    row_groups: rows per Parquet row group, or () for .npy.
  """

  path: str
  kind: str
  rows: int
  d: int | None
  dtype: str | None = None
  offset: int = 0
  row_groups: tuple[int, ...] = ()


def _npy_shard(path: str, d_in: int | None) -> Shard:
  with _open(path) as f:
    try:
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
      elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
      else:
        # Version 3 exists only for structured dtypes with non-ASCII field names.
        raise InputError(f"{path} must be a .npy file of version 1.0 or 2.0, got {version}")
    except ValueError as e:
      raise InputError(f"{path} is not a readable .npy array (truncated or corrupt?): {e}") from e
    offset = f.tell()
  if len(shape) != 2:
    raise InputError(f"{path} must hold a 2-D array [n, d], got shape {shape}")
  if fortran and shape[0] > 1 and shape[1] > 1:
    raise InputError(f"{path} must be stored in C (row-major) order, got Fortran order")
  if dtype.kind not in "fiu":
    raise InputError(f"{path} must hold a real float or integer array, got dtype {dtype}")
  if shape[0] < 1:
    raise InputError(f"{path} must have at least 1 row, got shape {shape}")
  if d_in is not None and shape[1] != d_in:
    raise InputError(f"{path} must have d={d_in} columns (the adaptor's d_in), got shape {shape}")
  return Shard(path, "npy", int(shape[0]), int(shape[1]), dtype.str, offset)


def _parquet_shard(path: str, column: str, ids_column: str | None, d_in: int | None) -> Shard:
  import pyarrow as pa
  import pyarrow.parquet as pq

  with _open(path) as f:
    try:
      meta = pq.ParquetFile(f).metadata
    except (pa.ArrowException, OSError) as e:
      raise InputError(f"{path} is not a readable Parquet file: {e}") from e
    schema = meta.schema.to_arrow_schema()
  for c in [column] + ([ids_column] if ids_column else []):
    if c not in schema.names:
      raise InputError(f"{path} has no column {c!r}; available columns: {schema.names}")
  if meta.num_rows < 1:
    raise InputError(f"{path} must have at least 1 row, got 0")
  t = schema.field(column).type
  d = t.list_size if pa.types.is_fixed_size_list(t) else None
  if d is not None and d_in is not None and d != d_in:
    raise InputError(
        f"column {column!r} of {path} must hold vectors of d={d_in} (the adaptor's d_in), got {t}")
  groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
  return Shard(path, "parquet", int(meta.num_rows), d, row_groups=groups)


def find_shards(inputs, *, column: str = "embedding", ids_column: str | None = None,
                d_in: int | None = None) -> list[Shard]:
  """Matches input globs and reads each file's header.

  Args:
    inputs: a glob or a list of globs (any Beam filesystem) of .npy/.parquet files.
    column, ids_column: the Parquet columns of the vectors and (optional) ids.
    d_in: if given, the embedding size every file must have.

  Returns:
    The shards, sorted by path.
  """
  patterns = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
  if not patterns:
    raise InputError("inputs must name at least one glob, got none")
  paths = set()
  for pattern in map(os.fspath, patterns):
    found = FileSystems.match([pattern])[0].metadata_list
    if not found:
      raise InputError(f"inputs pattern {pattern!r} matches no files")
    paths.update(m.path for m in found)
  shards = []
  for path in sorted(paths):
    kind = _KINDS.get(os.path.splitext(path)[1].lower())
    if kind is None:
      raise InputError(f"input {path} must be a .npy or .parquet file, got suffix "
                       f"{os.path.splitext(path)[1]!r}")
    if kind == "npy":
      shards.append(_npy_shard(path, d_in))
    else:
      shards.append(_parquet_shard(path, column, ids_column, d_in))
  return shards


@dataclasses.dataclass(frozen=True)
class _Range:
  shard: Shard
  start: int
  stop: int
  row_group: int | None = None


def _ranges(shard: Shard, rows_per_split: int) -> list[_Range]:
  if shard.kind == "parquet":
    # Row groups are Parquet's unit of reading; splitting one would read it twice.
    out, start = [], 0
    for i, n in enumerate(shard.row_groups):
      if n:
        out.append(_Range(shard, start, start + n, i))
      start += n
    return out
  return [_Range(shard, s, min(s + rows_per_split, shard.rows))
          for s in range(0, shard.rows, rows_per_split)]


def _read_range(r: _Range, column: str, ids_column: str | None,
                d_in: int | None) -> Iterator[tuple[tuple, np.ndarray]]:
  shard = r.shard
  where = f"{shard.path}[{r.start}:{r.stop}]"
  ids = None
  if shard.kind == "npy":
    dtype = np.dtype(shard.dtype)
    size = (r.stop - r.start) * shard.d * dtype.itemsize
    with _open(shard.path) as f:
      f.seek(shard.offset + r.start * shard.d * dtype.itemsize)
      data = f.read(size)
    if len(data) != size:
      raise InputError(f"{where}: expected {size} bytes of rows, got {len(data)} (file truncated?)")
    x = np.frombuffer(data, dtype).reshape(r.stop - r.start, shard.d)
  else:
    import pyarrow.parquet as pq

    with _open(shard.path) as f:
      table = pq.ParquetFile(f).read_row_group(
          r.row_group, columns=[column] + ([ids_column] if ids_column else []))
    x = vectors_from_arrow(table, column, where)
    if ids_column:
      ids = ids_from_arrow(table, ids_column, where)
  x = check_embeddings(x, name=where, dim=d_in)
  for i in range(len(x)):
    key = (shard.path, r.start + i) if ids is None else (shard.path, r.start + i, ids[i])
    # A copy, so that a row held downstream does not keep its whole range alive.
    yield key, np.array(x[i])


class ReadEmbeddings(beam.PTransform):
  """Reads embedding files as `((file, row), vector [d])` elements.

  With `ids_column` (Parquet), keys are `(file, row, id)`. Files are matched and
  their headers read when the transform is built, so a missing file or a wrong
  d fails before the pipeline starts; `self.shards` lists them.

  Args:
    inputs: a glob or a list of globs of .npy and/or .parquet files.
    column: the Parquet column of the vectors (list or fixed_size_list).
    ids_column: optional Parquet column of row ids (strings or ints).
    rows_per_split: rows per read of a .npy file (Parquet reads row groups).
    d_in: if given, the embedding size every file must have.
  """

  def __init__(self, inputs, *, column: str = "embedding", ids_column: str | None = None,
               rows_per_split: int = ROWS_PER_SPLIT, d_in: int | None = None):
    super().__init__()
    self._column = column
    self._ids_column = ids_column
    self._rows_per_split = check_positive(rows_per_split, "rows_per_split")
    self._d_in = d_in
    self.shards = find_shards(inputs, column=column, ids_column=ids_column, d_in=d_in)

  def expand(self, pbegin):
    ranges = [r for s in self.shards for r in _ranges(s, self._rows_per_split)]
    return (
        pbegin
        | "Ranges" >> beam.Create(ranges)
        # Spreads the ranges over workers; otherwise one worker might read them all.
        | "Spread" >> beam.Reshuffle()
        | "Read" >> beam.FlatMap(_read_range, self._column, self._ids_column, self._d_in))


# ---------------------------------------------------------------------------
# Writing


def output_path(output: str, path: str) -> str:
  """Where `WriteEmbeddings` writes the results for input file `path`."""
  return FileSystems.join(output, FileSystems.split(path)[1])


def _check_outputs(output: str, paths: Iterable[str]) -> None:
  seen = {}
  for path in paths:
    out = output_path(output, path)
    if out in seen:
      raise InputError(
          f"inputs {seen[out]} and {path} have the same file name; outputs are named after "
          f"their inputs, so both would be written to {out}")
    same = os.path.abspath(out) == os.path.abspath(path) if _is_local(out) else out == path
    if same:
      raise InputError(f"output {output} must differ from the folder of input {path}, which "
                       "would be overwritten")
    seen[out] = path


def _part_path(output: str, path: str, chunk: int) -> str:
  name = FileSystems.split(path)[1]
  return FileSystems.join(output, _PARTS, name, f"{chunk:09d}{os.path.splitext(name)[1]}")


def _write_npy_to(f, x: np.ndarray) -> None:
  np.lib.format.write_array_header_2_0(
      f, {"descr": np.lib.format.dtype_to_descr(x.dtype), "fortran_order": False, "shape": x.shape})
  f.write(np.ascontiguousarray(x).tobytes())


def _table(vectors: np.ndarray, ids, column: str, ids_column: str | None):
  import pyarrow as pa

  emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])
  cols = {ids_column: pa.array(ids, pa.string())} if ids_column else {}
  return pa.table({**cols, column: emb})


def _by_part(element, rows_per_split: int):
  """`((file, row[, id]), vector)` -> `((file, part), (row, id or None, vector))`."""
  key, vector = element
  return (key[0], key[1] // rows_per_split), (key[1], key[2] if len(key) > 2 else None, vector)


def _write_part(item, output: str, column: str, ids_column: str | None):
  """Writes one row range of one file; returns `(file, (chunk, first row, rows, part))`."""
  import pyarrow.parquet as pq

  (path, chunk), rows = item
  rows = sorted(rows, key=lambda r: r[0])
  vectors = np.stack([v for _, _, v in rows])
  part = _part_path(output, path, chunk)
  # Deterministic name and atomic write: a retried bundle rewrites the same bytes.
  with _create(part) as f:
    if part.endswith(".npy"):
      _write_npy_to(f, vectors)
    else:
      ids = [i for _, i, _ in rows] if ids_column else None
      pq.write_table(_table(vectors, ids, column, ids_column), f)
  return path, (chunk, rows[0][0], len(rows), part)


def _write_file(item, output: str, expected_rows: dict[str, int] | None) -> dict:
  """Concatenates the parts of one file, in row order, into its output."""
  import pyarrow.parquet as pq

  path, parts = item
  parts = sorted(parts)
  total = 0
  for _, first, n, _ in parts:
    if first != total:
      raise RuntimeError(f"{path}: expected adapted rows from {total} on, got rows from {first}")
    total += n
  expected = None if expected_rows is None else expected_rows.get(path)
  if expected is not None and total != expected:
    raise RuntimeError(f"{path}: expected {expected} adapted rows, got {total}")
  out = output_path(output, path)
  with _create(out) as f:
    if out.endswith(".npy"):
      first = _read_npy(parts[0][3])
      shape = (total, first.shape[1])
      np.lib.format.write_array_header_2_0(
          f, {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False,
              "shape": shape})
      # Streams the parts, so a file is never held in memory whole.
      for i, (_, _, _, part) in enumerate(parts):
        f.write((first if i == 0 else _read_npy(part)).tobytes())
    else:
      writer = None
      for _, _, _, part in parts:
        with _open(part) as pf:
          table = pq.read_table(pf)
        writer = writer or pq.ParquetWriter(f, table.schema)
        writer.write_table(table)
      writer.close()
  return {"input": path, "output": out, "rows": total}


def _read_npy(path: str) -> np.ndarray:
  with _open(path) as f:
    return np.load(io.BytesIO(f.read()), allow_pickle=False)


def _finish(files: list[dict], output: str, metadata: dict) -> dict:
  manifest = {**metadata, "files": sorted(files, key=lambda e: e["input"])}
  manifest["rows"] = sum(e["rows"] for e in files)
  with _create(FileSystems.join(output, _MANIFEST)) as f:
    f.write(json.dumps(manifest, indent=1).encode())
  _delete_tree(FileSystems.join(output, _PARTS))
  return manifest


class WriteEmbeddings(beam.PTransform):
  """Writes `((file, row[, id]), vector [dim])` as one output per input file.

  See the module docstring for the layout. The output PCollection holds one
  element, the manifest (also written to OUTPUT/manifest.json).

  Args:
    output: the output folder (any Beam filesystem).
    column, ids_column: Parquet output column names (ids only for keys with ids).
    expected_rows: optional {file: rows}; a file that comes out with other
      row counts fails the pipeline instead of being written short.
    rows_per_split: rows per intermediate part.
    metadata: extra entries for the manifest.
  """

  def __init__(self, output, *, column: str = "embedding", ids_column: str | None = None,
               expected_rows: dict[str, int] | None = None,
               rows_per_split: int = ROWS_PER_SPLIT, metadata: dict | None = None):
    super().__init__()
    self._output = os.fspath(output)
    self._column = column
    self._ids_column = ids_column
    self._expected_rows = dict(expected_rows) if expected_rows is not None else None
    self._rows_per_split = check_positive(rows_per_split, "rows_per_split")
    self._metadata = dict(metadata or {})
    if self._expected_rows is not None:
      _check_outputs(self._output, self._expected_rows)

  def expand(self, pcoll):
    return (
        pcoll
        | "ByPart" >> beam.Map(_by_part, self._rows_per_split)
        | "GroupParts" >> beam.GroupByKey()
        | "WriteParts" >> beam.Map(_write_part, self._output, self._column, self._ids_column)
        | "GroupFiles" >> beam.GroupByKey()
        | "WriteFiles" >> beam.Map(_write_file, self._output, self._expected_rows)
        | "Collect" >> beam.combiners.ToList()
        | "Manifest" >> beam.Map(_finish, self._output, self._metadata))


# ---------------------------------------------------------------------------
# The whole pipeline


def run_pipeline(*, checkpoint, inputs, output, dim: int | None = None, dtype="float32",
                 pipeline_args: Sequence[str] | None = None, column: str = "embedding",
                 ids_column: str | None = None, batch_size: int = BATCH_SIZE,
                 rows_per_split: int = ROWS_PER_SPLIT) -> dict:
  """Reads embedding files, applies an adaptor with RunInference, writes the results.

  The checkpoint and the inputs are checked first (a bad d, a missing file or a
  name clash fails here, before any worker starts); the pipeline then runs to
  completion.

  Args:
    checkpoint: directory written by `Adaptor.save`.
    inputs: a glob or list of globs of .npy and/or .parquet files.
    output: the output folder; see the module docstring for its layout.
    dim: output prefix length (default the adaptor's d_out).
    dtype: "float32" or "float16" output.
    pipeline_args: Beam pipeline options, e.g. ["--runner=DirectRunner",
      "--direct_num_workers=1"]; by default the DirectRunner.
    column, ids_column: Parquet columns of the vectors and (optional) ids.
    batch_size: rows per device call (see `AdaptorModelHandler`).
    rows_per_split: rows per read of a .npy file and per intermediate part.

  Returns:
    {"rows", "files", "seconds", "output", "dim", "dtype"}.
  """
  start = time.perf_counter()
  checkpoint, output = os.fspath(checkpoint), os.fspath(output)
  dtype = _check_dtype(dtype)
  model = _load(checkpoint)
  dim = _check_out_dim(dim, model.d_out)
  read = ReadEmbeddings(inputs, column=column, ids_column=ids_column,
                        rows_per_split=rows_per_split, d_in=model.d_in)
  expected = {s.path: s.rows for s in read.shards}
  _check_outputs(output, expected)
  # A manifest from an earlier run must not vouch for files this run is rewriting.
  manifest = FileSystems.join(output, _MANIFEST)
  if FileSystems.exists(manifest):
    FileSystems.delete([manifest])
  _delete_stale_temporaries(output)
  metadata = {"checkpoint": checkpoint, "dim": dim, "dtype": dtype,
              "library_version": __version__}
  options = PipelineOptions(list(pipeline_args or []))
  with beam.Pipeline(options=options) as p:
    _ = (
        p
        | "ReadEmbeddings" >> read
        | "ApplyAdaptor" >> ApplyAdaptor(checkpoint, dim=dim, dtype=dtype, batch_size=batch_size)
        | "WriteEmbeddings" >> WriteEmbeddings(
            output, column=column, ids_column=ids_column, expected_rows=expected,
            rows_per_split=rows_per_split, metadata=metadata))
  return {"rows": sum(expected.values()), "files": len(expected),
          "seconds": time.perf_counter() - start, "output": output, "dim": dim, "dtype": dtype}


if __name__ == "__main__":  # `python -m adaptor.beam`: the command line is in adaptor/cli/beam.py.
  from adaptor.cli.beam import main
  sys.exit(main())
