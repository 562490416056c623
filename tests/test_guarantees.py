"""Issue 16's guarantees: resume fingerprints, --overwrite, file modes, interrupts, untrusted files.

Each test fails on the code before the fix it checks (see docs/reliability.md).
Fits here are tiny (d=16, a few hundred rows, tens of steps).
"""

import dataclasses
import json
import os
import stat

import jax
import numpy as np
import pytest

import adaptor
from adaptor import checkpoint, distributed, train
from adaptor.cli import main
from conftest import interrupted_at_step

D = 16
RNG = np.random.default_rng(0)
CENTRES = RNG.normal(size=(10, D))
DOCS = (CENTRES[RNG.integers(0, 10, 200)] + 0.3 * RNG.normal(size=(200, D))).astype(np.float32)
QUERIES = (CENTRES[RNG.integers(0, 10, 30)] + 0.3 * RNG.normal(size=(30, D))).astype(np.float32)
SMALL = adaptor.TrainConfig(batch_size=16, neighbours=5, neighbours_per_anchor=2,
                            random_docs=16, steps=20, eval_every=5, patience=100)


def _params(model):
  return [np.asarray(x) for x in jax.tree.leaves(model.module)]


def _fit(corpus=DOCS, **kw):
  kw.setdefault("quiet", True)
  return adaptor.fit(corpus, queries=QUERIES, config=SMALL, dims=(4, 8, 16), **kw)


def _interrupted_fit(monkeypatch, resume_dir, *, at_call=13, **kw):
  """A fit stopped by KeyboardInterrupt after the step checkpoint at step 10."""
  with interrupted_at_step(monkeypatch, at_call), pytest.raises(KeyboardInterrupt):
    _fit(checkpoint_dir=resume_dir, **kw)
  assert checkpoint.TrainCheckpointer(resume_dir / "unsupervised").latest() == 10


# ------------------------------------------------------------------ 2. resume fingerprint


@pytest.mark.parametrize("change, needle", [
    ({"corpus": DOCS[:150]}, "differs in: corpus"),
    ({"seed": 1}, "config.seed (0 -> 1)"),
    ({"steps": 30}, "config.steps (20 -> 30)"),
])
def test_resume_state_of_another_fit_is_refused_naming_what_differs(change, needle, tmp_path,
                                                                    monkeypatch):
  resume = tmp_path / "resume"
  _interrupted_fit(monkeypatch, resume)
  with pytest.raises(adaptor.CheckpointError) as e:
    _fit(checkpoint_dir=resume, **change)
  msg = str(e.value)
  assert needle in msg, msg
  assert "found that of another fit" in msg and f"delete {resume}" in msg, msg
  # The refusal leaves the old resume state as it was.
  assert checkpoint.TrainCheckpointer(resume / "unsupervised").latest() == 10


def test_completed_api_fit_removes_its_resume_state(tmp_path):
  resume = tmp_path / "resume"
  model = _fit(checkpoint_dir=resume)
  assert not resume.exists()  # A rerun on other data cannot pick it up.
  assert model.info["stages"]["unsupervised"]["steps"] == SMALL.steps


def test_keep_resume_state_leaves_the_last_step_for_the_callers_save(tmp_path):
  # The CLI keeps it until the adaptor is saved: a kill in between then resumes
  # from the last step instead of fitting again.
  resume = tmp_path / "resume"
  _fit(checkpoint_dir=resume, keep_resume_state=True)
  assert checkpoint.TrainCheckpointer(resume / "unsupervised").latest() == SMALL.steps


def test_remove_resume_state_keeps_other_files(tmp_path):
  resume = tmp_path / "resume"
  ck = checkpoint.TrainCheckpointer(resume / "unsupervised")
  ck.save(3, {"w": np.zeros(2, np.float32)}, {})
  (resume / "notes.txt").write_text("mine")
  checkpoint.remove_resume_state(resume)
  assert sorted(p.name for p in resume.iterdir()) == ["notes.txt"]


def test_cli_resume_dir_of_another_fit_exits_2_naming_what_differs(tmp_path, monkeypatch,
                                                                   capsys):
  np.save(tmp_path / "corpus.npy", DOCS[:150])
  resume = tmp_path / "resume"
  _interrupted_fit(monkeypatch, resume)
  rc = main(["fit", "--corpus", str(tmp_path / "corpus.npy"), "--dims", "4,8,16",
             "--steps", "20", "--out", str(tmp_path / "out"), "--resume-dir", str(resume),
             "--quiet"])
  err = capsys.readouterr().err
  assert rc == 2, err
  differ = err.split("differs in: ")[1]
  assert "corpus" in differ and "config.eval_every (5 -> 200)" in differ, err
  assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ 3. --overwrite


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
  """A saved adaptor for d=16 (random weights; nothing here needs a trained one)."""
  from flax import nnx
  from adaptor.model import MatryoshkaAdaptor
  path = tmp_path_factory.mktemp("ckpt") / "tiny"
  adaptor.Adaptor(MatryoshkaAdaptor(D, hidden=4, rngs=nnx.Rngs(0))).save(path)
  return path


def _tree_bytes(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      p = os.path.join(dirpath, name)
      with open(p, "rb") as f:
        out[p] = f.read()
  return out


def _writing_commands(tmp_path, ckpt):
  """(argv, the existing result it must not replace) for every writing command."""
  np.save(tmp_path / "x.npy", DOCS[:20])
  x = str(tmp_path / "x.npy")
  existing_dir = tmp_path / "results"
  existing_dir.mkdir()
  for name in ("results.json", "ndcg10.png", "plan.json", "frontier.png"):
    (existing_dir / name).write_text("earlier result\n")
  index = tmp_path / "ix"
  adaptor.MatryoshkaIndex.build(DOCS[:50]).save(index)
  (tmp_path / "run.tsv").write_text("earlier run\n")
  (tmp_path / "recall-plan").mkdir()   # A plan.json alone: the --recall mode writes no frontier.
  (tmp_path / "recall-plan" / "plan.json").write_text("{}\n")
  (tmp_path / "y.npy").write_text("earlier output\n")
  return [
      (["fit", "--corpus", x, "--out", ckpt, "--steps", "1"], ckpt),
      (["apply", "--checkpoint", ckpt, "--input", x, "--output", tmp_path / "y.npy"],
       tmp_path / "y.npy"),
      (["eval", "--corpus", x, "--out", existing_dir], existing_dir),
      (["plan", "--corpus", x, "--queries", x, "--bytes-per-vector", "8", "--out",
        existing_dir], existing_dir),
      (["index", "build", "--corpus", x, "--out", index], index),
      (["index", "search", "--index", index, "--queries", x, "--output", tmp_path / "run.tsv"],
       tmp_path / "run.tsv"),
      (["plan", "--index", index, "--queries", x, "--recall", "0.9", "--out",
        tmp_path / "recall-plan"], tmp_path / "recall-plan" / "plan.json"),
  ]


def test_every_writing_command_refuses_to_replace_a_result_without_overwrite(
    tmp_path, tiny_ckpt, capsys):
  import shutil
  ckpt = tmp_path / "ck"
  shutil.copytree(tiny_ckpt, ckpt)
  for argv, result in _writing_commands(tmp_path, ckpt):
    before = _tree_bytes(tmp_path)
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, (argv, err)
    command = " ".join(argv[:2]) if argv[0] == "index" else argv[0]
    assert err.startswith(f"matryoshka-adaptor {argv[0]}: error: "), err
    assert f"found an existing {result}" in err and "pass --overwrite" in err, (command, err)
    assert _tree_bytes(tmp_path) == before, command


def test_api_saves_refuse_to_replace_without_overwrite(tmp_path, tiny_ckpt):
  model = adaptor.load(tiny_ckpt)
  with pytest.raises(adaptor.CheckpointError, match="overwrite=False"):
    model.save(tiny_ckpt)
  index = adaptor.MatryoshkaIndex.build(DOCS[:50])
  index.save(tmp_path / "ix")
  with pytest.raises(adaptor.InputError, match="overwrite=False"):
    index.save(tmp_path / "ix")
  index.save(tmp_path / "ix", overwrite=True)


def test_fit_overwrite_replaces_the_checkpoint(tmp_path, tiny_ckpt, capsys):
  import shutil
  ckpt = tmp_path / "ck"
  shutil.copytree(tiny_ckpt, ckpt)
  np.save(tmp_path / "corpus.npy", DOCS)
  np.save(tmp_path / "queries.npy", QUERIES)
  rc = main(_fit_command(tmp_path, ckpt, "--overwrite"))
  assert rc == 0, capsys.readouterr().err
  fitted = adaptor.load(ckpt)
  assert fitted.info["stages"]["unsupervised"]["steps"] == 24
  assert [h["step"] for h in fitted.info["stages"]["unsupervised"]["history"]] == [
      0, 8, 16, 24]
  assert fitted.info["corpus_fingerprint"] == adaptor.data.fingerprint(DOCS)


# ------------------------------------------------------------------ 5. file modes


def _modes(root):
  out = {}
  for dirpath, dirnames, files in os.walk(root):
    for name in dirnames + files:
      p = os.path.join(dirpath, name)
      out[os.path.relpath(p, root)] = stat.S_IMODE(os.lstat(p).st_mode)
  return out


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(umask, tmp_path, tiny_ckpt, capsys):
  from adaptor.evaluation import write_json
  np.save(tmp_path / "x.npy", DOCS[:20])
  out = tmp_path / "out"
  out.mkdir()
  old = os.umask(umask)
  try:
    model = adaptor.load(tiny_ckpt)
    model.save(out / "checkpoint")
    adaptor.apply_files(model, tmp_path / "x.npy", out / "shards", quiet=True)
    assert main(["apply", "--checkpoint", str(tiny_ckpt), "--input", str(tmp_path / "x.npy"),
                 "--output", str(out / "y.npy")]) == 0
    assert main(["index", "build", "--corpus", str(tmp_path / "x.npy"), "--checkpoint",
                 str(tiny_ckpt), "--out", str(out / "index"), "--stores", "binary:16"]) == 0
    assert main(["index", "search", "--index", str(out / "index"), "--queries",
                 str(tmp_path / "x.npy"), "--k", "3", "--output", str(out / "run.tsv")]) == 0
    write_json({"a": 1}, out / "results" / "results.json")
  finally:
    os.umask(old)
  capsys.readouterr()
  modes = _modes(out)
  want = {p: (0o777 if (out / p).is_dir() else 0o666) & ~umask for p in modes}
  assert modes == want
  assert {"checkpoint/COMPLETE", "shards/manifest.json", "shards/part-00000.npy", "y.npy",
          "index/index.json", "run.tsv", "results/results.json"} <= set(modes)


# ------------------------------------------------------------------ 1. check, relative path


def test_check_accepts_a_checkpoint_given_by_a_relative_path(tmp_path, tiny_ckpt, capsys,
                                                             monkeypatch):
  import shutil
  shutil.copytree(tiny_ckpt, tmp_path / "checkpoints" / "tiny")
  monkeypatch.chdir(tmp_path)
  rc = main(["check", "checkpoints/tiny"])
  out = capsys.readouterr().out
  assert rc == 0, out
  assert out.startswith("checkpoints/tiny: OK, an adaptor checkpoint (d_in=16, d_out=16"), out


# ------------------------------------------------------------------ 4. interrupts


INTERRUPT_SEED = 0
# The suite interrupts 8 moments; the target run is 20:
# MATRYOSHKA_INTERRUPT_MOMENTS=20 python -m pytest tests/test_guarantees.py -k seeded -s
INTERRUPT_MOMENTS = int(os.environ.get("MATRYOSHKA_INTERRUPT_MOMENTS", "8"))


def _fit_command(tmp_path, out, *extra):
  return ["fit", "--corpus", str(tmp_path / "corpus.npy"), "--queries",
          str(tmp_path / "queries.npy"), "--dims", "4,8,16", "--steps", "24",
          "--eval-every", "8", "--out", str(out), "--quiet", *extra]


class _Armed:
  """Sends a signal to this process at the n-th call of one phase of a fit."""

  PHASES = ("step", "step", "step", "neighbours", "validation", "save")

  def __init__(self, monkeypatch):
    self.target = None
    self.fired = False
    self.calls = {}
    real_make_step = train._make_step

    def make_step(*args):
      step = real_make_step(*args)
      return lambda *a: self._hit("step", step, *a)
    monkeypatch.setattr(train, "_make_step", make_step)
    for phase, module, name in (("neighbours", train, "_neighbour_table"),
                                ("validation", distributed, "agreed_score"),
                                ("save", checkpoint, "save")):
      real = getattr(module, name)
      monkeypatch.setattr(module, name,
                          lambda *a, _p=phase, _f=real, **k: self._hit(_p, _f, *a, **k))

  def arm(self, phase, n, signum):
    self.target, self.fired, self.calls = (phase, n, signum), False, {}

  def _hit(self, phase, fn, *args, **kwargs):
    self.calls[phase] = self.calls.get(phase, 0) + 1
    if self.target is not None and self.target[:2] == (phase, self.calls[phase]):
      self.fired = True
      os.kill(os.getpid(), self.target[2])  # Lands inside the phase: deferred to a safe point.
    return fn(*args, **kwargs)


def test_interrupts_at_seeded_moments_of_a_fit_end_in_one_line_and_resume_exactly(
    tmp_path, monkeypatch, capsys):
  import signal
  np.save(tmp_path / "corpus.npy", DOCS)
  np.save(tmp_path / "queries.npy", QUERIES)
  assert main(_fit_command(tmp_path, tmp_path / "reference")) == 0
  reference = adaptor.load(tmp_path / "reference")
  armed = _Armed(monkeypatch)
  rng = np.random.default_rng(INTERRUPT_SEED)
  print(f"interrupt seed {INTERRUPT_SEED}, {INTERRUPT_MOMENTS} moments")
  out, interrupts, completed, chain = tmp_path / "out", 0, 0, 0
  while interrupts < INTERRUPT_MOMENTS:
    phase = str(rng.choice(_Armed.PHASES))
    n = int(rng.integers(1, 4 if phase == "step" else 3))
    signum = int(rng.choice([signal.SIGINT, signal.SIGTERM]))
    armed.arm(phase, n, signum)
    capsys.readouterr()
    rc = main(_fit_command(tmp_path, out))
    err = capsys.readouterr().err
    what = f"seed {INTERRUPT_SEED}, moment {interrupts}: {phase} call {n}, signal {signum}"
    assert "Traceback" not in err, (what, err)
    if armed.fired:
      interrupts += 1
      lines = err.strip().splitlines()
      name = signal.Signals(signum).name
      assert rc == 128 + signum, (what, rc, err)
      assert len(lines) == 1 and lines[0].startswith(
          f"matryoshka-adaptor fit: interrupted by {name}: "), (what, err)
      assert ("rerun the same command to resume" in lines[0]
              or "the fit had finished; saved to" in lines[0]), (what, err)
    else:
      assert rc == 0, (what, err)
    if out.exists():  # Finished (perhaps interrupted while saving): a new chain starts.
      _assert_same_fit(adaptor.load(out), reference, what)
      completed += 1
      out = tmp_path / f"out{completed}"
  armed.arm(None, 0, 0)
  if not out.exists():  # The last chain, run to its end.
    assert main(_fit_command(tmp_path, out)) == 0
  _assert_same_fit(adaptor.load(out), reference, f"seed {INTERRUPT_SEED}, last chain")


def _assert_same_fit(model, reference, what):
  for x, y in zip(_params(reference), _params(model)):
    np.testing.assert_array_equal(x, y, err_msg=what)
  assert model.info["stages"] == reference.info["stages"], what


def test_sigint_during_the_first_step_compile_exits_130_with_one_line(tmp_path, xla_cache):
  """A real process: the signal lands while XLA compiles the first step (a crash, 139, before)."""
  import signal
  import subprocess
  import sys
  import time
  from conftest import reap, subprocess_env
  np.save(tmp_path / "corpus.npy", DOCS)
  np.save(tmp_path / "queries.npy", QUERIES)
  argv = [a for a in _fit_command(tmp_path, tmp_path / "out") if a != "--quiet"]
  log = open(tmp_path / "fit.log", "w+")
  proc = subprocess.Popen([sys.executable, "-m", "adaptor.cli", *argv], stdout=log, stderr=log,
                          env=subprocess_env(xla_cache, JAX_DISABLE_MOST_OPTIMIZATIONS="1"))
  try:
    # The progress bar appears just before the first step, whose compile follows.
    deadline = time.monotonic() + 120
    while "unsupervised:" not in (tmp_path / "fit.log").read_text():
      assert proc.poll() is None, (tmp_path / "fit.log").read_text()
      assert time.monotonic() < deadline, "no progress bar after 120 s"
      time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
  finally:
    reap(proc, log)
  text = (tmp_path / "fit.log").read_text()
  assert proc.returncode == 130, (proc.returncode, text)
  assert "Traceback" not in text, text
  last = text.strip().splitlines()[-1]
  assert last.startswith("matryoshka-adaptor fit: interrupted by SIGINT: resume state at step "), text
  assert last.endswith(f"kept in {tmp_path / 'out.train'}; rerun the same command to resume"), text
  assert checkpoint.TrainCheckpointer(tmp_path / "out.train" / "unsupervised").latest() >= 1


# ------------------------------------------------------------------ 6. smaller ones


def test_fit_refuses_qrels_without_supervised(tmp_path, capsys):
  np.save(tmp_path / "x.npy", DOCS)
  (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\n")
  rc = main(["fit", "--corpus", str(tmp_path / "x.npy"), "--qrels", str(tmp_path / "qrels.tsv"),
             "--out", str(tmp_path / "ck")])
  err = capsys.readouterr().err
  assert rc == 2, err
  assert f"--qrels {tmp_path / 'qrels.tsv'} is used only by a supervised fit" in err, err
  assert not (tmp_path / "ck").exists()


def test_apply_one_vector_gives_one_vector(tiny_ckpt):
  model = adaptor.load(tiny_ckpt)
  one = model.apply(DOCS[3])
  assert one.shape == (16,)
  np.testing.assert_array_equal(one, model.apply(DOCS[3:4])[0])


def test_apply_at_an_untrained_dim_warns_and_a_trained_one_does_not(tiny_ckpt, tmp_path):
  import warnings
  model = adaptor.load(tiny_ckpt)
  assert model.dims == (16,)  # The tiny adaptor's config: trained at 16 only.
  with pytest.warns(UserWarning, match=r"dim=8 is not one of the adaptor's trained dims \[16\]"):
    model.apply(DOCS[:4], dim=8)
  np.save(tmp_path / "x.npy", DOCS[:4])
  with pytest.warns(UserWarning, match=r"dim=8 is not one of the adaptor's trained dims"):
    adaptor.apply_files(model, tmp_path / "x.npy", tmp_path / "out", dim=8, quiet=True)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    model.apply(DOCS[:4], dim=16)


def test_fit_and_apply_take_a_dataset_object_and_a_path(tiny_ckpt, tmp_path):
  import datasets
  model = adaptor.load(tiny_ckpt)
  ds = datasets.Dataset.from_dict({"embedding": DOCS[:5].tolist()})
  want = model.apply(DOCS[:5])
  np.testing.assert_array_equal(model.apply(ds), want)
  np.save(tmp_path / "x.npy", DOCS[:5])
  np.testing.assert_array_equal(model.apply(str(tmp_path / "x.npy")), want)
  # fit reads the Dataset (d=8 here) and only then refuses the queries of another d.
  with pytest.raises(adaptor.InputError, match=r"queries must have d=8 columns, got shape \(30, 16\)"):
    adaptor.fit(datasets.Dataset.from_dict({"embedding": DOCS[:5, :8].tolist()}),
                queries=QUERIES, quiet=True)


def test_a_nan_deep_in_a_streamed_input_is_named_by_check_not_sent_to_rerun(tiny_ckpt, tmp_path,
                                                                            capsys):
  model = adaptor.load(tiny_ckpt)
  (tmp_path / "in").mkdir()
  bad = DOCS[:30].copy()
  bad[25, 3] = np.nan
  np.save(tmp_path / "in" / "a.npy", DOCS[:30])
  np.save(tmp_path / "in" / "b.npy", bad)
  with pytest.raises(adaptor.InputError, match="NaN"):
    adaptor.apply_files(model, tmp_path / "in", tmp_path / "out", shard_rows=20, batch_size=10,
                        quiet=True)
  assert main(["check", str(tmp_path / "out")]) == 2
  out = capsys.readouterr().out
  assert "apply stopped at bad input" in out and "NaN" in out, out
  assert "fix the input, then rerun apply with --overwrite" in out, out
  assert "rerun apply to finish it" not in out, out


def test_eval_finds_a_read_only_output_folder_before_any_work(tmp_path, capsys, monkeypatch):
  from test_reliability import _read_only
  ro = tmp_path / "ro"
  ro.mkdir()
  with _read_only(ro, monkeypatch):
    # The corpus does not exist: the output is checked first, so that is what is named.
    rc = main(["eval", "--corpus", str(tmp_path / "missing.npy"), "--out", str(ro / "res")])
  err = capsys.readouterr().err
  assert rc == 2, err
  assert f"--out {ro / 'res'}: could not write in {ro}: Permission denied" in err, err


def test_progress_bar_names_the_validation_score(capsys):
  _fit(quiet=False)
  err = capsys.readouterr().err
  assert "val_loss=" in err and "val=" not in err, err


def test_plot_ticks_every_dim_in_plain_numbers(tmp_path, monkeypatch):
  from adaptor import evaluation
  figures = []
  monkeypatch.setattr(evaluation, "save_figure", lambda fig, path: figures.append(fig))
  results = {"raw": {str(d): {"ndcg@10": d / 400} for d in (16, 32, 64, 128, 256, 384)}}
  evaluation.plot(results, tmp_path / "p.png")
  ax = figures[0].axes[0]
  assert list(ax.get_xticks()) == [16, 32, 64, 128, 256, 384]
  assert [t.get_text() for t in ax.get_xticklabels()] == ["16", "32", "64", "128", "256", "384"]
  assert list(ax.xaxis.get_minorticklocs()) == []


def test_bench_search_without_faiss_says_the_bench_extra_is_needed(tmp_path):
  import subprocess
  import sys
  from conftest import REPO
  stub = tmp_path / "stub" / "faiss"
  stub.mkdir(parents=True)
  (stub / "__init__.py").write_text("raise ImportError(\"No module named 'faiss'\")\n")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "stub"), str(REPO)])}
  done = subprocess.run([sys.executable, str(REPO / "experiments" / "bench_search.py"),
                         "--smoke", "--out", str(tmp_path / "res")], env=env,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 2, done.stderr
  assert done.stderr.strip().splitlines() == [
      "bench_search.py: the speed part needs FAISS (No module named 'faiss'); install the bench "
      "extra: pip install -e '.[bench]'"], done.stderr


# ------------------------------------------------------------------ untrusted files


@pytest.fixture
def outputs(tmp_path, tiny_ckpt):
  """A streamed apply output, an index and a checkpoint, each in its own folder."""
  import shutil
  model = adaptor.load(tiny_ckpt)
  np.save(tmp_path / "x.npy", DOCS[:20])
  adaptor.apply_files(model, tmp_path / "x.npy", tmp_path / "shards", quiet=True)
  adaptor.MatryoshkaIndex.build(DOCS[:20], stores={"binary": 16}).save(tmp_path / "ix")
  shutil.copytree(tiny_ckpt, tmp_path / "ck")
  np.save(tmp_path / "outside.npy", DOCS[:20])
  return tmp_path


def _edit_json(path, edit):
  meta = json.loads(path.read_text())
  edit(meta)
  path.write_text(json.dumps(meta))


def _refused_by_loader_and_check(path, load, needle, capsys):
  with pytest.raises(ValueError, match=needle):
    load(path)
  capsys.readouterr()
  assert main(["check", str(path)]) == 2
  out = capsys.readouterr().out
  assert needle.replace("\\", "") in out, out


@pytest.mark.parametrize("name", ["../outside.npy", "/etc/hostname", "sub/part-00000.npy"])
def test_a_manifest_naming_a_file_outside_its_folder_is_refused(name, outputs, capsys):
  def edit(m):
    m["shards"][0]["file"] = name
  _edit_json(outputs / "shards" / "manifest.json", edit)
  _refused_by_loader_and_check(outputs / "shards", adaptor.read_shards,
                               "expected a plain file name inside", capsys)


def test_a_shard_that_links_outside_its_folder_is_refused(outputs, capsys):
  shard = outputs / "shards" / "part-00000.npy"
  os.replace(shard, outputs / "moved.npy")
  shard.symlink_to(outputs / "moved.npy")
  _refused_by_loader_and_check(outputs / "shards", adaptor.read_shards, "found a link to",
                               capsys)


def test_a_shard_of_another_dtype_than_its_manifest_is_refused(outputs, capsys):
  def edit(m):
    m["config"]["dtype"] = "float16"
  _edit_json(outputs / "shards" / "manifest.json", edit)
  _refused_by_loader_and_check(outputs / "shards", adaptor.read_shards,
                               "must have dtype float16 \\(manifest.json\\), got float32", capsys)


def test_an_index_json_naming_a_file_outside_its_folder_is_refused(outputs, capsys):
  def edit(m):
    m["stores"][0]["files"]["bits"] = "../outside.npy"
  _edit_json(outputs / "ix" / "index.json", edit)
  _refused_by_loader_and_check(outputs / "ix", adaptor.MatryoshkaIndex.load,
                               "expected a plain file name inside", capsys)


def test_an_index_file_linking_outside_its_folder_is_refused(outputs, capsys):
  vectors = outputs / "ix" / "vectors.npy"
  os.replace(vectors, outputs / "vectors.npy")
  vectors.symlink_to(outputs / "vectors.npy")
  _refused_by_loader_and_check(outputs / "ix", adaptor.MatryoshkaIndex.load,
                               "found links leaving it", capsys)


def test_a_checkpoint_linking_outside_its_folder_is_refused(outputs, capsys):
  params = outputs / "ck" / "params"
  os.replace(params, outputs / "params")
  params.symlink_to(outputs / "params")
  _refused_by_loader_and_check(outputs / "ck", adaptor.load, "found links leaving it", capsys)


# ------------------------------------------------------------------ concurrency


def test_eight_search_threads_and_add_see_the_index_before_or_after_each_add():
  import threading
  rng = np.random.default_rng(7)
  docs = rng.normal(size=(3000, D)).astype(np.float32)
  queries = rng.normal(size=(16, D)).astype(np.float32)
  # Each add holds near-copies of four queries, so each changes their top results.
  adds = [queries[4 * (i % 4): 4 * (i % 4) + 4].repeat(50, axis=0)
          + 0.01 * (i + 1) * rng.normal(size=(200, D)).astype(np.float32) for i in range(6)]
  states = [adaptor.MatryoshkaIndex.build(docs)]
  for i, batch in enumerate(adds):
    nxt = adaptor.MatryoshkaIndex.build(docs)
    for b in adds[:i + 1]:
      nxt.add(b)
    states.append(nxt)
  expected = [s.search(queries, 5, dim=8) for s in states]
  index = adaptor.MatryoshkaIndex.build(docs)
  seen, errors, stop = [], [], threading.Event()

  def searcher():
    try:
      while not stop.is_set():
        seen.append(index.search(queries, 5, dim=8))
    except Exception as e:  # Reported below, with the main thread's assertion.
      errors.append(repr(e))

  threads = [threading.Thread(target=searcher) for _ in range(8)]
  for t in threads:
    t.start()
  try:
    for batch in adds:
      index.add(batch)
  finally:
    stop.set()
    for t in threads:
      t.join()
  assert errors == []
  assert len(seen) >= 8
  for scores, ids in seen:
    assert any(np.array_equal(ids, e_ids) and np.allclose(scores, e_scores, atol=1e-6)
               for e_scores, e_ids in expected), ids[:2]
  np.testing.assert_array_equal(index.search(queries, 5, dim=8)[1], expected[-1][1])
