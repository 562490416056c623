"""Shared fixtures."""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def subprocess_env(cache_dir, **extra) -> dict:
  """Environment for a child Python running this repo's code on the CPU.

  Children share a persistent XLA compilation cache in `cache_dir`, so only the
  first one pays for compiling a program.
  """
  return {
      **os.environ,
      "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
      "JAX_PLATFORMS": "cpu",
      "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
      **extra,
  }


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("xla-cache")


def reap(proc, log) -> None:
  """Leaves `proc` dead and waited for and `log` closed, also when a test failed early."""
  if proc.poll() is None:  # A failure before the kill: do not leave the child running.
    proc.kill()
  proc.wait()
  log.close()


_SESSION_CACHE = []


def pytest_configure(config):
  """One persistent XLA compilation cache for the whole test session.

  Every `adaptor.fit` jits a new step function, so without it each fit in the
  suite compiles its step again (seconds each on a small CPU); with it, a fit
  of a shape already seen loads the executable instead. Compiled code is the
  same either way. MATRYOSHKA_TEST_NO_CACHE=1 turns it off.
  """
  if os.environ.get("MATRYOSHKA_TEST_NO_CACHE"):
    return
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc
  path = tempfile.mkdtemp(prefix="matryoshka-xla-cache-")
  _SESSION_CACHE.append(path)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  cc.reset_cache()


def pytest_unconfigure(config):
  for path in _SESSION_CACHE:
    shutil.rmtree(path, ignore_errors=True)


def kill_seed() -> int:
  """The seed that picks a kill test's moment: fixed, so a failure can be rerun as it was.

  ADAPTOR_KILL_SEED=N overrides it (to try other moments); the seed is printed,
  so pytest shows it with any failure.
  """
  seed = int(os.environ.get("ADAPTOR_KILL_SEED", "0"))
  print(f"kill seed {seed} (rerun with ADAPTOR_KILL_SEED={seed})")
  return seed


@contextlib.contextmanager
def interrupted_at_step(monkeypatch, at_call: int):
  """Within the block, the fit's `at_call`-th training step raises KeyboardInterrupt.

  Wraps `train._make_step`, so the steps before it run (and checkpoint) as usual.
  """
  from adaptor import train
  real_make_step = train._make_step
  calls = {"n": 0}

  def make_failing_step(*args):
    step = real_make_step(*args)

    def wrapped(*a):
      calls["n"] += 1
      if calls["n"] == at_call:
        raise KeyboardInterrupt
      return step(*a)
    return wrapped

  with monkeypatch.context() as m:
    m.setattr(train, "_make_step", make_failing_step)
    yield
