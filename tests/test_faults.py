"""Crash tests: SIGKILL a real process mid-fit and mid-save, then check what is on disk.

(a) `matryoshka-adaptor fit` killed after its first step checkpoint, then run
    again with the same arguments, must end with exactly the parameters of an
    uninterrupted run.
(b) A process saving an adaptor over and over, killed at a random moment,
    must leave a checkpoint that `adaptor.load` reads as one of the saved
    versions, and no half-written directory that it accepts.

The subprocesses share a persistent XLA compilation cache, so only the first
one pays for compiling the trainer, and run with most XLA optimisations off,
which compiles several times faster; resuming does not depend on either.
"""

import json
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

import adaptor
from conftest import kill_seed, reap, subprocess_env




@pytest.fixture(scope="module")
def env(xla_cache):
  return subprocess_env(xla_cache, JAX_DISABLE_MOST_OPTIMIZATIONS="1")



def _params(path):
  model = adaptor.load(path)
  return model, [np.asarray(x) for x in jax.tree.leaves(nnx.state(model.module, nnx.Param))]


def _wait_for(predicate, proc, timeout, what, log):
  deadline = time.monotonic() + timeout
  while not predicate():
    if proc.poll() is not None:
      log.seek(0)
      raise AssertionError(f"process exited ({proc.returncode}) before {what}: {log.read()}")
    if time.monotonic() > deadline:
      proc.kill()
      raise AssertionError(f"timed out after {timeout} s waiting for {what}")
    time.sleep(0.005)


def test_fit_killed_after_a_step_checkpoint_resumes_to_identical_parameters(tmp_path, env):
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(10, 16))
  corpus = centres[rng.integers(0, 10, 300)] + 0.3 * rng.normal(size=(300, 16))
  np.save(tmp_path / "corpus.npy", corpus.astype(np.float32))

  def command(out):
    # 300 steps with the default validation period of 200: a step checkpoint
    # at 200, then 100 more steps during which the kill lands.
    return [sys.executable, "-m", "adaptor.cli", "fit", "--corpus", str(tmp_path / "corpus.npy"),
            "--dims", "4,8,16", "--steps", "300", "--out", str(out), "--quiet"]

  subprocess.run(command(tmp_path / "reference"), env=env, check=True, capture_output=True,
                 timeout=300)

  out = tmp_path / "resumed"
  steps = tmp_path / "resumed.train" / "unsupervised"
  seed = kill_seed()
  # Output goes to a file: a pipe nobody reads could fill up and stall the child.
  log = open(tmp_path / "killed.log", "w+")
  proc = subprocess.Popen(command(out), env=env, stdout=log, stderr=log)
  try:
    _wait_for(lambda: steps.is_dir() and any(
        p.name.startswith("step_") and (p / "COMPLETE").is_file() for p in steps.iterdir()),
        proc, 300, "the first step checkpoint", log)
    time.sleep(np.random.default_rng(seed).uniform(0, 0.3))
    proc.send_signal(signal.SIGKILL)
  finally:
    reap(proc, log)
  assert proc.returncode == -signal.SIGKILL, (seed, proc.returncode)
  assert not out.exists(), f"the fit finished before the kill (seed {seed}); raise --steps"
  # Tag the validation history the killed run checkpointed: a rerun that
  # resumes carries the tag into the saved adaptor; one that starts over cannot.
  tagged = 0
  for step_dir in steps.glob("step_*"):
    if (step_dir / "COMPLETE").is_file():
      cfg = json.loads((step_dir / "config.json").read_text())
      cfg["meta"]["history"][0]["from_killed_run"] = True
      (step_dir / "config.json").write_text(json.dumps(cfg))
      tagged += 1
  assert tagged

  done = subprocess.run(command(out), env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert not (tmp_path / "resumed.train").exists()  # Resume state is removed once saved.

  reference, want = _params(tmp_path / "reference")
  resumed, got = _params(out)
  assert len(got) == len(want) > 0
  for x, y in zip(got, want):
    np.testing.assert_array_equal(x, y, err_msg=f"kill seed {seed}")
  ref_stage = reference.info["stages"]["unsupervised"]
  res_stage = resumed.info["stages"]["unsupervised"]
  assert res_stage["history"][0].pop("from_killed_run"), "the rerun started over"
  assert res_stage["history"] == ref_stage["history"]
  assert res_stage["steps"] == ref_stage["steps"] == 300
  assert res_stage["kept_step"] == ref_stage["kept_step"]


def _kill_save_loop(code: str, path, log_path, seed: int, env) -> int:
  """Runs `code`, which saves version 0, 1, ... to `path` and prints each once saved;
  SIGKILLs it at a random moment within two save periods after its third save; returns
  the last version it reported saved."""
  log = open(log_path, "w+")  # A file: an unread stderr pipe could fill up.
  proc = subprocess.Popen([sys.executable, "-c", code, str(path)], env=env,
                          stdout=subprocess.PIPE, stderr=log, text=True)
  try:
    stamps = []
    for _ in range(3):
      if not proc.stdout.readline():
        log.seek(0)
        raise AssertionError(f"the saving process died: {log.read()}")
      stamps.append(time.monotonic())
    time.sleep(np.random.default_rng(seed).uniform(0, 2 * (stamps[2] - stamps[1])))
    proc.send_signal(signal.SIGKILL)
  finally:
    reap(proc, log)
  rest = proc.stdout.read().split()
  return int(rest[-1]) if rest else 2


SAVE_LOOP = """
import sys
import jax.numpy as jnp
from flax import nnx
import adaptor
from adaptor.model import MatryoshkaAdaptor

module = MatryoshkaAdaptor(8, hidden=4, rngs=nnx.Rngs(0))
model = adaptor.Adaptor(module)
i = 0
while True:
  module.base.bias.set_value(jnp.full((8,), float(i)))  # Version i is readable from the bias.
  model.save(sys.argv[1], overwrite=True)
  print(i, flush=True)
  i += 1
"""


def test_adaptor_save_killed_at_a_random_moment_leaves_a_loadable_checkpoint(tmp_path, env):
  root = tmp_path / "checkpoints"
  path = root / "ck"
  seed = kill_seed()
  last = _kill_save_loop(SAVE_LOOP, path, tmp_path / "saver.log", seed, env)

  leftovers = sorted(p.name for p in root.iterdir() if p.name != "ck")
  model = adaptor.load(path)  # Moves the old checkpoint back if killed between renames.
  version = np.asarray(model.module.base.bias.get_value())
  assert (version == version[0]).all()
  # The last save that finished, or the one that was renaming into place.
  assert int(version[0]) in (last, last + 1), (seed, last, version, leftovers)
  # A leftover is refused unless it is complete (killed after its COMPLETE
  # marker, before its rename), and then it is one of the two versions too.
  for p in root.iterdir():
    if p.name == "ck":
      continue
    if (p / "COMPLETE").is_file():
      bias = np.asarray(adaptor.load(p).module.base.bias.get_value())
      assert int(bias[0]) in (last, last + 1), (seed, last, bias, leftovers)
    else:
      with pytest.raises(adaptor.CheckpointError, match="expected a complete checkpoint"):
        adaptor.load(p)
  # The next save goes through and is what loads.
  model.module.base.bias.set_value(np.full((8,), -1.0, np.float32))
  model.save(path, overwrite=True)
  assert (np.asarray(adaptor.load(path).module.base.bias.get_value()) == -1.0).all()


INDEX_SAVE_LOOP = """
import sys
import numpy as np
from adaptor.index import MatryoshkaIndex

rng = np.random.default_rng(0)
vectors = rng.normal(size=(2000, 32)).astype(np.float32)
i = 0
while True:
  # Version i is readable from the ids; vectors and norms change with it too.
  index = MatryoshkaIndex.build(vectors + i, ids=[f"v{i}-{j}" for j in range(2000)], dims=(8, 32))
  index.save(sys.argv[1], overwrite=True)
  print(i, flush=True)
  i += 1
"""


def test_index_save_killed_at_a_random_moment_leaves_the_previous_index_loadable(tmp_path, env):
  from adaptor.index import MatryoshkaIndex

  root = tmp_path / "indexes"
  path = root / "ix"
  seed = kill_seed()
  last = _kill_save_loop(INDEX_SAVE_LOOP, path, tmp_path / "index-saver.log", seed, env)

  index = MatryoshkaIndex.load(path)  # Moves the old index back if killed between renames.
  version = int(index.ids[0].split("-")[0][1:])
  assert version in (last, last + 1), (seed, last, version)
  rng = np.random.default_rng(0)
  want = rng.normal(size=(2000, 32)).astype(np.float32) + version
  want /= np.linalg.norm(want, axis=1, keepdims=True)
  np.testing.assert_allclose(index.vectors, want, rtol=1e-6, atol=1e-6, err_msg=f"seed {seed}")
  assert index.ids == [f"v{version}-{j}" for j in range(2000)]
  # Leftovers of the killed save are never taken for an index unless complete.
  for p in root.iterdir():
    if p.name != "ix" and not (p / "COMPLETE").is_file():
      with pytest.raises(adaptor.InputError, match="expected a complete index"):
        MatryoshkaIndex.load(p)
  # And the next save goes through.
  index.save(path, overwrite=True)
  assert MatryoshkaIndex.load(path).ids == index.ids
