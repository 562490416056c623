"""`matryoshka-adaptor check`: every problem of an embeddings file or a checkpoint, at once.

The loaders (`data.load_embeddings`, `api.load`) stop at the first problem,
which is right before a fit; before handing over a file, or after a crash, one
wants the whole list. `check_file` reads the same formats with the same rules
and collects every problem instead of raising. It never writes: unlike
`adaptor.load`, it does not move back a checkpoint that an interrupted save
left aside.

    problems = check_file("corpus.npy", ids="corpus_ids.txt")   # [] when fine
    matryoshka-adaptor check corpus.npy --ids corpus_ids.txt       # exit 0, or 2 with the list
"""

from __future__ import annotations

import glob
import json
from collections import Counter
from pathlib import Path

import numpy as np

from adaptor import data
from adaptor.data import InputError

# Files that make a directory a checkpoint (see adaptor.checkpoint).
_CHECKPOINT_FILES = ("COMPLETE", "config.json", "params")


def check_file(path, *, column: str | None = None, ids=None) -> list[str]:
  """Lists every problem of an embeddings file or an adaptor checkpoint directory.

  Embeddings (.npy, .npz, .parquet, or a directory saved by
  `datasets.Dataset.save_to_disk`) are read as `load_embeddings` reads them;
  the problems it would raise one at a time are all reported: unreadable file,
  wrong rank or dtype, no rows, rows with NaN, Inf, all zeros or an unusable
  norm (with counts and the first rows), and, with `ids`, a wrong id count and
  every duplicate id. A checkpoint directory (one holding COMPLETE,
  config.json or params/) is checked for its marker, config, format and
  library version, adaptor section, and readable arrays of the right shapes.
  A search index (index.json) or a streamed apply output (manifest.json) is
  read as its loader reads it, every file checked against its metadata.

  Args:
    path: the file or directory.
    column: array (.npz) or column (Parquet, dataset) holding the vectors.
    ids: path of a text file with one id per row.

  Returns:
    One line per problem, each naming the file; an empty list means usable.
  """
  return describe(path, column=column, ids=ids)[1]


def describe(path, *, column=None, ids=None) -> tuple[str, list[str]]:
  """(one-line summary of what was found, problems): `check_file` with a summary."""
  path = Path(path)
  if not path.exists():
    leftovers = sorted(p.name for kind in ("tmp", "old")
                       for p in path.parent.glob(f"{glob.escape(path.name)}.{kind}-*"))
    hint = f" (an interrupted save left {leftovers})" if leftovers else ""
    return "no such file or directory", [f"{path} does not exist{hint}"]
  # An index and an apply output hold a COMPLETE marker or a manifest too;
  # their own metadata file says what they are.
  if path.is_dir() and (path / "index.json").is_file():
    return _inspect_loaded(path, "index")
  if path.is_dir() and (path / "manifest.json").is_file():
    if _is_beam_manifest(path / "manifest.json"):
      return _inspect_beam_output(path)
    return _inspect_loaded(path, "apply output")
  if path.is_dir() and (path / _BEAM_PARTS).is_dir():
    return "an unfinished Beam output", [
        f"{path} holds {_BEAM_PARTS}/ but no manifest.json: the pipeline writing it stopped "
        "before the end; run it again with the same arguments to finish it"]
  if path.is_dir() and any((path / f).exists() for f in _CHECKPOINT_FILES):
    if column is not None or ids is not None:
      return "a checkpoint", [f"{path} is a checkpoint directory; column= and ids= apply "
                              "to embeddings files"]
    return _inspect_checkpoint(path)
  return _inspect_embeddings(path, column, ids)


# ---------------------------------------------------------------------------
# Embeddings


def _raw_vectors(path: Path, column: str | None):
  """The stored array, before any validation of its values; raises InputError."""
  suffix = path.suffix.lower()
  if path.is_dir():
    import datasets
    try:
      ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
      raise InputError(f"directory {path} must be a checkpoint or a dataset written by "
                       f"Dataset.save_to_disk: {e}") from e
    col = column or "embedding"
    table, where = data.hf_table(ds, [col], str(path), None)
    return data.vectors_from_arrow(table, col, where)
  if suffix == ".npy":
    if column is not None:
      raise InputError(f"column applies to .npz, Parquet and datasets, got .npy file {path}")
    return data.load_npy(path, mmap=True)
  if suffix == ".npz":
    return data.load_npz(path, column)
  if suffix == ".parquet":
    col = column or "embedding"
    return data.vectors_from_arrow(data.read_parquet(path, [col]), col, str(path))
  raise InputError(f"{path} must be a .npy, .npz or .parquet file, a dataset directory or a "
                   f"checkpoint directory, got suffix {path.suffix!r}")


def _inspect_embeddings(path: Path, column, ids) -> tuple[str, list[str]]:
  problems = []
  try:
    x = _raw_vectors(path, column)
  except InputError as e:
    return "unreadable embeddings", [str(e)]
  summary = f"embeddings with shape {tuple(x.shape)} dtype {x.dtype}"
  scannable = True
  if x.ndim != 2:
    problems.append(f"{path} must be 2-D [n, d], got {x.ndim}-D array with shape {x.shape}")
    scannable = False
  elif x.shape[0] < 1 or x.shape[1] < 1:
    problems.append(f"{path} must have at least 1 row and 1 column [n, d], got shape {x.shape}")
    scannable = False
  if x.dtype.kind not in "fiu":
    problems.append(f"{path} must have a real float or integer dtype, got dtype {x.dtype}")
    scannable = False
  if scannable:
    if x.dtype not in (np.float16, np.float32):
      # As check_embeddings does: float64 -> float32 may overflow to Inf.
      with np.errstate(over="ignore"):
        x = x.astype(np.float32)
    rows = data.row_problems(x)
    if rows:
      problems.append(f"{path} must have finite, non-zero rows; got " + "; ".join(rows)
                      + f" out of {x.shape[0]} rows")
  if ids is not None:
    n = x.shape[0] if x.ndim >= 1 else None
    problems += _id_problems(Path(ids), n, str(path))
  return summary, problems


def _id_problems(ids_path: Path, n: int | None, where: str) -> list[str]:
  try:
    ids = data.load_ids(ids_path)
  except InputError as e:
    return [str(e)]
  problems = []
  if n is not None and len(ids) != n:
    problems.append(f"ids file {ids_path} must have one id per row of {where} ({n}), "
                    f"got {len(ids)} ids")
  dupes = [(v, c) for v, c in Counter(ids).items() if c > 1]
  if dupes:
    first = [f"{v!r} x{c}" for v, c in dupes[:data.MAX_SHOWN]]
    problems.append(f"ids file {ids_path} must hold unique ids, got {len(dupes)} duplicated "
                    f"ids (first: {', '.join(first)})")
  blank = [i + 1 for i, v in enumerate(ids) if not v.strip()]
  if blank:
    problems.append(f"ids file {ids_path} must hold non-empty ids, got blank ids on lines "
                    f"{blank[:data.MAX_SHOWN]}")
  return problems


# ---------------------------------------------------------------------------
# Checkpoints


def _inspect_checkpoint(path: Path) -> tuple[str, list[str]]:
  from flax import nnx

  from adaptor import checkpoint
  from adaptor.api import abstract_module, read_adaptor_config
  from adaptor.checkpoint import CheckpointError

  problems = [f"{path}: expected every file inside the checkpoint folder, found links "
              f"leaving it: {p}" for p in data.links_leaving(path)]
  if not (path / checkpoint.MARKER).is_file():
    problems.append(f"{path}: expected a {checkpoint.MARKER} marker (written last by a "
                    "save), found none: an interrupted save, or not a checkpoint")
  config, cfg = None, None
  config_path = path / checkpoint.CONFIG
  try:
    config = json.loads(config_path.read_text())
    if not isinstance(config, dict):
      problems.append(f"{config_path}: expected a JSON object, found {type(config).__name__}")
      config = None
  except FileNotFoundError:
    problems.append(f"{config_path}: expected a JSON config file, found none")
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    problems.append(f"{config_path}: expected valid JSON, found an error: {e}")
  if config is not None:
    if config.get("format_version") != checkpoint.FORMAT_VERSION:
      problems.append(f"{config_path}: expected format_version {checkpoint.FORMAT_VERSION}, "
                      f"found {config.get('format_version')!r}")
    cfg, found = read_adaptor_config(config, config_path)
    problems += found
  params = path / checkpoint.PARAMS
  if not params.is_dir():
    problems.append(f"{params}: expected an orbax checkpoint directory, found none")
  else:
    try:
      nested = checkpoint.read_params(params)
      if cfg is not None:
        checkpoint.fit_to_target(nested, nnx.state(abstract_module(cfg), nnx.Param), params)
    except CheckpointError as e:
      problems.append(str(e))
  summary = "a checkpoint" if cfg is None else (
      f"an adaptor checkpoint (d_in={cfg.d_in}, d_out={cfg.d_out}, hidden={cfg.hidden}, "
      f"dims={list(cfg.dims)})")
  return summary, problems


def _inspect_loaded(path: Path, kind: str) -> tuple[str, list[str]]:
  """A search index or a streamed apply output, read as its loader reads it."""
  from adaptor.checkpoint import CheckpointError
  try:
    if kind == "index":
      from adaptor.index import MatryoshkaIndex
      index = MatryoshkaIndex.load(path)
      stores = ", ".join(f"{p} {m}" for p, m in sorted(index.stores)) or "none"
      return (f"a search index ({index.n} x {index.d} {index.precision}, adaptor: "
              f"{'yes' if index.adaptor is not None else 'no'}, quantised stores: {stores})"), []
    from adaptor.stream import read_shards
    vectors, ids = read_shards(path)
    return (f"a streamed apply output ({vectors.shape[0]} x {vectors.shape[1]} "
            f"{vectors.dtype}, ids: {'yes' if ids is not None else 'no'})"), []
  except (ValueError, OSError, KeyError, CheckpointError) as e:
    return f"a {kind}", [str(e)]


_BEAM_PARTS = ".parts"  # adaptor.beam's intermediate parts, removed once a run finishes


def _is_beam_manifest(path: Path) -> bool:
  try:
    files = json.loads(path.read_text()).get("files")
  except (ValueError, OSError, AttributeError):
    return False
  return isinstance(files, list) and all(isinstance(f, dict) and "output" in f for f in files)


def _inspect_beam_output(path: Path) -> tuple[str, list[str]]:
  """An `adaptor.beam` output: every file the manifest lists, with its rows, dim and dtype."""
  manifest = json.loads((path / "manifest.json").read_text())
  problems = []
  dim, dtype = manifest.get("dim"), manifest.get("dtype")
  for entry in manifest["files"]:
    listed = str(entry["output"])
    if Path(listed).is_absolute() and Path(listed).parent != path.absolute() and (
        Path(listed).exists()):
      problems.append(f"{path / 'manifest.json'}: expected outputs inside {path}, found "
                      f"{listed}")  # Never read a file outside the folder it describes.
      continue
    try:  # A relative name, or an absolute one of a folder that has moved since the run.
      out = data.member_path(path, Path(listed).name, what=str(path / "manifest.json"))
    except InputError as e:
      problems.append(str(e))
      continue
    if not out.is_file():
      problems.append(f"{path / out.name}: listed in manifest.json but missing")
      continue
    try:
      if out.suffix == ".npy":
        x = np.load(out, mmap_mode="r")
        shape, got_dtype = x.shape, str(x.dtype)
      else:
        import pyarrow.parquet as pq
        meta = pq.read_metadata(out)
        shape, got_dtype = (meta.num_rows, dim), dtype
    except (ValueError, OSError) as e:
      problems.append(f"{out}: unreadable ({e})")
      continue
    want = (entry.get("rows"), dim)
    if tuple(shape) != want:
      problems.append(f"{out}: expected shape {want} (manifest.json), got {tuple(shape)}")
    elif got_dtype != dtype:
      problems.append(f"{out}: expected dtype {dtype} (manifest.json), got {got_dtype}")
  if (path / _BEAM_PARTS).exists():
    problems.append(f"{path / _BEAM_PARTS}: intermediate parts left behind (a later run of "
                    "the same pipeline over this folder stopped before the end)")
  return (f"a Beam apply output ({len(manifest['files'])} files, {manifest.get('rows')} rows, "
          f"dim {dim}, {dtype})"), problems
