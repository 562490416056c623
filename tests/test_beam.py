"""The Beam pipeline: RunInference handler, readers, writers, end to end on SciFact embeddings."""

import importlib
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

beam = pytest.importorskip("apache_beam")

from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.localfilesystem import LocalFileSystem
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.testing.util import assert_that
from flax import nnx

import adaptor
from adaptor import beam as ab
from conftest import kill_seed
from adaptor.cli import beam as beam_cli
from adaptor.model import MatryoshkaAdaptor, init_reorder_from_pca

CORPUS = Path(__file__).parent.parent / "data/scifact/embeddings/all-MiniLM-L6-v2/corpus.npy"
DIRECT = ["--runner=DirectRunner", "--direct_num_workers=1"]
# Small batches and splits, so that each file is read, batched and written in several pieces.
BATCH, SPLIT = 64, 250


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A PCA-started adaptor with a random (non-zero) MLP on real embeddings, saved."""
  root = tmp_path_factory.mktemp("beam")
  x = np.asarray(np.load(CORPUS, mmap_mode="r")[:1200])  # float16 [1200, 384]
  module = MatryoshkaAdaptor(384, d_out=128, hidden=32, rngs=nnx.Rngs(0))
  init_reorder_from_pca(module, x)
  rng = np.random.default_rng(0)
  module.out_layer.kernel.set_value(0.05 * rng.normal(size=(32, 128)).astype(np.float32))
  model = adaptor.Adaptor(module)
  model.save(root / "ck")
  return root, x, model


def _npy_shards(folder, x, bounds):
  folder.mkdir(parents=True, exist_ok=True)
  for i, (a, b) in enumerate(itertools.pairwise(bounds)):
    np.save(folder / f"part-{i}.npy", x[a:b])



def test_npy_pipeline_equals_in_memory_apply(setup, tmp_path):
  root, x, model = setup
  bounds = [0, 500, 900, 1200]
  _npy_shards(tmp_path / "in", x, bounds)
  summary = ab.run_pipeline(
      checkpoint=root / "ck", inputs=str(tmp_path / "in" / "*.npy"), output=tmp_path / "out",
      dim=64, pipeline_args=DIRECT, batch_size=BATCH, rows_per_split=SPLIT)
  assert summary["rows"] == 1200 and summary["files"] == 3 and summary["dim"] == 64

  want = model.apply(x, dim=64, dtype=np.float32, batch_size=BATCH)
  for i, (a, b) in enumerate(itertools.pairwise(bounds)):
    got = np.load(tmp_path / "out" / f"part-{i}.npy")
    assert got.dtype == np.float32 and got.shape == (b - a, 64)
    assert np.array_equal(got, want[a:b]), f"part-{i}"
  manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
  assert [f["rows"] for f in manifest["files"]] == [500, 400, 300]
  assert manifest["dim"] == 64 and manifest["dtype"] == "float32" and manifest["rows"] == 1200
  assert sorted(os.listdir(tmp_path / "out")) == ["manifest.json", "part-0.npy", "part-1.npy",
                                                  "part-2.npy"]  # .parts/ and temp files gone


def test_parquet_pipeline_keeps_ids_and_order(setup, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  root, x, model = setup
  (tmp_path / "in").mkdir()
  bounds = [0, 700, 1000]
  for i, (a, b) in enumerate(itertools.pairwise(bounds)):
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x[a:b].astype(np.float32).ravel()), 384)
    table = pa.table({"doc": [f"d{j}" for j in range(a, b)], "vec": emb})
    pq.write_table(table, tmp_path / "in" / f"p{i}.parquet", row_group_size=160)
  ab.run_pipeline(
      checkpoint=root / "ck", inputs=str(tmp_path / "in" / "*.parquet"), output=tmp_path / "out",
      dim=32, pipeline_args=DIRECT, column="vec", ids_column="doc", batch_size=BATCH,
      rows_per_split=SPLIT)

  want = model.apply(x[:1000].astype(np.float32), dim=32, batch_size=BATCH)
  for i, (a, b) in enumerate(itertools.pairwise(bounds)):
    table = pq.read_table(tmp_path / "out" / f"p{i}.parquet")
    assert table.column_names == ["doc", "vec"]
    assert table.column("doc").to_pylist() == [f"d{j}" for j in range(a, b)]
    got = np.stack(table.column("vec").to_numpy(zero_copy_only=False))
    assert np.array_equal(got, want[a:b]), f"p{i}"


def test_model_handler_in_run_inference(setup):
  root, x, model = setup
  rows = x[:150]
  want = model.apply(rows, dim=16, batch_size=BATCH)
  handler = ab.AdaptorModelHandler(root / "ck", dim=16, batch_size=BATCH)
  assert handler.batch_elements_kwargs() == {"min_batch_size": BATCH, "max_batch_size": BATCH}

  def check(actual):
    got = dict(actual)
    assert sorted(got) == list(range(len(rows)))
    np.testing.assert_array_equal(np.stack([got[i] for i in range(len(rows))]), want)

  with beam.Pipeline(options=beam.options.pipeline_options.PipelineOptions(DIRECT)) as p:
    out = (p | beam.Create(list(enumerate(rows))) | RunInference(KeyedModelHandler(handler)))
    assert_that(out, check)


def test_model_handler_directly(setup):
  root, x, model = setup
  handler = ab.AdaptorModelHandler(root / "ck", dtype="float16", batch_size=BATCH,
                                   prediction_result=True)
  loaded = handler.load_model()
  batch = list(x[:3])
  results = list(handler.run_inference(batch, loaded))
  want = model.apply(x[:3], dtype=np.float16, batch_size=BATCH)
  assert [r.model_id for r in results] == [str(root / "ck")] * 3
  np.testing.assert_array_equal(np.stack([r.inference for r in results]), want)
  assert results[1].example is batch[1]
  assert handler.get_num_bytes(batch) == 3 * 384 * 2
  assert not handler.share_model_across_processes()


def test_remote_style_paths_through_main(setup, tmp_path, monkeypatch, capsys):
  """Checkpoint, inputs and output on a non-local Beam filesystem, run from the command line."""
  root, x, model = setup
  monkeypatch.setattr(_FakeRemoteFS, "root", str(tmp_path))
  (tmp_path / "ck").symlink_to(root / "ck")  # Reached as fakefs://ck, so copied to load.
  _npy_shards(tmp_path / "in", x, [0, 300, 600])
  assert beam_cli.main(["--checkpoint", "fakefs://ck", "--inputs", "fakefs://in/*.npy",
                  "--output", "fakefs://out", "--dim", "48", "--dtype", "float16",
                  "--batch-size", str(BATCH), "--rows-per-split", str(SPLIT), *DIRECT]) == 0
  assert json.loads(capsys.readouterr().out)["rows"] == 600
  want = model.apply(x[:600], dim=48, dtype=np.float16, batch_size=BATCH)
  got = np.concatenate([np.load(tmp_path / "out" / f"part-{i}.npy") for i in range(2)])
  assert got.dtype == np.float16 and np.array_equal(got, want)
  # An object store has no empty folders, so only the files left matter.
  out = tmp_path / "out"
  files = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
  assert files == ["manifest.json", "part-0.npy", "part-1.npy"]


def test_bad_inputs_fail_before_the_pipeline_runs(setup, tmp_path, capsys):
  root, x, _ = setup
  (tmp_path / "in").mkdir()
  np.save(tmp_path / "in" / "ok.npy", x[:10])
  np.save(tmp_path / "in" / "wide.npy", np.ones((4, 385), np.float32))
  run = {"checkpoint": root / "ck", "output": tmp_path / "out", "pipeline_args": DIRECT}
  wide = r"wide.npy must have d=384 columns .*got shape \(4, 385\)"
  with pytest.raises(adaptor.InputError, match=wide):
    ab.run_pipeline(inputs=str(tmp_path / "in" / "*.npy"), **run)
  with pytest.raises(adaptor.InputError, match="matches no files"):
    ab.run_pipeline(inputs=str(tmp_path / "nothing" / "*.npy"), **run)
  with pytest.raises(adaptor.InputError, match=r"dim must be in \[1, 128\].*got 200"):
    ab.run_pipeline(inputs=str(tmp_path / "in" / "ok.npy"), dim=200, **run)
  with pytest.raises(adaptor.InputError, match="would be overwritten"):
    ab.run_pipeline(**{**run, "output": tmp_path / "in"}, inputs=str(tmp_path / "in" / "ok.npy"))
  (tmp_path / "in2").mkdir()
  np.save(tmp_path / "in2" / "ok.npy", x[:10])
  with pytest.raises(adaptor.InputError, match="have the same file name"):
    ab.run_pipeline(inputs=[str(tmp_path / "in" / "ok.npy"), str(tmp_path / "in2" / "*.npy")],
                    **run)
  assert beam_cli.main(["--checkpoint", str(root / "ck"), "--inputs", str(tmp_path / "in" / "*.npy"),
                  "--output", str(tmp_path / "out"), *DIRECT]) == 2
  assert "wide.npy must have d=384" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def test_bad_vectors_fail_inside_the_pipeline(setup):
  root, x, _ = setup
  handler = ab.AdaptorModelHandler(root / "ck", batch_size=BATCH)
  loaded = handler.load_model()
  wrong_d = r"shape \(384,\) \(the adaptor's d_in\), got shape \(383,\) at position 1"
  with pytest.raises(adaptor.InputError, match=wrong_d):
    handler.run_inference([x[0], x[1, :383]], loaded)
  with pytest.raises(adaptor.InputError, match="1 row all zeros"):
    handler.run_inference([x[0], np.zeros(384, np.float32)], loaded)
  options = beam.options.pipeline_options.PipelineOptions(DIRECT)
  with (pytest.raises(adaptor.InputError, match=r"shape \(384,\) .*got shape \(3,\)"),
        beam.Pipeline(options=options) as p):
    _ = p | beam.Create([np.ones(3, np.float32)]) | RunInference(handler)


def test_import_without_beam_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "apache_beam", None)  # import apache_beam -> ImportError
  monkeypatch.delitem(sys.modules, "adaptor.beam")
  with pytest.raises(ImportError, match=r"pip install 'matryoshka-adaptor\[beam\]'"):
    importlib.import_module("adaptor.beam")


class _FakeRemoteFS(LocalFileSystem):
  """`fakefs://p` is the local file `root/p`, seen like an object store (no folders).

  Beam picks a filesystem by scheme, so this drives the code paths for remote
  files (ranged reads, FileSystems.create, prefix listing) without a network.
  """

  root = ""

  @classmethod
  def scheme(cls):
    return "fakefs"

  def _local(self, path):
    return os.path.join(self.root, path[len("fakefs://"):])

  def join(self, base, *paths):
    return "/".join([base.rstrip("/"), *paths])

  def split(self, path):
    return tuple(path.rsplit("/", 1))

  def has_dirs(self):
    return False

  def _list(self, prefix):
    for folder, _, names in os.walk(self.root, followlinks=True):
      for name in names:
        path = "fakefs://" + os.path.relpath(os.path.join(folder, name), self.root)
        if path.startswith(prefix):
          yield FileMetadata(path, os.path.getsize(self._local(path)), 0.0)

  def create(self, path, *args, **kwargs):
    return super().create(self._local(path), *args, **kwargs)

  def open(self, path, *args, **kwargs):
    return super().open(self._local(path), *args, **kwargs)

  def exists(self, path):
    return super().exists(self._local(path))

  def rename(self, sources, destinations):
    for src, dst in zip(sources, destinations):
      os.replace(self._local(src), self._local(dst))

  def delete(self, paths):
    for path in paths:  # LocalFileSystem.delete would match the local path as a fakefs:// one.
      os.remove(self._local(path))


def test_pipeline_killed_mid_write_then_rerun_gives_the_uninterrupted_output(setup, tmp_path,
                                                                             xla_cache):
  """SIGKILL while parts and files are being written: no manifest vouches for the
  half-done folder, `check` says it is unfinished, and the same command run again
  finishes it with exactly the uninterrupted output and nothing left over."""
  import signal
  import subprocess
  import time

  from conftest import reap, subprocess_env
  from adaptor import doctor

  root, x, model = setup
  bounds = [0, 400, 800, 1200]
  _npy_shards(tmp_path / "in", x, bounds)
  out = tmp_path / "out"
  command = [sys.executable, "-m", "adaptor.beam", "--checkpoint", str(root / "ck"),
             "--inputs", str(tmp_path / "in" / "*.npy"), "--output", str(out), "--dim", "64",
             "--batch-size", str(BATCH), "--rows-per-split", "10", *DIRECT]
  want = model.apply(x, dim=64, dtype=np.float32, batch_size=BATCH)
  env = subprocess_env(xla_cache)
  seed = kill_seed()
  log = open(tmp_path / "killed.log", "w+")
  proc = subprocess.Popen(command, env=env, stdout=log, stderr=log)
  try:
    deadline = time.monotonic() + 180
    while not (out / ".parts").is_dir():
      if proc.poll() is not None:
        log.seek(0)
        raise AssertionError(f"exited ({proc.returncode}) before writing: {log.read()}")
      assert time.monotonic() < deadline, "timed out waiting for the first part"
      time.sleep(0.002)
    appeared = time.monotonic()
    time.sleep(np.random.default_rng(seed).uniform(0, 0.05))  # among the 120 parts and 3 files
    proc.send_signal(signal.SIGKILL)
    killed_after = time.monotonic() - appeared
  finally:
    reap(proc, log)
  assert proc.returncode == -signal.SIGKILL, (seed, proc.returncode)
  assert not (out / "manifest.json").exists(), (
      f"kill seed {seed}: the run ended before the kill, {killed_after:.3f} s after its first part")
  # Outputs are written whole or not at all.
  for i, (a, b) in enumerate(itertools.pairwise(bounds)):
    if (out / f"part-{i}.npy").exists():
      assert np.array_equal(np.load(out / f"part-{i}.npy"), want[a:b]), (seed, i)
  problems = doctor.check_file(out)
  assert problems and "no manifest.json" in problems[0], (seed, problems)

  rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert sorted(os.listdir(out)) == ["manifest.json", "part-0.npy", "part-1.npy", "part-2.npy"]
  for i, (a, b) in enumerate(itertools.pairwise(bounds)):
    assert np.array_equal(np.load(out / f"part-{i}.npy"), want[a:b]), (seed, i)
  assert doctor.check_file(out) == []


def test_check_reads_a_beam_output_and_names_a_damaged_file(setup, tmp_path):
  from adaptor import doctor

  root, x, _ = setup
  _npy_shards(tmp_path / "in", x[:500], [0, 200, 500])
  out = tmp_path / "out"
  ab.run_pipeline(checkpoint=root / "ck", inputs=str(tmp_path / "in" / "*.npy"), output=out,
                  dim=32, dtype="float16", pipeline_args=DIRECT, batch_size=BATCH,
                  rows_per_split=SPLIT)
  summary, problems = doctor.describe(out)
  assert problems == [] and "Beam apply output (2 files, 500 rows, dim 32, float16)" in summary
  np.save(out / "part-1.npy", np.zeros((299, 32), np.float16))    # one row short
  (out / "part-0.npy").unlink()
  problems = doctor.check_file(out)
  assert len(problems) == 2, problems
  assert "part-0.npy: listed in manifest.json but missing" in problems[0]
  assert "part-1.npy: expected shape (300, 32) (manifest.json), got (299, 32)" in problems[1]
