"""Shared fixtures."""

import os
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
