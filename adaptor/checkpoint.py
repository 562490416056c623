"""Atomic checkpoints of a pytree of arrays plus a JSON config.

A checkpoint is a directory holding

  config.json   the caller's config, plus "format_version" and "library_version"
  params/       an orbax checkpoint of the arrays, stored as numpy
  COMPLETE      an empty marker, written last

It is built in a sibling `<name>.tmp-<random>` directory, fsynced, and only
then renamed into place, so a crash at any moment leaves the previous complete
checkpoint or the new complete one, never a half-written directory that `load`
accepts. (An overwrite moves the old checkpoint aside to `<name>.old-<token>`
before renaming the new one in; if it is killed between the two renames,
`load` moves the old one back.) Arrays are stored as a nested dict keyed by
their pytree path (an `nnx.State`, optax's namedtuples and plain tuples all
flatten the same way), and `load` rebuilds the caller's structure from a
`target` pytree, checking every leaf's shape and dtype against it.

`TrainCheckpointer` keeps the last few `step_<n>/` checkpoints of a training
run, with the same layout, so that an interrupted run can resume. Each records
the fingerprint of the fit it belongs to (`resume_fingerprint`: the inputs and
every setting that decides the fit), and a fit with another fingerprint is
refused instead of silently continuing from it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from adaptor._version import __version__
from adaptor.data import fsync_dir, links_leaving, temp_dir

FORMAT_VERSION = 1
CONFIG = "config.json"
PARAMS = "params"
MARKER = "COMPLETE"
_STEP_RE = re.compile(r"step_(\d+)")
_LEFTOVER_RE = re.compile(r"(step_\d+)\.(tmp|old)-.+")


class CheckpointError(ValueError):
  """A checkpoint is missing, incomplete, or does not match what was asked for."""


# ---------------------------------------------------------------- pytrees


def _key_str(key) -> str:
  # Orbax stores dict keys as strings and tuples as lists, so every container
  # level is keyed by a string here; the target restores the real structure.
  # DictKey and FlattenedIndexKey have .key, SequenceKey .idx, GetAttrKey .name.
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flatten(tree):
  """[(path as tuple of str, leaf)] and treedef; nnx Variables count as leaves."""
  is_var = lambda x: isinstance(x, nnx.Variable)
  pairs, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_var)
  return [(tuple(_key_str(k) for k in path), leaf) for path, leaf in pairs], treedef


def _unwrap(leaf):
  if isinstance(leaf, nnx.Variable):
    return leaf.get_value() if hasattr(leaf, "get_value") else leaf.value
  return leaf


def _to_nested_numpy(state) -> dict:
  """The leaves of `state` as numpy arrays in a nested dict keyed by path."""
  pairs, _ = _flatten(state)
  if not pairs:
    raise ValueError("state must contain at least one array, found an empty pytree")
  nested: dict = {}
  for path, leaf in pairs:
    name = "/".join(path)
    value = _unwrap(leaf)
    if not path:
      raise TypeError(
          f"state must be a pytree container (dict, nnx.State, ...), got {type(value).__name__}"
      )
    if isinstance(value, jax.ShapeDtypeStruct):
      raise TypeError(f"state leaf '{name}' must be a concrete array, got an abstract {value}")
    if hasattr(value, "dtype") and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
      raise TypeError(
          f"state leaf '{name}' is a typed PRNG key; store jax.random.key_data(key) instead, "
          "or save only the parameters, e.g. nnx.state(model, nnx.Param)"
      )
    node = nested
    for part in path[:-1]:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ValueError(f"state leaf '{name}' clashes with another leaf of the same path")
    if path[-1] in node:
      raise ValueError(f"state leaf '{name}' clashes with another leaf of the same path")
    node[path[-1]] = np.asarray(value)
  return nested


def _restore_leaf(name: str, spec, found: np.ndarray, where: Path):
  """Checks one stored array against its target leaf and returns it in the target's type."""
  value = _unwrap(spec)
  # Python scalars (e.g. early-stopping counters) match by kind and come back as Python scalars.
  is_scalar = isinstance(value, (bool, int, float, complex)) and not isinstance(value, np.generic)
  if is_scalar:
    ok = found.shape == () and found.dtype.kind == np.asarray(value).dtype.kind
    want = f"a Python {type(value).__name__} (shape ())"
  else:
    shape, dtype = tuple(value.shape), np.dtype(value.dtype)
    ok = found.shape == shape and found.dtype == dtype
    want = f"shape {shape} dtype {dtype}"
  if not ok:
    raise CheckpointError(
        f"{where}: leaf '{name}' expected {want} (from target), "
        f"found shape {found.shape} dtype {found.dtype}"
    )
  if is_scalar:
    new = type(value)(found.item())
  elif isinstance(value, np.ndarray):
    new = found
  elif isinstance(value, np.generic):
    new = found[()]
  else:  # A jax.Array or ShapeDtypeStruct: a device array, on the target's sharding if any.
    new = jax.device_put(found, getattr(value, "sharding", None))
  return spec.replace(value=new) if isinstance(spec, nnx.Variable) else new


def fit_to_target(nested: dict, target, where: Path):
  stored = {path: np.asarray(leaf) for path, leaf in _flatten(nested)[0]}
  pairs, treedef = _flatten(target)
  wanted = {path for path, _ in pairs}
  missing = sorted("/".join(p) for p in wanted - stored.keys())
  extra = sorted("/".join(p) for p in stored.keys() - wanted)
  if missing or extra:
    raise CheckpointError(
        f"{where}: the stored arrays do not match the target's structure: "
        f"missing from checkpoint {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
        f"not in target {extra[:5]}{' ...' if len(extra) > 5 else ''}"
    )
  leaves = [_restore_leaf("/".join(path), spec, stored[path], where) for path, spec in pairs]
  return jax.tree_util.tree_unflatten(treedef, leaves)


# ---------------------------------------------------------------- disk


def _checkpointer() -> ocp.Checkpointer:
  # Each save or load here is one process's own business (`save` makes it
  # atomic with renames), so orbax must neither wait at barriers for the other
  # processes of a multi-host run nor leave the writing to process 0: this
  # process is the only one taking part. (No change with a single process.)
  me = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                          active_processes={jax.process_index()})
  return ocp.Checkpointer(ocp.StandardCheckpointHandler(multiprocessing_options=me),
                          multiprocessing_options=me)


def _write_params(path: Path, nested: dict) -> None:
  # The synchronous Checkpointer returns only once everything is on disk, so
  # no background save can still be running when the directory is renamed.
  with _checkpointer() as ckptr:
    ckptr.save(path, args=ocp.args.StandardSave(nested))


def read_params(path: Path) -> dict:
  path = Path(path).absolute()  # Orbax refuses relative paths; `check` passes the user's.
  try:
    with _checkpointer() as ckptr:
      restored = ckptr.restore(path, args=ocp.args.StandardRestore())
  except (ValueError, OSError, KeyError) as e:
    # Orbax/tensorstore errors for a missing or truncated file are long and
    # unspecific; keep their first line, and raise the error callers catch.
    detail = (str(e).strip().splitlines() or [""])[0][:200]
    raise CheckpointError(
        f"{path}: expected readable orbax arrays, found missing or corrupt files "
        f"({type(e).__name__}: {detail})") from e
  return jax.tree.map(np.asarray, restored)


def fsync_tree(root: Path) -> None:
  for dirpath, _, filenames in os.walk(root):
    for filename in filenames:
      fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    fsync_dir(Path(dirpath))


def remove_tree(path: Path) -> None:
  # The marker goes first, so a deletion killed halfway never leaves a
  # directory that still claims to be a complete checkpoint.
  try:
    os.remove(path / MARKER)
  except OSError:
    pass
  shutil.rmtree(path, ignore_errors=True)


def swap_into_place(tmp: Path, directory: Path) -> None:
  """Renames the complete `tmp` to `directory`, replacing any old checkpoint there."""
  if not directory.exists():
    os.replace(tmp, directory)
    fsync_dir(directory.parent)
    return
  # A directory cannot be renamed over a non-empty one, so the old checkpoint
  # steps aside first; it is deleted only once the new one is in place.
  token = tmp.name[len(f"{directory.name}.tmp-"):]
  old = directory.parent / f"{directory.name}.old-{token}"
  os.replace(directory, old)
  try:
    os.replace(tmp, directory)
  except BaseException:
    os.replace(old, directory)
    raise
  fsync_dir(directory.parent)
  remove_tree(old)


def _is_checkpoint_or_empty(directory: Path) -> bool:
  return directory.is_dir() and ((directory / MARKER).is_file() or not any(directory.iterdir()))


def save(directory: str | os.PathLike, state, config: dict, *, overwrite: bool = True) -> None:
  """Atomically writes `state` and `config` as a checkpoint at `directory`.

  Args:
    directory: checkpoint path; its parent is created if needed.
    state: pytree of arrays (e.g. an `nnx.State`, a dict, optax state); every
      leaf is stored as a numpy array under its pytree path.
    config: JSON-serialisable dict saved as `config.json`, with
      "format_version" and "library_version" added.
    overwrite: whether an existing checkpoint at `directory` may be replaced.
  """
  directory = Path(directory).absolute()  # Orbax wants absolute paths.
  if not isinstance(config, dict):
    raise TypeError(f"config must be a dict, got {type(config).__name__}")
  meta = {"format_version": FORMAT_VERSION, "library_version": __version__}
  config = {**meta, **{k: v for k, v in config.items() if k not in meta}}
  config_text = json.dumps(config, indent=2) + "\n"  # Fails here, before touching the disk.
  nested = _to_nested_numpy(state)
  if directory.exists():
    if not overwrite:
      raise CheckpointError(
          f"{directory}: expected a new path (overwrite=False), found an existing one"
      )
    if not _is_checkpoint_or_empty(directory):
      raise CheckpointError(
          f"{directory}: refusing to replace it, expected a checkpoint (with a {MARKER} marker) "
          "or an empty directory, found other contents"
      )
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(temp_dir(directory.parent, prefix=f"{directory.name}.tmp-"))
  try:
    _write_params(tmp / PARAMS, nested)
    (tmp / CONFIG).write_text(config_text)
    fsync_tree(tmp)
    # The marker goes last: a directory that has it has everything else.
    with open(tmp / MARKER, "w") as f:
      f.flush()
      os.fsync(f.fileno())
    fsync_dir(tmp)
    swap_into_place(tmp, directory)
  except BaseException:
    remove_tree(tmp)
    raise


def recover_moved_aside(directory: Path) -> Path | None:
  """Where the previous checkpoint is after a save was killed between its two renames.

  Such a save leaves the previous (complete) checkpoint at `<name>.old-<token>`
  and nothing at `directory`. It is moved back, as `TrainCheckpointer` does for
  its steps; where that fails (a read-only file system) it is read in place.
  Returns None when there is no such checkpoint.
  """
  name = glob.escape(directory.name)
  olds = [p for p in directory.parent.glob(f"{name}.old-*") if (p / MARKER).is_file()]
  if not olds:
    return None
  old = max(olds, key=lambda p: p.stat().st_mtime)
  try:
    os.replace(old, directory)
  except OSError:
    return old
  return directory


def _checked(directory: str | os.PathLike) -> tuple[Path, dict]:
  """Validates a checkpoint directory and returns its absolute path and config."""
  directory = Path(directory).absolute()
  if not directory.is_dir():
    directory = recover_moved_aside(directory) or directory
  if not directory.is_dir():
    name = glob.escape(directory.name)
    leftovers = sorted(
        str(p) for kind in ("tmp", "old") for p in directory.parent.glob(f"{name}.{kind}-*")
    )
    hint = f" (an interrupted save left {leftovers})" if leftovers else ""
    raise CheckpointError(f"{directory}: expected a checkpoint directory, found none{hint}")
  if not (directory / MARKER).is_file():
    raise CheckpointError(
        f"{directory}: expected a complete checkpoint with a {MARKER} marker, found none "
        "(an interrupted save, or not a checkpoint)"
    )
  leaving = links_leaving(directory)
  if leaving:  # Every file of a checkpoint lies in its folder.
    raise CheckpointError(f"{directory}: expected every file inside the checkpoint folder, "
                          f"found links leaving it: {leaving[:5]}")
  path = directory / CONFIG
  try:
    config = json.loads(path.read_text())
  except FileNotFoundError:
    raise CheckpointError(f"{path}: expected a JSON config file, found none") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: expected valid JSON, found a parse error: {e}") from None
  if not isinstance(config, dict):
    raise CheckpointError(f"{path}: expected a JSON object, found {type(config).__name__}")
  if config.get("format_version") != FORMAT_VERSION:
    raise CheckpointError(
        f"{path}: expected format_version {FORMAT_VERSION}, found {config.get('format_version')!r}"
    )
  if not (directory / PARAMS).is_dir():
    raise CheckpointError(
        f"{directory / PARAMS}: expected an orbax checkpoint directory, found none"
    )
  return directory, config


def read_config(directory: str | os.PathLike) -> dict:
  """The config of the checkpoint at `directory`, validated as by `load`; reads no arrays."""
  return _checked(directory)[1]


def load(directory: str | os.PathLike, target=None) -> tuple[Any, dict]:
  """Reads the checkpoint at `directory`.

  Args:
    directory: a checkpoint written by `save`.
    target: optional pytree with the structure to restore into, e.g.
      `nnx.state(nnx.eval_shape(...))`, an optax state, or a concrete pytree.
      Its leaves (arrays, `jax.ShapeDtypeStruct`s or Python scalars) give the
      expected shape and dtype of each stored array.

  Returns:
    `(state, config)`: with a target, a pytree of its structure whose jax
    leaves are device arrays and numpy leaves numpy arrays; without one, a
    nested dict of numpy arrays keyed by path as strings (tuples and list
    indices become "0", "1", ...). `config` includes "format_version" and
    "library_version".
  """
  directory, config = _checked(directory)
  nested = read_params(directory / PARAMS)
  if target is None:
    return nested, config
  return fit_to_target(nested, target, directory / PARAMS), config


# ---------------------------------------------------------------- training


def _digest(value) -> str | None:
  """A short digest of a JSON-serialisable value (ids, qrels), None for None."""
  if value is None:
    return None
  text = json.dumps(value, sort_keys=True, default=str).encode()
  return hashlib.sha256(text).hexdigest()[:16]


def resume_fingerprint(*, corpus, queries=None, qrels=None, query_ids=None, corpus_ids=None,
                       config: dict) -> dict:
  """What decides a fit, recorded in its resume state: inputs and settings.

  Args:
    corpus: the corpus embeddings as given to `fit`, with shape [n_docs, d].
    queries: the query embeddings, with shape [n_queries, d], or None.
    qrels, query_ids, corpus_ids: as given to `fit` (None when unused).
    config: the resolved `TrainConfig.to_dict()` (seed, steps, dims, ...).

  Returns:
    A JSON-serialisable dict; two fits that may share resume state have equal
    fingerprints.
  """
  from adaptor.data import fingerprint
  return {
      "corpus": fingerprint(corpus),
      "queries": None if queries is None else fingerprint(queries),
      "qrels": _digest(qrels),
      "query_ids": _digest(None if query_ids is None else [str(q) for q in query_ids]),
      "corpus_ids": _digest(None if corpus_ids is None else [str(c) for c in corpus_ids]),
      "config": json.loads(json.dumps(config, default=str)),
      "library_version": __version__,
  }


def fingerprint_diff(old, new) -> list[str]:
  """The entries in which two fingerprints differ; config fields as `config.NAME (a -> b)`."""
  if not isinstance(old, dict):
    return ["fingerprint (none recorded)"]
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if a == b:
      continue
    if key == "config" and isinstance(a, dict) and isinstance(b, dict):
      out += [f"config.{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in sorted(set(a) | set(b))
              if a.get(k) != b.get(k)]
    else:
      out.append(key)
  return out


def remove_resume_state(directory: str | os.PathLike) -> None:
  """Deletes the training checkpoints a fit kept in `directory`, and it if left empty.

  Only `<stage>/step_*` checkpoints (and leftovers of their saves) are
  removed: a directory the caller shares with other files keeps them.
  """
  directory = Path(directory).absolute()
  if not directory.is_dir():
    return
  for stage in list(directory.iterdir()):
    if not stage.is_dir() or stage.is_symlink():
      continue
    for child in list(stage.iterdir()):
      if _STEP_RE.fullmatch(child.name) or _LEFTOVER_RE.fullmatch(child.name):
        remove_tree(child)
    with contextlib.suppress(OSError):
      stage.rmdir()  # Only if empty.
  with contextlib.suppress(OSError):
    directory.rmdir()


class TrainCheckpointer:
  """Keeps the latest `keep` training checkpoints as `directory/step_<n>/`.

  Each step is a checkpoint as written by `save`, whose config is
  `{"step": step, "meta": meta, "fingerprint": fingerprint}`; leftovers of a
  crashed save are ignored by `latest` and removed by `save` and `restore`.
  With a `fingerprint`, `restore` refuses a step recorded with another one
  (the resume state of another fit), naming what differs.
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 1,
               fingerprint: dict | None = None):
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
      raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    self.directory = Path(directory).absolute()
    self.keep = keep
    self.fingerprint = fingerprint

  def _complete_steps(self) -> dict[int, Path]:
    if not self.directory.is_dir():
      return {}
    steps = {}
    for child in self.directory.iterdir():
      match = _STEP_RE.fullmatch(child.name)
      if match and (child / MARKER).is_file():
        steps[int(match.group(1))] = child
    return steps

  def _clean_leftovers(self) -> None:
    for child in list(self.directory.iterdir()) if self.directory.is_dir() else []:
      match = _LEFTOVER_RE.fullmatch(child.name)
      if not match:
        continue
      live = self.directory / match.group(1)
      if match.group(2) == "old" and not live.exists() and (child / MARKER).is_file():
        os.replace(child, live)  # A crash between the two renames of an overwrite.
      else:
        remove_tree(child)

  def latest(self) -> int | None:
    """The highest step with a complete checkpoint, or None."""
    return max(self._complete_steps(), default=None)

  def save(self, step: int, state, meta: dict) -> None:
    """Atomically writes `state` (pytree of arrays) and `meta` (JSON) for `step`, then prunes."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"step must be an int >= 0, got {step!r}")
    save(self.directory / f"step_{int(step):09d}", state,
         {"step": int(step), "meta": meta, "fingerprint": self.fingerprint})
    self._clean_leftovers()
    steps = self._complete_steps()
    for old in sorted(steps)[: -self.keep]:
      remove_tree(steps[old])

  def restore(self, target=None) -> tuple[int, Any, dict]:
    """Loads the latest complete checkpoint into `target` (see `load`).

    Returns:
      `(step, state, meta)`.
    """
    self._clean_leftovers()
    step = self.latest()
    if step is None:
      raise CheckpointError(
          f"{self.directory}: expected at least one complete step_* checkpoint, found none"
      )
    path = self._complete_steps()[step]
    if self.fingerprint is not None:
      # Before the arrays: another fit's arrays may not even fit the target.
      differ = fingerprint_diff(read_config(path).get("fingerprint"), self.fingerprint)
      if differ:
        raise CheckpointError(
            f"{self.directory}: expected the resume state of this fit, found that of another "
            f"fit (differs in: {', '.join(differ)}); delete {self.directory.parent} to start "
            "afresh, or rerun with the inputs and settings it was made with")
    state, config = load(path, target)
    return step, state, config["meta"]
