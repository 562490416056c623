"""Streaming apply: adapt embeddings far larger than memory into resumable output shards.

`apply_files` reads its inputs a batch at a time and writes the adapted vectors
into numbered shards, so memory holds one batch ([batch_size, d_in] in,
[batch_size, dim] out) whatever the input size. Inputs are

  - `.npy` shards (a directory of them, a glob, or a list of paths), read with
    plain file reads rather than a memory map: pages of a memory-mapped file
    that has been read stay counted in the process's RSS until it is unmapped,
    so mapping a 300 GB input would look like a 300 GB process. Ids, if any,
    come from a text file beside each shard, `<stem>.ids.txt` (one per line),
    which is also what the npy output writes; every shard has one or none does;
  - Parquet files with a list<float> or fixed_size_list<float> embedding
    column (and optionally an ids column, passed through), read record batch by
    record batch;
  - one Hugging Face dataset saved with `Dataset.save_to_disk`, sliced a batch
    at a time (its Arrow files are memory-mapped by `datasets`).

A directory or a glob is read in sorted path order; a list keeps its order.

Output layout (`output_dir/`):

  manifest.json          the run's config and the shards that are complete
  part-00000.npy         [rows, dim] float32/float16, unit-norm rows    (npy)
  part-00000.ids.txt     the ids of those rows, one per line, if any   (npy)
  part-00000.parquet     an ids column (if any) + fixed_size_list<dim>  (parquet)
  ...

Shard i holds the global rows [i * shard_rows, min((i + 1) * shard_rows, n))
of the concatenated inputs. Every file is written to a temporary file, fsynced
and renamed into place (`data.atomic_file`); then the manifest, rewritten the
same way, lists the shard with its row range and byte sizes. A rerun with the
same config resumes: the listed shards are checked (present, recorded size) and
kept, anything else the previous run left (temporary files, a shard it did not
get to list) is deleted and rewritten, so no row is dropped or duplicated and
the output is byte-identical to an uninterrupted run. An output directory
holding another run's manifest (other checkpoint parameters, inputs, dim,
dtype, format, sharding or library version) is refused unless
`overwrite=True`, which starts over.

Values equal `Adaptor.apply(all_rows, dim=, dtype=, batch_size=)` bit for bit:
every device call gets exactly `batch_size` rows (zero-padded at the end of a
shard), as in `model.apply_adaptor`, and a row's result depends neither on its
batch-mates nor on the padding (tests/test_properties.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np

from adaptor._version import __version__
from adaptor import interrupts
from adaptor.data import (InputError, atomic_file, check_embeddings, fsync_dir,
                          load_npy, member_path, vectors_from_arrow)
from adaptor.model import adaptor_fingerprint, apply_adaptor, warn_untrained_dim
from adaptor.checks import check_dim, check_positive

DEFAULT_BATCH_SIZE = 8192      # the default of `Adaptor.apply`, so results match it bit for bit
DEFAULT_SHARD_ROWS = 262_144   # 32 batches; 32 MiB per shard at dim 64 in float16

MANIFEST = "manifest.json"
_KIND = "matryoshka-adaptor apply shards"
_FORMAT_VERSION = 1
_FORMATS = ("npy", "parquet")
_OURS = re.compile(r"part-\d+\.(npy|parquet|ids\.txt)")
_TMP_PREFIX = ".tmp-"          # what `atomic_file` names its temporary files
_SHOW = 5


# ---------------------------------------------------------------- input sources


@dataclasses.dataclass
class _Source:
  """One input file (or saved dataset): its size, and a reader of row ranges."""

  path: str                 # as the user named it, for error messages
  rows: int
  d: int
  id_type: object = None    # pyarrow type of its ids, None without ids

  def stamp(self) -> dict:
    """What identifies this input in the manifest: path, sizes, mtimes, rows."""
    return {"path": os.path.abspath(self.path), **_file_stamp(self.path), "rows": self.rows}

  def chunks(self, start: int, stop: int, size: int) -> Iterator[tuple[int, np.ndarray, object]]:
    """Yields (first row, vectors [m <= size, d], ids pyarrow array or None) over [start, stop)."""
    raise NotImplementedError


def _file_stamp(path) -> dict:
  st = os.stat(path)
  return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _sidecar(path: str) -> str:
  return os.path.splitext(path)[0] + ".ids.txt"


def _count_ids(path: str) -> int:
  """Number of ids in a one-id-per-line file, with `data.load_ids` semantics, read lazily."""
  n = blank = 0
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if line.rstrip():
        if blank:
          raise InputError(f"ids file {path}: line {lineno - blank} is empty; expected one id "
                           "per line")
        n += 1
      else:
        blank += 1
  return n


@dataclasses.dataclass
class _NpySource(_Source):
  offset: int = 0
  dtype: np.dtype = None
  fortran: bool = False
  ids_path: str | None = None
  ids_at: tuple[int, int] = (0, 0)  # (row, byte offset of its id line) where the last read ended

  def stamp(self) -> dict:
    out = super().stamp()
    if self.ids_path:
      out["ids"] = {"path": os.path.abspath(self.ids_path), **_file_stamp(self.ids_path)}
    return out

  def chunks(self, start, stop, size):
    import pyarrow as pa

    row_bytes = self.d * self.dtype.itemsize
    with contextlib.ExitStack() as stack:
      f = stack.enter_context(open(self.path, "rb"))
      ids_file = None
      if self.ids_path:
        ids_file = stack.enter_context(open(self.ids_path, encoding="utf-8"))
        row, offset = self.ids_at if self.ids_at[0] <= start else (0, 0)
        # Shards are read in order: seek to where the previous one stopped reading.
        ids_file.seek(offset)
        for _ in range(start - row):
          ids_file.readline()
      for a in range(start, stop, size):
        b = min(a + size, stop)
        if self.fortran:
          # Column-major rows are strided over the whole file: map, copy, unmap.
          x = np.array(np.load(self.path, mmap_mode="r")[a:b])
        else:
          f.seek(self.offset + a * row_bytes)
          x = np.fromfile(f, self.dtype, count=(b - a) * self.d)
          if x.size != (b - a) * self.d:
            raise InputError(f"{self.path} ended at row {a + x.size // self.d}, but its header "
                             f"promises {self.rows} rows (truncated while being read?)")
          x = x.reshape(b - a, self.d)
        ids = None
        if ids_file is not None:
          ids = pa.array([ids_file.readline().rstrip() for _ in range(b - a)], pa.string())
          self.ids_at = (b, ids_file.tell())
        yield a, x, ids


@dataclasses.dataclass
class _ParquetSource(_Source):
  column: str = "embedding"
  id_column: str | None = None
  group_rows: tuple[int, ...] = ()

  def chunks(self, start, stop, size):
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = [self.column] + ([self.id_column] if self.id_column else [])
    # Skip whole row groups before `start` using the footer's row counts.
    first, pos = 0, 0
    while pos + self.group_rows[first] <= start:
      pos += self.group_rows[first]
      first += 1
    pf = pq.ParquetFile(self.path)
    try:
      for batch in pf.iter_batches(batch_size=size, columns=columns,
                                   row_groups=range(first, len(self.group_rows))):
        lo, hi = max(start, pos), min(stop, pos + batch.num_rows)
        if lo < hi:
          table = pa.Table.from_batches([batch.slice(lo - pos, hi - lo)])
          where = f"{self.path}[{lo}:{hi}]"
          ids = _arrow_ids(table, self.id_column, where) if self.id_column else None
          yield lo, vectors_from_arrow(table, self.column, where), ids
        pos += batch.num_rows
        if pos >= stop:
          break
    finally:
      pf.close()


@dataclasses.dataclass
class _DatasetSource(_Source):
  column: str = "embedding"
  id_column: str | None = None
  dataset: object = None

  def stamp(self) -> dict:
    root = os.path.abspath(self.path)
    files = [{"name": name, **_file_stamp(os.path.join(root, name))}
             for name in sorted(os.listdir(root)) if os.path.isfile(os.path.join(root, name))]
    return {"path": root, "files": files, "rows": self.rows}

  def chunks(self, start, stop, size):
    for a in range(start, stop, size):
      b = min(a + size, stop)
      table = self.dataset[a:b]  # arrow format: a pyarrow Table of these rows only
      where = f"{self.path}[{a}:{b}]"
      ids = _arrow_ids(table, self.id_column, where) if self.id_column else None
      yield a, vectors_from_arrow(table, self.column, where), ids


def _id_type(t, id_column: str, where: str):
  import pyarrow as pa

  if pa.types.is_dictionary(t):
    t = t.value_type
  if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)):
    raise InputError(f"ids column {id_column!r} of {where} must hold strings or integers, got {t}")
  return t


def _arrow_ids(table, id_column: str, where: str):
  import pyarrow as pa

  col = table.column(id_column).combine_chunks()
  if pa.types.is_dictionary(col.type):
    col = col.dictionary_decode()
  if col.null_count:
    raise InputError(f"ids column {id_column!r} of {where} must have no nulls, got "
                     f"{col.null_count}")
  return col


def _embedding_width(t, column: str, where: str, first_row) -> int:
  import pyarrow as pa

  if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
    raise InputError(
        f"column {column!r} of {where} must be list<float> or fixed_size_list<float>, got {t}")
  if not (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)):
    raise InputError(f"column {column!r} of {where} must hold float or integer values, got {t}")
  if pa.types.is_fixed_size_list(t):
    return t.list_size
  return vectors_from_arrow(first_row(), column, f"{where}[0:1]").shape[1]


def _open_npy(path: str, want_ids: bool) -> _NpySource:
  x = load_npy(Path(path), mmap=True)  # Refuses corrupt, truncated and pickled files.
  shape, dtype, offset = x.shape, x.dtype, getattr(x, "offset", 0)
  fortran = x.ndim == 2 and not x.flags.c_contiguous
  del x  # Only the header was needed; unmap.
  if len(shape) != 2:
    raise InputError(f"{path} must hold a 2-D array [n, d], got shape {shape}")
  if dtype.kind not in "fiu":
    raise InputError(f"{path} must have a real float or integer dtype, got dtype {dtype}")
  ids_path = None
  if want_ids:
    ids_path = _sidecar(path)
    n_ids = _count_ids(ids_path)
    if n_ids != shape[0]:
      raise InputError(f"ids file {ids_path} must have one id per row of {path} ({shape[0]}), "
                       f"got {n_ids} ids")
  return _NpySource(path=path, rows=shape[0], d=shape[1], offset=offset, dtype=dtype,
                    fortran=fortran, ids_path=ids_path,
                    id_type=_pa_string() if want_ids else None)


def _pa_string():
  import pyarrow as pa
  return pa.string()


def _open_parquet(path: str, column: str, id_column: str | None) -> _ParquetSource:
  import pyarrow as pa
  import pyarrow.parquet as pq

  try:
    pf = pq.ParquetFile(path)
  except (pa.ArrowException, OSError) as e:
    raise InputError(f"{path} is not a readable Parquet file: {e}") from e
  try:
    schema = pf.schema_arrow
    for c in [column] + ([id_column] if id_column else []):
      if c not in schema.names:
        raise InputError(f"{path} has no column {c!r}; available columns: {schema.names}")
    rows = pf.metadata.num_rows
    first = lambda: pa.Table.from_batches([next(pf.iter_batches(batch_size=1, columns=[column]))])
    d = _embedding_width(schema.field(column).type, column, path, first) if rows else 0
    id_type = _id_type(schema.field(id_column).type, id_column, path) if id_column else None
    groups = tuple(pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups))
  finally:
    pf.close()
  return _ParquetSource(path=path, rows=rows, d=d, id_type=id_type, column=column,
                        id_column=id_column, group_rows=groups)


def _open_dataset(path: str, column: str, id_column: str | None) -> _DatasetSource:
  import datasets

  try:
    ds = datasets.load_from_disk(path)
  except (FileNotFoundError, ValueError, OSError) as e:
    raise InputError(f"input directory {path} must be a dataset written by "
                     f"Dataset.save_to_disk: {e}") from e
  if isinstance(ds, datasets.DatasetDict):
    raise InputError(f"input {path} is a DatasetDict with splits {list(ds)}; pass one split's "
                     f"directory, e.g. {os.path.join(path, next(iter(ds), 'train'))}")
  columns = [column] + ([id_column] if id_column else [])
  for c in columns:
    if c not in ds.column_names:
      raise InputError(f"{path} has no column {c!r}; available columns: {ds.column_names}")
  ds = ds.select_columns(columns).with_format("arrow")
  schema = ds.features.arrow_schema
  rows = ds.num_rows
  d = _embedding_width(schema.field(column).type, column, path, lambda: ds[0:1]) if rows else 0
  id_type = _id_type(schema.field(id_column).type, id_column, path) if id_column else None
  return _DatasetSource(path=path, rows=rows, d=d, id_type=id_type, column=column,
                        id_column=id_column, dataset=ds)


def is_dataset_dir(path) -> bool:
  """Whether `path` looks like the output of `Dataset(Dict).save_to_disk`."""
  return any(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def _expand_inputs(inputs) -> tuple[str, list[str]]:
  """(kind, paths): kind is "npy", "parquet" or "dataset"."""
  specs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
  if not specs:
    raise InputError("inputs must name at least one file, directory or glob, got none")
  found: list[tuple[str, str]] = []
  for spec in specs:
    s = os.fspath(spec)
    if glob.has_magic(s):
      matches = [p for p in sorted(glob.glob(s)) if os.path.isfile(p)]
      files = [p for p in matches if p.endswith((".npy", ".parquet"))]
      if not files:
        raise InputError(f"input glob {s!r} must match .npy or .parquet files, matched "
                         f"{len(matches)} files {matches[:_SHOW]}")
    elif os.path.isdir(s):
      if is_dataset_dir(s):
        found.append(("dataset", s))
        continue
      files = sorted(os.path.join(s, n) for n in os.listdir(s)
                     if n.endswith((".npy", ".parquet")) and not n.startswith("."))
      if not files:
        raise InputError(f"input directory {s} must hold .npy or .parquet files or a dataset "
                         "saved with Dataset.save_to_disk, found neither")
    elif os.path.isfile(s):
      if not s.endswith((".npy", ".parquet")):
        raise InputError(f"input {s} must be a .npy or .parquet file (an .npz archive cannot be "
                         f"read in pieces; np.save its array), got suffix "
                         f"{os.path.splitext(s)[1]!r}")
      files = [s]
    else:
      raise InputError(f"input {s} does not exist")
    found.extend(("npy" if p.endswith(".npy") else "parquet", p) for p in files)
  kinds = sorted({k for k, _ in found})
  if len(kinds) > 1:
    raise InputError(f"inputs must all be of one kind, got a mix of {kinds}: "
                     f"{[p for _, p in found][:_SHOW]}")
  if kinds == ["dataset"] and len(found) > 1:
    raise InputError(f"inputs may name one saved dataset, got {len(found)}: "
                     f"{[p for _, p in found]}")
  paths = [p for _, p in found]
  seen = set()
  for p in paths:
    key = os.path.realpath(p)
    if key in seen:
      raise InputError(f"inputs must not name a file twice, got {p} twice")
    seen.add(key)
  return kinds[0], paths


def _open_sources(inputs, *, column, id_column, d_in: int) -> list[_Source]:
  kind, paths = _expand_inputs(inputs)
  if kind == "npy":
    if column is not None or id_column is not None:
      raise InputError(f"column/id_column apply to Parquet and dataset inputs, got .npy inputs "
                       f"({paths[0]}, ...); .npy shards take ids from <stem>.ids.txt beside them")
    has_ids = [os.path.isfile(_sidecar(p)) for p in paths]
    if any(has_ids) and not all(has_ids):
      missing = paths[has_ids.index(False)]
      raise InputError(f"ids file {_sidecar(missing)} does not exist, but "
                       f"{_sidecar(paths[has_ids.index(True)])} does; give every .npy input an "
                       "ids file or none")
    sources = [_open_npy(p, any(has_ids)) for p in paths]
  elif kind == "parquet":
    sources = [_open_parquet(p, column or "embedding", id_column) for p in paths]
  else:
    sources = [_open_dataset(paths[0], column or "embedding", id_column)]
  for s in sources:
    if s.rows and s.d != d_in:
      raise InputError(f"input {s.path} has d={s.d} columns, but the adaptor expects d_in={d_in}")
    if s.id_type != sources[0].id_type:
      raise InputError(f"ids of input {s.path} must have the type of those of {sources[0].path} "
                       f"({sources[0].id_type}), got {s.id_type}")
  if not sum(s.rows for s in sources):
    raise InputError(f"inputs must hold at least 1 row, got 0 rows in {len(sources)} "
                     f"{'file' if len(sources) == 1 else 'files'} ({sources[0].path}, ...)")
  return sources


def _batches(sources, starts, start: int, stop: int, batch_rows: int, d_in: int):
  """Yields (x [batch_rows, d_in] float32, m, ids or None) for global rows [start, stop).

  Rows m.. of the last batch are zeros. The buffer is reused: consume each
  batch before asking for the next.
  """
  import pyarrow as pa

  buf = np.zeros((batch_rows, d_in), np.float32)
  ids: list = []
  fill = 0
  for src, base in zip(sources, starts, strict=True):
    lo, hi = max(start, base), min(stop, base + src.rows)
    if lo >= hi:
      continue
    for a, x, x_ids in src.chunks(lo - base, hi - base, batch_rows):
      # One check per piece of one file, so the message names the file and rows.
      x = check_embeddings(x, name=f"{src.path}[{a}:{a + len(x)}]", dim=d_in)
      k = 0
      while k < len(x):
        take = min(batch_rows - fill, len(x) - k)
        buf[fill:fill + take] = x[k:k + take]
        if x_ids is not None:
          ids.append(x_ids.slice(k, take))
        fill += take
        k += take
        if fill == batch_rows:
          yield buf, fill, (pa.concat_arrays(ids) if ids else None)
          fill, ids = 0, []
  if fill:
    buf[fill:] = 0
    yield buf, fill, (pa.concat_arrays(ids) if ids else None)


# ---------------------------------------------------------------- output shards


def _shard_names(i: int, width: int, output_format: str) -> tuple[str, str | None]:
  stem = f"part-{i:0{width}d}"
  if output_format == "npy":
    return stem + ".npy", stem + ".ids.txt"
  return stem + ".parquet", None


def _text_ids(ids, first_row: int) -> str:
  """The .ids.txt lines for `ids` (a pyarrow array), the ids of input rows first_row.."""
  lines = [str(v) for v in ids.to_pylist()]
  for i, v in enumerate(lines):
    # `data.load_ids` strips trailing whitespace and splits on line breaks.
    if not v or v != v.rstrip() or "\n" in v or "\r" in v:
      raise InputError(
          f"ids written to .ids.txt files must be non-empty, without line breaks or trailing "
          f"whitespace; got {v!r} for row {first_row + i} of the inputs (rows counted across "
          "all input files); use the parquet output format for such ids")
  return "\n".join(lines) + "\n"


def _write_shard(out: Path, names, start: int, rows: int, batches, *, module, dim, dtype,
                 output_format, id_name, id_type, embedding_name, progress) -> dict:
  """Writes one shard from `batches` atomically; returns its manifest entry (sans rows)."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  vec_name, ids_name = names
  entry = {"file": vec_name}
  with contextlib.ExitStack() as stack:
    f = stack.enter_context(atomic_file(out / vec_name, "wb"))
    ids_f = None
    if output_format == "npy":
      np.lib.format.write_array_header_1_0(f, {
          "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
          "shape": (rows, dim)})
      if id_type is not None:
        ids_f = stack.enter_context(atomic_file(out / ids_name, "w"))
      writer = None
    else:
      fields = ([pa.field(id_name, id_type, nullable=False)] if id_type is not None else [])
      fields.append(pa.field(embedding_name, pa.list_(pa.from_numpy_dtype(dtype), dim),
                             nullable=False))
      schema = pa.schema(fields)
      writer = pq.ParquetWriter(f, schema)
      stack.callback(writer.close)  # Before atomic_file's fsync (LIFO).
    written = 0
    for x, m, ids in batches:
      y = apply_adaptor(module, x, dim=dim, dtype=dtype, batch_size=len(x))[:m]
      if writer is None:
        f.write(np.ascontiguousarray(y).data)
        if ids_f is not None:
          ids_f.write(_text_ids(ids, start + written))
      else:
        cols = [ids.cast(id_type)] if id_type is not None else []
        cols.append(pa.FixedSizeListArray.from_arrays(pa.array(y.reshape(-1)), dim))
        writer.write_table(pa.Table.from_arrays(cols, schema=schema))
      written += m
      progress(m)
    if written != rows:  # A bug, not bad input: never write a short shard.
      raise RuntimeError(f"shard {vec_name}: expected {rows} rows, produced {written}")
  entry["bytes"] = os.path.getsize(out / vec_name)
  if ids_f is not None:
    entry["ids_file"] = ids_name
    entry["ids_bytes"] = os.path.getsize(out / ids_name)
  return entry


def _write_manifest(out: Path, manifest: dict) -> None:
  # No directory fsync: losing this rename to a power cut only means redoing a shard.
  with atomic_file(out / MANIFEST, "w") as f:
    f.write(json.dumps(manifest, indent=1) + "\n")


def _read_manifest(out: Path) -> dict:
  try:
    manifest = json.loads((out / MANIFEST).read_text())
  except (OSError, ValueError) as e:
    raise InputError(f"{out / MANIFEST} is not a readable manifest: {e}") from e
  kind = manifest.get("kind") if isinstance(manifest, dict) else None
  if kind != _KIND:
    raise InputError(f"{out / MANIFEST} must be a manifest written by apply_files "
                     f"(kind {_KIND!r}), got kind {kind!r}")
  return manifest


def _shard_ok(out: Path, entry: dict) -> bool:
  for name, size in ((entry.get("file"), entry.get("bytes")),
                     (entry.get("ids_file"), entry.get("ids_bytes"))):
    if name is None:
      continue
    p = _member(out, name)
    if not p.is_file() or p.stat().st_size != size:
      return False
  return True


def _member(out: Path, name) -> Path:
  """A shard file the manifest names: one of ours, inside `out` (InputError otherwise)."""
  path = member_path(out, name, what=str(out / MANIFEST))
  if not _OURS.fullmatch(name):
    raise InputError(f"{out / MANIFEST}: expected shard names like part-00000.npy, got {name!r}")
  return path


def _config_diff(old: dict, new: dict) -> list[str]:
  keys = sorted(set(old) | set(new))
  return [k for k in keys if old.get(k) != new.get(k)]


def _prepare_output(out: Path, config: dict, *, overwrite: bool, sources) -> dict[int, dict]:
  """Makes `out` ready for this config; returns the complete shards to keep, by index."""
  if out.exists() and not out.is_dir():
    raise InputError(f"output_dir {out} must be a directory, got a file")
  out_real = os.path.realpath(out)
  for s in sources:
    if os.path.realpath(s.path).startswith(out_real + os.sep):
      raise InputError(f"input {s.path} lies inside output_dir {out}; write the output elsewhere")
  if not out.exists():
    out.mkdir(parents=True)
    return {}
  names = sorted(os.listdir(out))
  foreign = [n for n in names
             if n != MANIFEST and not _OURS.fullmatch(n) and not n.startswith(_TMP_PREFIX)]
  if foreign:
    raise InputError(f"output_dir {out} must be empty or hold an earlier apply_files output, but "
                     f"it holds other files: {foreign[:_SHOW]}")
  manifest = _read_manifest(out) if MANIFEST in names else None
  keep: dict[int, dict] = {}
  if manifest is not None and not overwrite:
    if manifest.get("config") != config:
      diff = _config_diff(manifest.get("config") or {}, config)
      raise InputError(
          f"output_dir {out} holds the output of another run (its manifest differs in: "
          f"{', '.join(diff)}); pass overwrite=True to replace it, or choose "
          "another output_dir")
    for entry in manifest.get("shards", []):
      if _shard_ok(out, entry):
        keep[entry["index"]] = entry
      else:
        warnings.warn(f"{out}: shard {entry.get('file')} listed in the manifest is missing or "
                      "has the wrong size; rewriting it", stacklevel=3)
  elif manifest is None and not overwrite and any(_OURS.fullmatch(n) for n in names):
    # Our own runs write the manifest before any shard, so these are not ours to delete.
    raise InputError(f"output_dir {out} holds shard files but no {MANIFEST}; pass "
                     "overwrite=True to replace them, or choose another output_dir")
  if overwrite and manifest is not None:
    # The manifest first: a kill before the shards are gone must not leave it vouching for them.
    os.remove(out / MANIFEST)
  wanted = {n for e in keep.values() for n in (e["file"], e.get("ids_file")) if n}
  for n in names:
    if n != MANIFEST and n not in wanted:
      os.remove(out / n)
  return keep


# ---------------------------------------------------------------- public API


def apply_files(
    model,
    inputs,
    output_dir,
    *,
    dim: int | None = None,
    dtype="float32",
    output_format: str = "npy",
    column: str | None = None,
    id_column: str | None = None,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict:
  """Adapts embeddings read from files into resumable output shards, in bounded memory.

  Rerunning after a crash or kill resumes where the manifest says the run
  stopped; the finished output is byte-identical to an uninterrupted run, and
  its values equal `model.apply(all_rows, dim=dim, dtype=dtype,
  batch_size=batch_size)`. NaN/Inf/zero rows stop the run with an error naming
  the file and row range (earlier shards stay complete; fix the input and pass
  `overwrite=True`, since the input changed).

  Args:
    model: an `adaptor.Adaptor` (e.g. from `adaptor.load`).
    inputs: a `.npy` or `.parquet` file, a directory of them, a glob, a
      directory written by `datasets.Dataset.save_to_disk`, or a list of
      files/directories/globs, all of one kind. Rows: the concatenation of
      the files, each [n_i, d_in]; directories and globs in sorted order.
    output_dir: where shards and `manifest.json` go (created if missing); must
      be empty, or hold an earlier run of this function.
    dim: output prefix length (default: the adaptor's d_out).
    dtype: "float32" or "float16" output.
    output_format: "npy" (part-NNNNN.npy [rows, dim] + part-NNNNN.ids.txt) or
      "parquet" (part-NNNNN.parquet with the ids column, if any, then a
      fixed_size_list<dtype>[dim] column named like the input's).
    column: Parquet/dataset embedding column (default "embedding").
    id_column: Parquet/dataset ids column to pass through (default: no ids).
      `.npy` inputs take ids from `<stem>.ids.txt` files beside them.
    shard_rows: rows per output shard (the last may be shorter); the unit of
      resumption.
    batch_size: rows per device call, as in `Adaptor.apply`.
    overwrite: discard whatever `output_dir` holds from an earlier run and
      start over (otherwise a matching run resumes and another is refused).
    quiet: no progress bar.

  Returns:
    The manifest (also in `output_dir/manifest.json`): "config" (adaptor
    config, params digest, inputs with sizes and mtimes, dim, dtype, format,
    shard_rows, batch_size, column names, versions), "rows", "n_shards",
    "shards" (index, file, byte sizes, start, stop, rows) and "complete".
  """
  from tqdm.auto import tqdm

  module = getattr(model, "module", model)
  cfg = module.config
  dim = cfg.d_out if dim is None else check_dim(dim, cfg.d_out)
  warn_untrained_dim(dim, cfg)
  dtype = np.dtype(dtype)
  if dtype not in (np.float32, np.float16):
    raise InputError(f"dtype must be float32 or float16, got {dtype}")
  if output_format not in _FORMATS:
    raise InputError(f"output_format must be one of {list(_FORMATS)}, got {output_format!r}")
  shard_rows = check_positive(shard_rows, "shard_rows")
  batch_size = check_positive(batch_size, "batch_size")
  sources = _open_sources(inputs, column=column, id_column=id_column, d_in=cfg.d_in)
  total = sum(s.rows for s in sources)
  starts = np.cumsum([0] + [s.rows for s in sources])[:-1].tolist()
  # As in apply_adaptor: one compiled batch shape, no larger than the input.
  batch_rows = int(min(batch_size, total))
  n_shards = -(-total // shard_rows)
  width = max(5, len(str(n_shards - 1)))
  id_type = sources[0].id_type
  id_name = id_column or "id"
  embedding_name = column or "embedding"

  config = {
      "adaptor": cfg.to_dict(),
      "adaptor_fingerprint": adaptor_fingerprint(module),
      "inputs": [s.stamp() for s in sources],
      "dim": dim,
      "dtype": dtype.name,
      "format": output_format,
      "shard_rows": int(shard_rows),
      "batch_size": int(batch_size),
      "column": embedding_name if output_format == "parquet" else None,
      "id_column": id_name if (id_type is not None and output_format == "parquet") else None,
      "ids": id_type is not None,
      # Other versions may round differently: never mix their shards.
      "library_version": __version__,
      "jax_version": jax.__version__,
  }
  config = json.loads(json.dumps(config))  # As it reads back from disk.
  out = Path(output_dir)
  created = not out.exists()
  with _locked(out):
    done = _prepare_output(out, config, overwrite=overwrite, sources=sources)
    manifest = {"kind": _KIND, "format_version": _FORMAT_VERSION, "config": config,
                "rows": total, "n_shards": n_shards, "shards": [], "complete": False}

    def record():
      manifest["shards"] = [done[i] for i in sorted(done)]
      manifest["complete"] = len(done) == n_shards
      _write_manifest(out, manifest)

    try:
      record()
      rows_done = sum(e["rows"] for e in done.values())

      def kept():
        if not done:
          return f"nothing kept in {out}; rerun the command"
        return (f"{len(done)} of {n_shards} shards complete in {out}; rerun the same command "
                "to resume")

      def progress(rows):
        bar.update(rows)
        interrupts.check(kept)  # Ctrl-C or SIGTERM (CLI): stop between batches.

      with tqdm(total=total, initial=rows_done, unit="rows", unit_scale=True, desc="apply",
                disable=quiet, dynamic_ncols=True, file=sys.stderr) as bar:
        for i in range(n_shards):
          if i in done:
            continue
          a, b = i * shard_rows, min((i + 1) * shard_rows, total)
          entry = _write_shard(
              out, _shard_names(i, width, output_format), a, b - a,
              _batches(sources, starts, a, b, batch_rows, cfg.d_in),
              module=module, dim=dim, dtype=dtype, output_format=output_format,
              id_name=id_name, id_type=id_type, embedding_name=embedding_name,
              progress=progress)
          fsync_dir(out)  # The renames of a shard must be durable before the manifest lists it.
          done[i] = {"index": i, **entry, "start": a, "stop": b, "rows": b - a}
          record()
    except BaseException as e:
      if not done:  # Nothing to resume: leave no output behind (bad input in the first shard).
        with contextlib.suppress(OSError):
          os.remove(out / MANIFEST)
          if created:
            out.rmdir()
      elif isinstance(e, InputError):
        # Bad input (a NaN row deep in a file): a rerun would stop at the same row, so the
        # manifest says so, and `read_shards` and `check` ask for a fixed input instead.
        manifest["stopped"] = str(e)
        with contextlib.suppress(OSError):
          _write_manifest(out, manifest)
      if isinstance(e, OSError):  # Disk full, permissions, an input deleted mid-run...
        raise InputError(f"apply_files to {out}: could not read or write "
                         f"{e.filename or out}: {e.strerror or e}") from None
      raise
  return manifest


@contextlib.contextmanager
def _locked(out: Path):
  """Holds an exclusive lock on `out` (created if missing): two writers would mix shards."""
  try:
    import fcntl
  except ImportError:  # Not POSIX: no lock.
    yield
    return
  if out.exists() and not out.is_dir():
    raise InputError(f"output_dir {out} must be a directory, got a file")
  try:
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
  except OSError as e:
    raise InputError(f"output_dir {out}: could not create or open it: {e.strerror or e}") from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise InputError(f"output_dir {out} is being written by another process; wait for it "
                       "or choose another output_dir") from None
    yield
  finally:
    os.close(fd)  # Releases the lock.


def read_shards(output_dir, *, mmap: bool = True) -> tuple[np.ndarray, list[str] | None]:
  """Loads the complete output of `apply_files` back.

  Args:
    output_dir: a directory written by `apply_files`.
    mmap: memory-map npy shards; a single shard then stays a memmap, several
      are concatenated in memory.

  Returns:
    (vectors [rows, dim] float32/float16, ids as str in row order or None).
  """
  import pyarrow.parquet as pq

  out = Path(output_dir)
  manifest = _read_manifest(out)
  if not manifest.get("complete") and manifest.get("stopped"):
    raise InputError(f"output_dir {out} is incomplete ({len(manifest.get('shards', []))} of "
                     f"{manifest.get('n_shards')} shards): apply stopped at bad input "
                     f"({manifest['stopped']}); fix the input, then rerun apply with "
                     "overwrite=True")
  if not manifest.get("complete"):
    raise InputError(f"output_dir {out} is incomplete ({len(manifest.get('shards', []))} of "
                     f"{manifest.get('n_shards')} shards); rerun apply to finish it")
  config = manifest["config"]
  dim = config["dim"]
  vectors, ids = [], [] if config["ids"] else None
  for entry in manifest["shards"]:
    path = _member(out, entry["file"])
    if not _shard_ok(out, entry):
      raise InputError(f"shard {path} is missing or has the wrong size ({entry['bytes']} bytes "
                       "expected)")
    if config["format"] == "npy":
      x = load_npy(path, mmap)
      if ids is not None:
        from adaptor.data import load_ids
        ids.extend(load_ids(_member(out, entry["ids_file"])))
    else:
      table = pq.read_table(path)
      col = table.column(config["column"]).combine_chunks()
      x = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), dim)
      if ids is not None:
        ids.extend(str(v) for v in table.column(config["id_column"]).to_pylist())
    if x.shape != (entry["rows"], dim):
      raise InputError(f"shard {path} must have shape {(entry['rows'], dim)}, got {x.shape}")
    if x.dtype != np.dtype(config["dtype"]):
      raise InputError(f"shard {path} must have dtype {config['dtype']} (manifest.json), "
                       f"got {x.dtype}")
    vectors.append(x)
  if ids is not None and len(ids) != manifest["rows"]:
    raise InputError(f"{out}: expected {manifest['rows']} ids, got {len(ids)}")
  return (vectors[0] if len(vectors) == 1 else np.concatenate(vectors)), ids
