"""Streaming apply (`adaptor.stream`): files in, resumable shards out, equal to in-memory apply.

Tiny shapes throughout: d=8, batches of 4 rows and shards of a few rows, so
that batches straddle input files and shards end mid-batch. The SIGKILL test
runs the CLI in subprocesses, like tests/test_faults.py.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flax import nnx

import adaptor
from conftest import kill_seed, reap, subprocess_env
from adaptor import stream
from adaptor.cli import main
from adaptor.data import InputError
from adaptor.model import MatryoshkaAdaptor

D = 8
BATCH = 4


def _adaptor(d=D, hidden=5, seed=0):
  module = MatryoshkaAdaptor(d, hidden=hidden, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  # Non-zero MLP output and a non-identity base, so the test sees every layer.
  module.out_layer.kernel.set_value(rng.normal(size=(hidden, d)).astype(np.float32))
  module.base.kernel.set_value(rng.normal(size=(d, d)).astype(np.float32))
  return adaptor.Adaptor(module)


MODEL = _adaptor()


def _npy_shards(folder, sizes, *, ids=True, seed=0, d=D, dtype=np.float32):
  """Writes in-NN.npy (+ in-NN.ids.txt) shards; returns (all rows [n, d], all ids)."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  xs, all_ids = [], []
  for i, n in enumerate(sizes):
    x = rng.normal(size=(n, d)).astype(dtype)
    np.save(folder / f"in-{i:02d}.npy", x)
    names = [f"doc-{i}-{j}" for j in range(n)]
    if ids:
      (folder / f"in-{i:02d}.ids.txt").write_text("".join(f"{v}\n" for v in names))
    xs.append(x)
    all_ids += names
  return np.concatenate(xs), all_ids


def _files(folder) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


SIZES = (5, 0, 7, 9, 3)  # 24 rows; an empty shard; files end mid-batch



@pytest.mark.parametrize("fmt", ["npy", "parquet"])
@pytest.mark.parametrize("shard_rows", [8, 6, 100])
def test_npy_shards_out_equal_in_memory_apply_with_ids_aligned(tmp_path, fmt, shard_rows):
  x, ids = _npy_shards(tmp_path / "in", SIZES)
  m = stream.apply_files(MODEL, tmp_path / "in", tmp_path / "out", dim=4, output_format=fmt,
                         shard_rows=shard_rows, batch_size=BATCH, quiet=True)
  want = MODEL.apply(x, dim=4, batch_size=BATCH)
  got, got_ids = stream.read_shards(tmp_path / "out")
  assert got.dtype == np.float32 and got.shape == (24, 4)
  np.testing.assert_array_equal(got, want)  # bit for bit, also when shards end mid-batch
  assert got_ids == ids
  assert m == json.loads((tmp_path / "out" / "manifest.json").read_text())
  assert m["complete"] and m["rows"] == 24 and m["n_shards"] == -(-24 // shard_rows)
  assert [(s["start"], s["stop"]) for s in m["shards"]] == [
      (a, min(a + shard_rows, 24)) for a in range(0, 24, shard_rows)]
  assert [i["rows"] for i in m["config"]["inputs"]] == list(SIZES)
  names = sorted(os.listdir(tmp_path / "out"))
  if fmt == "npy":
    assert names[:2] == ["manifest.json", "part-00000.ids.txt"]
    first = np.load(tmp_path / "out" / "part-00000.npy")
    np.testing.assert_array_equal(first, want[:min(shard_rows, 24)])
  else:
    table = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert table.schema.names == ["id", "embedding"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 4)


def test_float16_output_and_default_dim(tmp_path):
  x, _ = _npy_shards(tmp_path / "in", (6, 6), ids=False, dtype=np.float16)
  stream.apply_files(MODEL, str(tmp_path / "in" / "*.npy"), tmp_path / "out", dtype="float16",
                     shard_rows=4, batch_size=BATCH, quiet=True)
  got, ids = stream.read_shards(tmp_path / "out")
  assert ids is None and got.dtype == np.float16 and got.shape == (12, D)
  np.testing.assert_array_equal(got, MODEL.apply(x, dtype=np.float16, batch_size=BATCH))
  assert sorted(os.listdir(tmp_path / "out")) == [
      "manifest.json", "part-00000.npy", "part-00001.npy", "part-00002.npy"]


def test_default_batch_size_matches_adaptor_apply(tmp_path):
  x, _ = _npy_shards(tmp_path / "in", (30, 11), ids=False)
  stream.apply_files(MODEL, tmp_path / "in", tmp_path / "out", dim=5, quiet=True)
  np.testing.assert_array_equal(stream.read_shards(tmp_path / "out")[0], MODEL.apply(x, dim=5))


def _parquet(path, x, ids, *, row_group_size=3, fixed=False, column="emb", id_column="doc"):
  values = pa.array(x.reshape(-1))
  emb = (pa.FixedSizeListArray.from_arrays(values, x.shape[1]) if fixed else
         pa.ListArray.from_arrays(pa.array(np.arange(0, x.size + 1, x.shape[1]), pa.int32()),
                                  values))
  pq.write_table(pa.table({id_column: ids, column: emb}), path, row_group_size=row_group_size)


def test_parquet_inputs_pass_ids_through(tmp_path):
  rng = np.random.default_rng(1)
  x1, x2 = rng.normal(size=(7, D)).astype(np.float32), rng.normal(size=(6, D))  # float64 too
  (tmp_path / "in").mkdir()
  _parquet(tmp_path / "in" / "b.parquet", x2, pa.array(np.arange(100, 106), pa.int64()),
           fixed=True)
  _parquet(tmp_path / "in" / "a.parquet", x1, pa.array(np.arange(7), pa.int64()))
  x = np.concatenate([x1, x2.astype(np.float32)])  # sorted paths: a before b
  want = MODEL.apply(x, dim=3, batch_size=BATCH)
  for fmt in ("parquet", "npy"):
    out = tmp_path / fmt
    stream.apply_files(MODEL, tmp_path / "in", out, dim=3, column="emb", id_column="doc",
                       output_format=fmt, shard_rows=5, batch_size=BATCH, quiet=True)
    got, ids = stream.read_shards(out)
    np.testing.assert_array_equal(got, want)
    assert ids == [str(i) for i in [*range(7), *range(100, 106)]]
  table = pq.read_table(tmp_path / "parquet" / "part-00002.parquet")
  assert table.schema.names == ["doc", "emb"]
  assert table.column("doc").type == pa.int64()  # passed through, not turned into strings
  assert table.column("doc").to_pylist() == [103, 104, 105]


def test_hugging_face_dataset_on_disk(tmp_path):
  import datasets

  x = np.random.default_rng(2).normal(size=(11, D)).astype(np.float32)
  ids = [f"q{i}" for i in range(11)]
  datasets.Dataset.from_dict({"embedding": x.tolist(), "id": ids}).save_to_disk(tmp_path / "ds")
  stream.apply_files(MODEL, tmp_path / "ds", tmp_path / "out", id_column="id", shard_rows=4,
                     batch_size=BATCH, output_format="parquet", quiet=True)
  got, got_ids = stream.read_shards(tmp_path / "out")
  np.testing.assert_array_equal(got, MODEL.apply(x, batch_size=BATCH))
  assert got_ids == ids


class _Crash(Exception):
  pass


def _crash_after(monkeypatch, n_batches):
  """Makes the n-th apply call (counting from 1) fail, as a crash mid-shard would."""
  real = stream.apply_adaptor
  calls = []

  def apply(*args, **kwargs):
    calls.append(1)
    if len(calls) == n_batches:
      raise _Crash
    return real(*args, **kwargs)
  monkeypatch.setattr(stream, "apply_adaptor", apply)


def test_resume_after_a_crash_is_byte_identical(tmp_path, monkeypatch):
  _npy_shards(tmp_path / "in", SIZES)
  kw = dict(dim=4, shard_rows=8, batch_size=BATCH, quiet=True)
  stream.apply_files(MODEL, tmp_path / "in", tmp_path / "ref", **kw)
  reference = _files(tmp_path / "ref")

  out = tmp_path / "out"
  with monkeypatch.context() as mp:
    _crash_after(mp, 5)  # shard 0 (batches 1-2) and 1 (3-4) done, shard 2 cut short
    with pytest.raises(_Crash):
      stream.apply_files(MODEL, tmp_path / "in", out, **kw)
  m = json.loads((out / "manifest.json").read_text())
  assert [s["index"] for s in m["shards"]] == [0, 1] and not m["complete"]
  # What a kill could leave on top: a temp file, a shard written but not listed.
  (out / ".tmp-x1y2.npy").write_bytes(b"half")
  (out / "part-00002.npy").write_bytes(reference["part-00002.npy"][:-3])
  kept = {n: os.stat(out / n).st_mtime_ns for n in ("part-00000.npy", "part-00001.ids.txt")}
  stream.apply_files(MODEL, tmp_path / "in", out, **kw)
  assert _files(out) == reference
  assert {n: os.stat(out / n).st_mtime_ns for n in kept} == kept  # not rewritten


def test_listed_shard_with_wrong_size_is_rewritten(tmp_path):
  _npy_shards(tmp_path / "in", SIZES)
  kw = dict(dim=4, shard_rows=8, batch_size=BATCH, quiet=True)
  stream.apply_files(MODEL, tmp_path / "in", tmp_path / "out", **kw)
  reference = _files(tmp_path / "out")
  (tmp_path / "out" / "part-00001.ids.txt").write_text("short\n")
  os.remove(tmp_path / "out" / "part-00002.npy")
  with pytest.warns(UserWarning) as warned:
    stream.apply_files(MODEL, tmp_path / "in", tmp_path / "out", **kw)
  assert [str(w.message).split(": ", 1)[1] for w in warned if "manifest" in str(w.message)] == [
      f"shard part-0000{i}.npy listed in the manifest is missing or has the wrong size; "
      "rewriting it" for i in (1, 2)]
  assert _files(tmp_path / "out") == reference


def test_other_config_is_refused_unless_overwrite(tmp_path):
  _npy_shards(tmp_path / "in", SIZES)
  kw = dict(shard_rows=8, batch_size=BATCH, quiet=True)
  stream.apply_files(MODEL, tmp_path / "in", tmp_path / "out", dim=4, **kw)
  before = _files(tmp_path / "out")
  with pytest.raises(InputError, match=r"holds the output of another run \(its manifest differs "
                     r"in: dim\); pass overwrite=True"):
    stream.apply_files(MODEL, tmp_path / "in", tmp_path / "out", dim=3, **kw)
  with pytest.raises(InputError, match="differs in: adaptor_fingerprint"):
    stream.apply_files(_adaptor(seed=1), tmp_path / "in", tmp_path / "out", dim=4, **kw)
  os.utime(tmp_path / "in" / "in-02.npy", ns=(1, 1))  # the input changed
  with pytest.raises(InputError, match="differs in: inputs"):
    stream.apply_files(MODEL, tmp_path / "in", tmp_path / "out", dim=4, **kw)
  assert _files(tmp_path / "out") == before
  stream.apply_files(MODEL, tmp_path / "in", tmp_path / "out", dim=3, overwrite=True, **kw)
  got, _ = stream.read_shards(tmp_path / "out")
  assert got.shape == (24, 3)


def test_output_dir_with_other_files_is_refused(tmp_path):
  _npy_shards(tmp_path / "in", (5,))
  kw = dict(batch_size=BATCH, quiet=True)
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "notes.txt").write_text("mine")
  with pytest.raises(InputError, match=r"holds other files: \['notes.txt'\]"):
    stream.apply_files(MODEL, tmp_path / "in", tmp_path / "out", overwrite=True, **kw)
  os.remove(tmp_path / "out" / "notes.txt")
  (tmp_path / "out" / "part-00000.npy").write_bytes(b"someone else's")
  with pytest.raises(InputError, match="holds shard files but no manifest.json"):
    stream.apply_files(MODEL, tmp_path / "in", tmp_path / "out", **kw)
  stream.apply_files(MODEL, tmp_path / "in", tmp_path / "out", overwrite=True, **kw)
  with pytest.raises(InputError, match="lies inside output_dir"):
    stream.apply_files(MODEL, tmp_path / "out" / "part-00000.npy", tmp_path / "out", **kw)


def test_nan_row_names_the_file_and_rows_and_keeps_earlier_shards(tmp_path):
  _npy_shards(tmp_path / "in", SIZES)
  bad = np.load(tmp_path / "in" / "in-03.npy")
  bad[6, 2] = np.nan
  np.save(tmp_path / "in" / "in-03.npy", bad)
  with pytest.raises(InputError) as e:
    stream.apply_files(MODEL, tmp_path / "in", tmp_path / "out", shard_rows=8, batch_size=BATCH,
                       quiet=True)
  # Global rows 12.. are file in-03's rows 0..; the batch holding its row 6 reads rows 4:8.
  assert f"{tmp_path / 'in' / 'in-03.npy'}[4:8] must have finite, non-zero rows; got 1 row " \
         "with NaN (1 NaN values) (first rows [2])" in str(e.value)
  m = json.loads((tmp_path / "out" / "manifest.json").read_text())
  assert [s["index"] for s in m["shards"]] == [0, 1] and not m["complete"]  # rows 0:16
  assert not [n for n in os.listdir(tmp_path / "out") if n.startswith(".tmp-")]
  with pytest.raises(InputError, match=r"incomplete \(2 of 3 shards\)"):
    stream.read_shards(tmp_path / "out")


def test_bad_inputs_are_refused_before_any_output(tmp_path):
  kw = dict(batch_size=BATCH, quiet=True)
  out = tmp_path / "out"
  _npy_shards(tmp_path / "in", (4, 4))
  np.save(tmp_path / "in" / "in-01.npy", np.ones((4, 5), np.float32))
  with pytest.raises(InputError, match=r"in-01.npy has d=5 columns, but the adaptor expects "
                     r"d_in=8"):
    stream.apply_files(MODEL, tmp_path / "in", out, **kw)
  (tmp_path / "empty").mkdir()
  with pytest.raises(InputError, match="empty must hold .npy or .parquet files"):
    stream.apply_files(MODEL, tmp_path / "empty", out, **kw)
  with pytest.raises(InputError, match=r"input glob .*\*.npy' must match .npy or .parquet"):
    stream.apply_files(MODEL, str(tmp_path / "empty" / "*.npy"), out, **kw)
  _npy_shards(tmp_path / "ids", (4, 4))
  os.remove(tmp_path / "ids" / "in-01.ids.txt")
  with pytest.raises(InputError, match=r"ids file .*in-01.ids.txt does not exist"):
    stream.apply_files(MODEL, tmp_path / "ids", out, **kw)
  (tmp_path / "ids" / "in-01.ids.txt").write_text("a\nb\nc\n")
  with pytest.raises(InputError, match=r"must have one id per row of .*in-01.npy \(4\), got 3"):
    stream.apply_files(MODEL, tmp_path / "ids", out, **kw)
  # Ragged list column: the row lengths differ inside one batch.
  x = np.ones((6, D), np.float32)
  lists = pa.array([list(r) for r in x[:3]] + [list(x[3, :7])] + [list(r) for r in x[4:]])
  pq.write_table(pa.table({"embedding": lists}), tmp_path / "ragged.parquet")
  with pytest.raises(InputError, match=r"ragged.parquet\[0:4\] must have rows of equal length; "
                     r"row 0 has 8 values but row 3 has 7"):
    stream.apply_files(MODEL, tmp_path / "ragged.parquet", out, **kw)
  with pytest.raises(InputError, match="has no column 'vec'; available columns: "
                     r"\['embedding'\]"):
    stream.apply_files(MODEL, tmp_path / "ragged.parquet", out, column="vec", **kw)
  # An id that one line of an .ids.txt file cannot hold (parquet output can).
  _parquet(tmp_path / "ids.parquet", x, pa.array(["a", "b", "c", "d\ne", "f", "g"]),
           column="embedding", id_column="id")
  with pytest.raises(InputError, match=r"without line breaks .*; got 'd\\ne' for row 3 of the "
                     "inputs"):
    stream.apply_files(MODEL, tmp_path / "ids.parquet", out, id_column="id", **kw)
  assert not out.exists()  # A failure in the first shard leaves no output behind.
  stream.apply_files(MODEL, tmp_path / "ids.parquet", out, id_column="id",
                     output_format="parquet", **kw)
  assert stream.read_shards(out)[1][3] == "d\ne"


def test_cli_streams_into_a_directory_and_refuses_another_run(tmp_path, capsys):
  ck = tmp_path / "ck"
  MODEL.save(ck)
  x, ids = _npy_shards(tmp_path / "in", SIZES)
  out = tmp_path / "out"
  def argv(dim, *extra):
    return ["apply", "--checkpoint", str(ck), "--input", str(tmp_path / "in" / "*.npy"),
            "--output", str(out), "--dim", str(dim), "--dtype", "float16", "--shard-rows", "8",
            "--batch-size", str(BATCH), "--quiet", *extra]
  assert main(argv(4)) == 0, capsys.readouterr().err
  assert "wrote 24 x 4 float16 vectors in 3 npy shards" in capsys.readouterr().out
  got, got_ids = stream.read_shards(out)
  np.testing.assert_array_equal(got, MODEL.apply(x, dim=4, dtype=np.float16, batch_size=BATCH))
  assert got_ids == ids
  assert main(argv(4)) == 0  # complete: nothing to do
  assert main(argv(3)) == 2
  assert "differs in: dim); pass --overwrite to replace it" in capsys.readouterr().err
  assert main(argv(3, "--format", "parquet", "--overwrite")) == 0
  assert sorted(os.listdir(out)) == ["manifest.json", "part-00000.parquet", "part-00001.parquet",
                                     "part-00002.parquet"]
  # One .npy output takes one input.
  assert main(["apply", "--checkpoint", str(ck), "--input", str(tmp_path / "in"),
               "--output", str(tmp_path / "one.npy")]) == 2
  assert "names several files; stream them into a directory" in capsys.readouterr().err
  assert main(["apply", "--checkpoint", str(ck), "--input", str(tmp_path / "in" / "in-00.npy"),
               "--output", str(tmp_path / "one.npy"), "--format", "parquet"]) == 2
  assert "--format applies to a directory output" in capsys.readouterr().err


# ---------------------------------------------------------------- SIGKILL


@pytest.fixture(scope="module")
def env(xla_cache):
  # As in tests/test_faults.py, minus JAX_DISABLE_MOST_OPTIMIZATIONS: the
  # uninterrupted reference run happens in this process, with default XLA
  # options, and the subprocesses must compile the very same program (it
  # compiles in well under a second anyway).
  return subprocess_env(xla_cache)


def _complete_shards(manifest_path) -> int:
  try:
    return len(json.loads(manifest_path.read_text())["shards"])
  except (OSError, ValueError, KeyError):
    return 0  # Not written yet (it is replaced atomically, so never half written).


N_KILL_SHARDS = 40


def test_cli_killed_mid_run_resumes_to_byte_identical_output(tmp_path, env):
  ck = tmp_path / "ck"
  _adaptor(d=16, hidden=16).save(ck)
  _npy_shards(tmp_path / "in", [96] * N_KILL_SHARDS, d=16)

  def command(out):
    # Output shards cut across input files and end mid-batch (shard_rows % 32 != 0).
    return [sys.executable, "-m", "adaptor.cli", "apply", "--checkpoint", str(ck), "--input",
            str(tmp_path / "in"), "--output", str(out), "--dim", "8", "--dtype", "float16",
            "--shard-rows", "100", "--batch-size", "32", "--quiet"]

  # The uninterrupted run, here (a subprocess would cost seconds of imports).
  stream.apply_files(adaptor.load(ck), tmp_path / "in", tmp_path / "ref", dim=8, dtype="float16",
                     shard_rows=100, batch_size=32, quiet=True)
  reference = _files(tmp_path / "ref")
  assert len(reference) == 1 + 2 * 39  # manifest + 39 shards of .npy and .ids.txt

  out = tmp_path / "out"
  seed = kill_seed()
  log = open(tmp_path / "killed.log", "w+")  # A file: an unread pipe could fill up and stall it.
  proc = subprocess.Popen(command(out), env=env, stdout=log, stderr=log)
  try:
    deadline = time.monotonic() + 120
    while _complete_shards(out / "manifest.json") < 1:
      if proc.poll() is not None:
        log.seek(0)
        raise AssertionError(f"exited ({proc.returncode}) before the first shard: {log.read()}")
      assert time.monotonic() < deadline, "timed out waiting for the first shard"
      time.sleep(0.002)
    # A random moment among the next few shards: in a shard, between its files, or
    # between its files and the manifest.
    time.sleep(np.random.default_rng(seed).uniform(0, 0.02))
    proc.send_signal(signal.SIGKILL)
  finally:
    reap(proc, log)
  assert proc.returncode == -signal.SIGKILL, (seed, proc.returncode)
  done = _complete_shards(out / "manifest.json")
  assert 1 <= done < 39, f"kill seed {seed}: {done} shards done; the run ended before the kill"

  rerun = subprocess.run(command(out), env=env, capture_output=True, text=True, timeout=120)
  assert rerun.returncode == 0, rerun.stderr
  assert _files(out) == reference, f"kill seed {seed}, killed after {done} shards"
