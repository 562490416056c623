"""Helpers shared by the experiment scripts (imported as `common`: each script's folder is on sys.path)."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import numpy as np

# Set in a child's environment before JAX, XLA, OpenBLAS and FAISS start.
SINGLE_THREAD_ENV = {
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
}


def synthetic(n: int, d: int, seed: int, salt: int, out=None) -> np.ndarray:
  """Matryoshka-like synthetic vectors [n, d] float32 (into `out` if given).

  Coordinate variance decays along the vector (scale 1.0 down to 0.2), so
  short prefixes carry most of the signal; drawn in chunks of 65536 rows
  from the stream (seed, salt).
  """
  rng = np.random.default_rng([seed, salt])
  scale = np.linspace(1.0, 0.2, d).astype(np.float32)
  out = np.empty((n, d), np.float32) if out is None else out
  for s in range(0, n, 65536):
    out[s:s + 65536] = rng.standard_normal((min(65536, n - s), d), dtype=np.float32) * scale
  return out


def median_time(fn, repeats: int) -> float:
  """Median wall-clock seconds of `repeats` calls of `fn`."""
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def peak_rss_bytes() -> int:
  """This process's peak resident set size (VmHWM)."""
  for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) * 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_results(out: str, res: dict, table: str, *, also: str = "") -> None:
  """Writes <out>/results.json and <out>/tables.md and says so."""
  from adaptor.evaluation import write_json
  write_json(res, os.path.join(out, "results.json"))
  Path(out, "tables.md").write_text(table + "\n")
  print(f"wrote {out}/results.json, {out}/tables.md{also}")
