"""Bad-input catalogue: each case through the Python API and through the CLI.

Every refusal must name the file or argument, what was expected and what was
found; the CLI must exit with status 2 and print that on stderr. Every
refusal must also leave the files it was given, and any earlier output,
byte-for-byte as they were, with no temporary files left behind (`_untouched`).
Nothing here trains: a tiny adaptor with random weights is saved once.
"""

import argparse
import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flax import nnx

import adaptor
from adaptor import checkpoint, doctor
from adaptor.cli import build_parser, main
from adaptor.cli.check import add_check_command
from adaptor.data import InputError, check_qrels, load_qrels
from adaptor.model import MatryoshkaAdaptor

# After a failed read of a corrupt checkpoint, orbax leaves an asyncio callback
# that fires on a closed event loop ("Event loop is closed") when collected.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

D = 8
GOOD = np.random.default_rng(0).normal(size=(20, D)).astype(np.float32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """A saved adaptor for d=8 (random weights; nothing here needs a trained one)."""
  path = tmp_path_factory.mktemp("ckpt") / "tiny"
  adaptor.Adaptor(MatryoshkaAdaptor(D, hidden=4, rngs=nnx.Rngs(0))).save(path)
  return path


def _snapshot(*roots) -> dict:
  """Every file and directory under `roots`: path -> (sha256 of the bytes, mtime_ns)."""
  out = {}
  for root in roots:
    for dirpath, dirnames, filenames in os.walk(root):
      for name in dirnames:
        out[os.path.join(dirpath, name)] = ("dir", None)
      for name in filenames:
        p = os.path.join(dirpath, name)
        with open(p, "rb") as f:
          out[p] = (hashlib.sha256(f.read()).hexdigest(), os.stat(p).st_mtime_ns)
  return out


@contextlib.contextmanager
def _untouched(*roots):
  """Asserts that nothing under `roots` was created, removed or changed."""
  before = _snapshot(*roots)
  yield
  after = _snapshot(*roots)
  assert sorted(set(after) - set(before)) == [], "files left behind"
  assert sorted(set(before) - set(after)) == [], "files removed"
  assert {p: v for p, v in after.items() if before[p] != v} == {}, "files changed"


def _cli_refuses(capsys, argv, *needles, roots):
  """Runs the CLI, which must exit 2 naming every needle on stderr and touching nothing."""
  capsys.readouterr()
  with _untouched(*roots):
    rc = main([str(a) for a in argv])
  err = capsys.readouterr().err
  assert rc == 2, err
  assert err.startswith(f"matryoshka-adaptor {argv[0]}: error: "), err
  for needle in needles:
    assert str(needle) in err, (needle, err)
  return err


def _api_refuses(fn, exc, *needles, roots=()):
  with _untouched(*roots):
    with pytest.raises(exc) as e:
      fn()
  for needle in needles:
    assert str(needle) in str(e.value), (needle, str(e.value))
  return str(e.value)


def _apply_argv(ckpt, path, out_dir, *extra):
  argv = ["apply", "--checkpoint", ckpt, "--input", path, "--output", out_dir / "out.npy", *extra]
  return [str(a) for a in argv]


# ---------------------------------------------------------------- array contents

def _with_row(row_value, *, at=3):
  x = GOOD.copy()
  x[at] = row_value
  return x


def _nan_row():
  x = GOOD.copy()
  x[3, 2] = np.nan
  return x


def _inf_row():
  x = GOOD.copy()
  x[3, 5] = -np.inf
  return x


# name -> (array, what the message must say about it)
BAD_ARRAYS = {
    "nan": (_nan_row(), ["1 row with NaN (1 NaN values) (first rows [3])", "out of 20 rows"]),
    "inf": (_inf_row(), ["1 row with Inf (1 Inf values) (first rows [3])"]),
    "all-zero": (_with_row(0.0), ["1 row all zeros (first rows [3])"]),
    # float32 denormals: the norm underflows; normalising would give a zero
    # vector (or, after the adaptor, its image of zero) without a word.
    "denormal": (_with_row(1e-40), ["1 row with an L2 norm below 1e-12", "first rows [3]"]),
    "tiny-normal": (_with_row(1e-20), ["1 row with an L2 norm below 1e-12"]),
    # The float32 squared norm overflows: normalising would give zeros too.
    "huge": (_with_row(1e20), ["1 row with an L2 norm above 1.84e+19"]),
    "strings": (np.full((3, D), "a"), ["must have a real float or integer dtype",
                                       "got dtype <U1"]),
    "1-D": (GOOD[0], ["must be 2-D [n, d]", "got 1-D array with shape (8,)"]),
    "3-D": (GOOD.reshape(4, 5, 8), ["must be 2-D [n, d]", "got 3-D array with shape (4, 5, 8)"]),
    "no rows": (np.zeros((0, D), np.float32), ["at least 1 row", "got shape (0, 8)"]),
}


@pytest.mark.parametrize("case", list(BAD_ARRAYS))
def test_bad_array_refused_by_api(case, tmp_path):
  x, needles = BAD_ARRAYS[case]
  path = tmp_path / f"{case}.npy"
  np.save(path, x)
  _api_refuses(lambda: adaptor.load_embeddings(path), InputError, path, *needles, roots=[tmp_path])
  a = adaptor.Adaptor(MatryoshkaAdaptor(D, hidden=0, rngs=nnx.Rngs(0)))
  if case != "1-D":  # Adaptor.apply takes one vector [d] (tests/test_guarantees.py).
    _api_refuses(lambda: a.apply(x), InputError, "embeddings", *needles)


@pytest.mark.parametrize("case", list(BAD_ARRAYS))
def test_bad_array_refused_by_cli(case, ckpt, tmp_path, capsys):
  x, needles = BAD_ARRAYS[case]
  path = tmp_path / f"{case}.npy"
  np.save(path, x)
  _cli_refuses(capsys, _apply_argv(ckpt, path, tmp_path), "--input", path, *needles,
               roots=[tmp_path, ckpt])
  _cli_refuses(capsys, ["fit", "--corpus", path, "--out", tmp_path / "ck", "--quiet"],
               "--corpus", *needles, roots=[tmp_path])


def test_denormal_and_huge_vectors_never_become_nan_in_truncate_or_search():
  # Below the API's checks (which refuse such rows), truncate and search treat
  # a row they cannot normalise as the zero vector: finite, never NaN.
  x = np.stack([np.full(D, 1e-40), np.full(D, 1e-20), np.full(D, 1e20), GOOD[0]]).astype(np.float32)
  t = np.asarray(adaptor.truncate(jnp.asarray(x), 4))
  assert np.isfinite(t).all()
  np.testing.assert_array_equal(t[:3], 0.0)
  np.testing.assert_allclose(np.linalg.norm(t[3]), 1.0, rtol=1e-6)
  scores, idx = adaptor.exact_search(x, GOOD, 3, dim=4)
  assert np.isfinite(scores).all() and (idx >= 0).all()
  scores, idx = adaptor.exact_search(GOOD[:2], np.concatenate([x, GOOD]), 5, dim=4)
  assert np.isfinite(scores).all()


@pytest.mark.parametrize("dtype", [np.int8, np.int64, np.uint16, np.float64])
def test_int_and_float64_are_accepted_and_converted(dtype, ckpt, tmp_path, capsys):
  x = np.round(GOOD * 10).astype(dtype) if dtype != np.float64 else GOOD.astype(np.float64)
  if dtype == np.uint16:
    x = np.abs(np.round(GOOD * 10)).astype(dtype) + 1
  path = tmp_path / "x.npy"
  np.save(path, x)
  emb = adaptor.load_embeddings(path)
  assert emb.vectors.dtype == np.float32
  np.testing.assert_array_equal(emb.vectors, x.astype(np.float32))
  assert main(_apply_argv(ckpt, path, tmp_path, "--dim", "4")) == 0, capsys.readouterr().err
  want = adaptor.load(ckpt).apply(x.astype(np.float32), dim=4)
  np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), want)


def test_wrong_dim_refused(ckpt, tmp_path, capsys):
  x = GOOD[:, :5].copy()
  path = tmp_path / "d5.npy"
  np.save(path, x)
  a = adaptor.load(ckpt)
  _api_refuses(lambda: a.apply(x), InputError, "embeddings must have d=8 columns",
               "got shape (20, 5)")
  _api_refuses(lambda: adaptor.load(ckpt, d_in=5), adaptor.CheckpointError, ckpt,
               "adaptor expects embeddings with d_in=8, but the embeddings have d=5", roots=[ckpt])
  _cli_refuses(capsys, _apply_argv(ckpt, path, tmp_path), "--input", path, "expects d=8",
               "got d=5", roots=[tmp_path, ckpt])


@pytest.mark.parametrize("bad", [0, 9, -1])
def test_apply_dim_out_of_range_refused(bad, ckpt, tmp_path, capsys):
  path = tmp_path / "x.npy"
  np.save(path, GOOD)
  a = adaptor.load(ckpt)
  _api_refuses(lambda: a.apply(GOOD, dim=bad), ValueError, "dim must be in [1, 8]", f"got {bad}")
  _cli_refuses(capsys, _apply_argv(ckpt, path, tmp_path, "--dim", bad), "dim must be in [1, 8]",
               f"got {bad}", roots=[tmp_path, ckpt])


# ---------------------------------------------------------------- broken files

def _empty_file(path):
  path.write_bytes(b"")


def _truncated_npy(path):
  np.save(path, GOOD)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) - 100])


def _object_npy(path):
  np.save(path, np.array([[1.0, "x"]], dtype=object), allow_pickle=True)


def _header_only_npy(path):
  np.save(path, GOOD)
  data = path.read_bytes()
  path.write_bytes(data[:128])


BAD_FILES = {
    "empty file": (_empty_file, ["is not a readable .npy array (truncated or corrupt?)"]),
    "truncated": (_truncated_npy, ["is not a readable .npy array (truncated or corrupt?)"]),
    "header only": (_header_only_npy, ["is not a readable .npy array (truncated or corrupt?)"]),
    "object dtype": (_object_npy, ["must hold a numeric array, got dtype object"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
@pytest.mark.parametrize("mmap", [True, False])
def test_broken_npy_refused_by_api(case, mmap, tmp_path):
  write, needles = BAD_FILES[case]
  path = tmp_path / "x.npy"
  write(path)
  _api_refuses(lambda: adaptor.load_embeddings(path, mmap=mmap), InputError, path, *needles,
               roots=[tmp_path])


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_broken_npy_refused_by_cli(case, ckpt, tmp_path, capsys):
  write, needles = BAD_FILES[case]
  path = tmp_path / "x.npy"
  write(path)
  _cli_refuses(capsys, _apply_argv(ckpt, path, tmp_path), path, *needles, roots=[tmp_path, ckpt])


def _parquet_missing_column(path):
  pq.write_table(pa.table({"vec": [row.tolist() for row in GOOD]}), path)


def _parquet_ragged(path):
  rows = [row.tolist() for row in GOOD]
  rows[2] = rows[2][:7]
  pq.write_table(pa.table({"embedding": rows}), path)


BAD_PARQUET = {
    "missing column": (_parquet_missing_column,
                       ["has no column 'embedding'", "available columns: ['vec']"]),
    "ragged column": (_parquet_ragged, ["column 'embedding'", "must have rows of equal length",
                                        "row 0 has 8 values but row 2 has 7"]),
}


@pytest.mark.parametrize("case", list(BAD_PARQUET))
def test_bad_parquet_refused(case, ckpt, tmp_path, capsys):
  write, needles = BAD_PARQUET[case]
  path = tmp_path / "x.parquet"
  write(path)
  _api_refuses(lambda: adaptor.load_embeddings(path), InputError, path, *needles, roots=[tmp_path])
  _cli_refuses(capsys, _apply_argv(ckpt, path, tmp_path), path, *needles, roots=[tmp_path, ckpt])
  _cli_refuses(capsys, ["fit", "--corpus", path, "--out", tmp_path / "ck", "--quiet"],
               path, *needles, roots=[tmp_path])


# ---------------------------------------------------------------- ids and qrels

def _write_ids(path, ids):
  path.write_text("".join(f"{i}\n" for i in ids))


def test_duplicate_ids_refused(tmp_path, capsys):
  np.save(tmp_path / "c.npy", GOOD)
  ids = [f"d{i}" for i in range(20)]
  ids[7] = "d2"
  _write_ids(tmp_path / "ids.txt", ids)
  needles = ["must be unique", "duplicate id 'd2' at positions 2 and 7"]
  _api_refuses(lambda: adaptor.load_embeddings(tmp_path / "c.npy", ids=tmp_path / "ids.txt"),
               InputError, tmp_path / "ids.txt", *needles, roots=[tmp_path])
  _api_refuses(lambda: adaptor.load_embeddings(GOOD, ids=ids), InputError, *needles)
  _cli_refuses(capsys, ["fit", "--corpus", tmp_path / "c.npy", "--corpus-ids", tmp_path / "ids.txt",
                        "--out", tmp_path / "ck", "--quiet"], tmp_path / "ids.txt", *needles,
               roots=[tmp_path])


def test_empty_ids_and_qrels_files_refused(tmp_path, capsys):
  np.save(tmp_path / "c.npy", GOOD)
  (tmp_path / "ids.txt").write_text("")
  (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n")
  _api_refuses(lambda: adaptor.load_embeddings(tmp_path / "c.npy", ids=tmp_path / "ids.txt"),
               InputError, tmp_path / "ids.txt", "got an empty file", roots=[tmp_path])
  _api_refuses(lambda: load_qrels(tmp_path / "qrels.tsv"), InputError, tmp_path / "qrels.tsv",
               "must hold at least one judgement, got none", roots=[tmp_path])
  _cli_refuses(capsys, ["fit", "--corpus", tmp_path / "c.npy", "--corpus-ids", tmp_path / "ids.txt",
                        "--out", tmp_path / "ck", "--quiet"], tmp_path / "ids.txt",
               "got an empty file", roots=[tmp_path])


def _supervised_files(tmp_path, qrels_text):
  np.save(tmp_path / "c.npy", GOOD)
  np.save(tmp_path / "q.npy", GOOD[:4])
  _write_ids(tmp_path / "cids.txt", [f"d{i}" for i in range(20)])
  _write_ids(tmp_path / "qids.txt", [f"q{i}" for i in range(4)])
  (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels_text)
  return ["fit", "--corpus", tmp_path / "c.npy", "--corpus-ids", tmp_path / "cids.txt",
          "--queries", tmp_path / "q.npy", "--query-ids", tmp_path / "qids.txt",
          "--qrels", tmp_path / "qrels.tsv", "--supervised", "--out", tmp_path / "ck", "--quiet"]


@pytest.mark.parametrize("qrels_text, needles", [
    ("q0\td1\t1\nq1\tnope\t1\nq2\tnope2\t2\n",
     ["has 2 document ids not in the corpus ids", "['nope', 'nope2']"]),
    ("q0\td1\t1\nqX\td2\t1\n", ["has 1 query ids not in the query ids", "['qX']"]),
])
def test_qrels_naming_unknown_ids_refused(qrels_text, needles, tmp_path, capsys):
  argv = _supervised_files(tmp_path, qrels_text)
  qrels = load_qrels(tmp_path / "qrels.tsv")
  cids = [f"d{i}" for i in range(20)]
  qids = [f"q{i}" for i in range(4)]
  _api_refuses(lambda: check_qrels(qrels, query_ids=qids, doc_ids=cids), InputError, *needles)
  _api_refuses(lambda: adaptor.fit(GOOD, queries=GOOD[:4], qrels=qrels, query_ids=qids,
                                    corpus_ids=cids, quiet=True), InputError, *needles)
  _cli_refuses(capsys, argv, tmp_path / "qrels.tsv", *needles, roots=[tmp_path])


# ---------------------------------------------------------------- dims and k

@pytest.mark.parametrize("dims, needles", [
    ((8, 4), ["dims must be strictly increasing without repeats, got [8, 4]"]),
    ((4, 4, 8), ["dims must be strictly increasing without repeats, got [4, 4, 8]"]),
    ((0, 4), ["must be in [1, 8] (the vector size), got 0"]),
    ((4, 9), ["must be in [1, 8] (the vector size), got 9"]),
])
def test_bad_dims_refused_before_training(dims, needles, tmp_path, capsys):
  np.save(tmp_path / "c.npy", GOOD)
  _api_refuses(lambda: adaptor.fit(GOOD, dims=dims, quiet=True), ValueError, *needles)
  _cli_refuses(capsys, ["fit", "--corpus", tmp_path / "c.npy", "--dims", ",".join(map(str, dims)),
                        "--out", tmp_path / "ck", "--quiet"], *needles, roots=[tmp_path])


@pytest.mark.parametrize("k", [0, -1, 21])
def test_k_out_of_range_refused_by_exact_search(k):
  # No CLI command takes k; eval always scores the top 10 and 100.
  _api_refuses(lambda: adaptor.exact_search(GOOD[:3], GOOD, k), ValueError,
               "k must be an int in [1, 20] (the corpus size)", f"got {k}")
  _api_refuses(lambda: adaptor.exact_search(GOOD[:3], GOOD, k, dim=4), ValueError,
               "k must be an int in [1, 20]")


# ---------------------------------------------------------------- checkpoints

def _drop(rel):
  def mutate(path):
    target = path / rel
    shutil.rmtree(target) if target.is_dir() else target.unlink()
  return mutate


def _other_version(path):
  cfg = json.loads((path / "config.json").read_text())
  cfg["library_version"] = "9.9.0"
  (path / "config.json").write_text(json.dumps(cfg))


def _other_format(path):
  cfg = json.loads((path / "config.json").read_text())
  cfg["format_version"] = 99
  (path / "config.json").write_text(json.dumps(cfg))


def _truncate_data(path):
  for f in (path / "params" / "d").iterdir():
    f.write_bytes(f.read_bytes()[:10])


BAD_CHECKPOINTS = {
    "no COMPLETE marker": (_drop("COMPLETE"), ["expected a complete checkpoint with a COMPLETE "
                                               "marker, found none"]),
    "no config.json": (_drop("config.json"), ["config.json: expected a JSON config file, found none"]),
    "no params": (_drop("params"), ["params: expected an orbax checkpoint directory, found none"]),
    "no params metadata": (_drop("params/_METADATA"), ["expected readable orbax arrays, found "
                                                       "missing or corrupt files"]),
    "no params data": (_drop("params/d"), ["expected readable orbax arrays"]),
    "truncated params data": (_truncate_data, ["expected readable orbax arrays"]),
    "other library version": (_other_version, ["expected a checkpoint from matryoshka-adaptor "
                                               f"{adaptor.__version__}",
                                               "found library_version '9.9.0'"]),
    "other format version": (_other_format, ["expected format_version 1, found 99"]),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_broken_checkpoint_refused(case, ckpt, tmp_path, capsys):
  mutate, needles = BAD_CHECKPOINTS[case]
  bad = tmp_path / "bad"
  shutil.copytree(ckpt, bad)
  mutate(bad)
  np.save(tmp_path / "x.npy", GOOD)
  # CheckpointError, not whatever orbax or tensorstore raised: callers catch one error.
  _api_refuses(lambda: adaptor.load(bad), adaptor.CheckpointError, bad, *needles, roots=[tmp_path])
  _cli_refuses(capsys, ["apply", "--checkpoint", bad, "--input", tmp_path / "x.npy",
                        "--output", tmp_path / "out.npy"], bad, *needles, roots=[tmp_path])


def test_checkpoint_killed_between_renames_is_recovered_by_load(ckpt, tmp_path):
  # An overwrite moves the old checkpoint to <name>.old-<token>, then renames
  # the new one in. A kill in between leaves no <name>; load must find the old one.
  live = tmp_path / "ck"
  shutil.copytree(ckpt, live)
  moved = tmp_path / "ck.old-abc123"
  os.replace(live, moved)
  half = tmp_path / "ck.tmp-abc123"
  shutil.copytree(ckpt, half)
  (half / "COMPLETE").unlink()
  a = adaptor.load(live)
  np.testing.assert_array_equal(a.apply(GOOD), adaptor.load(ckpt).apply(GOOD))
  assert live.is_dir() and not moved.exists()
  with pytest.raises(adaptor.CheckpointError, match="expected a complete checkpoint"):
    adaptor.load(half)


# ---------------------------------------------------------------- unwritable outputs

@contextlib.contextmanager
def _read_only(folder: Path, monkeypatch):
  """Makes `folder` refuse new entries: chmod 0o555, or, where that does not stop
  writes (root ignores permission bits), os.open/os.mkdir failing there with
  EACCES as the kernel would."""
  folder.chmod(0o555)
  try:
    probe = folder / ".probe"
    try:
      probe.write_bytes(b"")
      probe.unlink()
      writable = True
    except PermissionError:
      writable = False
    if writable:  # Running as root.
      real_open, real_mkdir = os.open, os.mkdir

      def refuse(real):
        def wrapped(path, *args, **kwargs):
          if Path(os.fsdecode(path)).absolute().parent == folder.absolute():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
          return real(path, *args, **kwargs)
        return wrapped

      monkeypatch.setattr(os, "open", refuse(real_open))
      monkeypatch.setattr(os, "mkdir", refuse(real_mkdir))
    yield
  finally:
    monkeypatch.undo()
    folder.chmod(0o755)


def test_read_only_output_directory(ckpt, tmp_path, capsys, monkeypatch):
  np.save(tmp_path / "x.npy", GOOD)
  ro = tmp_path / "ro"
  ro.mkdir()
  a = adaptor.load(ckpt)
  with _read_only(ro, monkeypatch):
    _cli_refuses(capsys, _apply_argv(ckpt, tmp_path / "x.npy", ro), f"--output {ro}/out.npy",
                 f"--output {ro / 'out.npy'}: could not write", "Permission denied", roots=[tmp_path, ckpt])
    _api_refuses(lambda: a.save(ro / "ck"), PermissionError, ro, roots=[tmp_path])


def _enospc(*args, **kwargs):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _half_then_enospc(file, arr, *args, **kwargs):
  file.write(b"\x93NUMPY" + b"\0" * 50)  # Some bytes reach the disk, then it is full.
  _enospc()


def test_disk_full_during_cli_apply_keeps_earlier_output(ckpt, tmp_path, capsys, monkeypatch):
  np.save(tmp_path / "x.npy", GOOD)
  argv = _apply_argv(ckpt, tmp_path / "x.npy", tmp_path, "--overwrite")
  assert main(argv) == 0  # The earlier output.
  monkeypatch.setattr(np, "save", _half_then_enospc)
  _cli_refuses(capsys, argv, "No space left on device", roots=[tmp_path, ckpt])


def test_disk_full_message_names_the_output(ckpt, tmp_path, capsys, monkeypatch):
  np.save(tmp_path / "x.npy", GOOD)
  monkeypatch.setattr(np, "save", _half_then_enospc)
  _cli_refuses(capsys, _apply_argv(ckpt, tmp_path / "x.npy", tmp_path), tmp_path / "out.npy",
               "No space left on device", roots=[tmp_path])


@pytest.mark.parametrize("where", ["params", "config"])
def test_disk_full_during_adaptor_save_keeps_earlier_checkpoint(where, ckpt, tmp_path, monkeypatch):
  live = tmp_path / "ck"
  shutil.copytree(ckpt, live)
  new = adaptor.Adaptor(MatryoshkaAdaptor(D, hidden=4, rngs=nnx.Rngs(1)))
  if where == "params":
    def write_params(path, nested):
      path.mkdir()
      (path / "partial").write_bytes(b"\0" * 10)
      _enospc()
    monkeypatch.setattr(checkpoint, "_write_params", write_params)
  else:
    real_write_text = Path.write_text

    def write_text(self, text, *args, **kwargs):
      if self.name == "config.json":
        real_write_text(self, text[:5])
        _enospc()
      return real_write_text(self, text, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", write_text)
  _api_refuses(lambda: new.save(live, overwrite=True), OSError, "No space left on device", roots=[tmp_path])
  monkeypatch.undo()
  np.testing.assert_array_equal(adaptor.load(live).apply(GOOD), adaptor.load(ckpt).apply(GOOD))


# ---------------------------------------------------------------- doctor (`check`)

def _check_parser():
  parser = argparse.ArgumentParser(prog="matryoshka-adaptor")
  add_check_command(parser.add_subparsers(dest="command", required=True))
  return parser


def _run_check(argv, capsys):
  args = _check_parser().parse_args(["check", *map(str, argv)])
  capsys.readouterr()
  rc = args.handler(args)
  return rc, capsys.readouterr().out


def test_check_passes_good_files_and_checkpoints(ckpt, tmp_path, capsys):
  np.save(tmp_path / "c.npy", GOOD)
  _write_ids(tmp_path / "ids.txt", [f"d{i}" for i in range(20)])
  pq.write_table(pa.table({"emb": [r.tolist() for r in GOOD]}), tmp_path / "c.parquet")
  assert doctor.check_file(tmp_path / "c.npy", ids=tmp_path / "ids.txt") == []
  assert doctor.check_file(tmp_path / "c.parquet", column="emb") == []
  assert doctor.check_file(ckpt) == []
  rc, out = _run_check([tmp_path / "c.npy", "--ids", tmp_path / "ids.txt"], capsys)
  assert rc == 0 and "OK, embeddings with shape (20, 8) dtype float32" in out
  rc, out = _run_check([ckpt], capsys)
  assert rc == 0 and "OK, an adaptor checkpoint (d_in=8" in out


def test_check_lists_every_problem_of_an_embeddings_file(tmp_path, capsys):
  x = GOOD.copy()
  x[1, 0] = x[4, 4] = np.nan
  x[2, 1] = np.inf
  x[5] = 0.0
  x[6] = 1e-40
  path = tmp_path / "bad.npy"
  np.save(path, x)
  ids = [f"d{i}" for i in range(19)]
  ids[3] = ids[9] = "d0"
  _write_ids(tmp_path / "ids.txt", ids)
  with _untouched(tmp_path):
    problems = doctor.check_file(path, ids=tmp_path / "ids.txt")
  text = "\n".join(problems)
  for needle in ["2 rows with NaN (2 NaN values) (first rows [1, 4])",
                 "1 row with Inf (1 Inf values) (first rows [2])",
                 "1 row all zeros (first rows [5])",
                 "1 row with an L2 norm below 1e-12", "out of 20 rows",
                 "must have one id per row", "(20), got 19 ids",
                 "got 1 duplicated ids (first: 'd0' x3)"]:
    assert needle in text, (needle, text)
  assert all(str(path) in p or "ids.txt" in p for p in problems)
  rc, out = _run_check([path, "--ids", tmp_path / "ids.txt"], capsys)
  assert rc == 2 and "3 problems" in out and out.count("\n  - ") == 3


@pytest.mark.parametrize("case", ["strings", "1-D", "3-D", "no rows"])
def test_check_reports_shape_and_dtype(case, tmp_path):
  x, needles = BAD_ARRAYS[case]
  np.save(tmp_path / "x.npy", x)
  text = "\n".join(doctor.check_file(tmp_path / "x.npy"))
  for needle in needles:
    assert needle in text


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_check_reports_unreadable_files(case, tmp_path):
  write, needles = BAD_FILES[case]
  write(tmp_path / "x.npy")
  (problem,) = doctor.check_file(tmp_path / "x.npy")
  assert all(n in problem for n in needles)


def test_check_reports_missing_paths_and_parquet_columns(tmp_path):
  (problem,) = doctor.check_file(tmp_path / "nope.npy")
  assert "nope.npy does not exist" in problem
  _parquet_ragged(tmp_path / "r.parquet")
  (problem,) = doctor.check_file(tmp_path / "r.parquet")
  assert "row 0 has 8 values but row 2 has 7" in problem
  _parquet_missing_column(tmp_path / "m.parquet")
  (problem,) = doctor.check_file(tmp_path / "m.parquet")
  assert "has no column 'embedding'" in problem


def test_check_lists_every_problem_of_a_checkpoint(ckpt, tmp_path, capsys):
  bad = tmp_path / "bad"
  shutil.copytree(ckpt, bad)
  (bad / "COMPLETE").unlink()
  _other_version(bad)
  _drop("params/d")(bad)
  with _untouched(tmp_path):
    problems = doctor.check_file(bad)
  assert len(problems) == 3, problems
  text = "\n".join(problems)
  assert "expected a COMPLETE marker" in text
  assert ("expected a checkpoint from matryoshka-adaptor 0.1.0 (same major.minor), found "
          "library_version '9.9.0'") in text
  assert "expected readable orbax arrays" in text
  # A config that does not match the stored arrays is caught without loading the model.
  other = tmp_path / "other"
  shutil.copytree(ckpt, other)
  cfg = json.loads((other / "config.json").read_text())
  cfg["adaptor"]["hidden"] = 7
  (other / "config.json").write_text(json.dumps(cfg))
  (problem,) = doctor.check_file(other)
  assert "expected shape" in problem
  rc, out = _run_check([bad], capsys)
  assert rc == 2 and "3 problems" in out


def test_check_through_the_cli_when_wired(tmp_path, capsys):
  sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
  if "check" not in sub.choices:
    pytest.skip("adaptor.cli does not register `check` yet (doctor.add_check_command)")
  np.save(tmp_path / "good.npy", GOOD)
  np.save(tmp_path / "bad.npy", _nan_row())
  assert main(["check", str(tmp_path / "good.npy")]) == 0
  assert main(["check", str(tmp_path / "bad.npy")]) == 2
  assert "1 row with NaN" in capsys.readouterr().out


def test_check_reads_indexes_and_apply_outputs_and_names_a_damaged_file(ckpt, tmp_path, capsys):
  from adaptor.index import MatryoshkaIndex
  from adaptor.stream import apply_files

  rng = np.random.default_rng(0)
  corpus = rng.normal(size=(40, 8)).astype(np.float32)
  MatryoshkaIndex.build(corpus, stores={"binary": 8}).save(tmp_path / "ix")
  rc, out = _run_check([tmp_path / "ix"], capsys)
  assert rc == 0 and "OK, a search index (40 x 8 float32, adaptor: no, quantised stores: binary 8)" in out
  np.save(tmp_path / "in.npy", corpus)
  apply_files(adaptor.load(ckpt), [str(tmp_path / "in.npy")], tmp_path / "out", dim=4,
              shard_rows=16, quiet=True)
  rc, out = _run_check([tmp_path / "out"], capsys)
  assert rc == 0 and "OK, a streamed apply output (40 x 4 float32, ids: no)" in out

  # Damage one file of each: the report names it (before, the index passed as a checkpoint).
  vectors = tmp_path / "ix" / "vectors.npy"
  vectors.write_bytes(vectors.read_bytes()[:-64])
  problems = doctor.check_file(tmp_path / "ix")
  assert len(problems) == 1 and "vectors.npy" in problems[0], problems
  shard = tmp_path / "out" / "part-00001.npy"
  shard.write_bytes(shard.read_bytes()[:-8])
  problems = doctor.check_file(tmp_path / "out")
  assert len(problems) == 1 and "part-00001.npy" in problems[0], problems
  assert _run_check([tmp_path / "out"], capsys)[0] == 2
