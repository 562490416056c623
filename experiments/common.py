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
