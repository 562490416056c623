"""Helpers shared by the experiment scripts (imported as `common`: each script's folder is on sys.path)."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import numpy as np

# Thread settings for OpenBLAS and FAISS (XLA ignores its own thread flags: see use_one_cpu).
SINGLE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
}


def use_one_cpu() -> int:
  """Runs this process on one CPU from now on; call before JAX, XLA, OpenBLAS or FAISS start.

  XLA's CPU runtime spreads a matmul over every CPU the process may use,
  whatever XLA_FLAGS say (measured with jax 0.10.2: a 512 x 768 x 65536
  matmul took 0.34 s unpinned and 0.66 s pinned, with
  --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1 in
  both), so one thread means pinning the process to one CPU.

  Returns:
    the CPU it now runs on.
  """
  os.environ.update(SINGLE_THREAD_ENV)
  cpu = min(os.sched_getaffinity(0))
  os.sched_setaffinity(0, {cpu})
  return cpu


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


def paired_times(ours, theirs, repeats: int) -> tuple[float, float, float]:
  """Times `theirs` and `ours` in pairs (`repeats`, rounded up to even), each first in half.

  This machine's speed drifts by 10-20% over minutes, so a ratio of two
  medians taken minutes apart can swing by as much. Within a pair the two
  run seconds apart, and the median of the per-pair ratios is what a
  speed-up claim quotes. The order alternates (theirs-ours, ours-theirs, ...)
  because a run right after the other side's is slower than a run after
  its own: a 32:500 funnel over 1M x 768 on one CPU ran 8.1x faster than
  FAISS full-size search right after it, and 9.4x as the second of two
  funnel runs (medians of 5; the cause is not pinned down: the kernel's
  DAMON monitor, which clears the accessed bits of memory left idle, is one
  suspect).

  Returns:
    (median seconds of ours, median seconds of theirs, median of theirs/ours per pair).
  """
  a, b = [], []
  for i in range(repeats + repeats % 2):   # each order equally often
    pair = ((theirs, b), (ours, a)) if i % 2 == 0 else ((ours, a), (theirs, b))
    for fn, times in pair:
      t = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t)
  ratios = [y / x for x, y in zip(a, b)]
  return float(np.median(a)), float(np.median(b)), float(np.median(ratios))


def peak_rss_bytes() -> int:
  """This process's peak resident set size (VmHWM)."""
  for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) * 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def pss_bytes(pid: int) -> int:
  """Proportional set size of a process: shared pages count 1/n in each of the n sharing them."""
  with open(f"/proc/{pid}/smaps_rollup") as f:
    for line in f:
      if line.startswith("Pss:"):
        return int(line.split()[1]) * 1024
  raise OSError(f"/proc/{pid}/smaps_rollup: no Pss line")


class PeakPss:
  """Samples the summed PSS of some processes in a thread; `.peak` is the largest sum seen."""

  def __init__(self, pids, every: float = 0.02):
    import threading
    self.pids, self.every, self.peak = list(pids), every, 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      self.sample()
      self._stop.wait(self.every)

  def sample(self) -> int:
    total = sum(pss_bytes(pid) for pid in self.pids)
    self.peak = max(self.peak, total)
    return total

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.sample()


def write_results(out: str, res: dict, table: str, *, also: str = "") -> None:
  """Writes <out>/results.json and <out>/tables.md and says so."""
  from adaptor.evaluation import write_json
  write_json(res, os.path.join(out, "results.json"))
  Path(out, "tables.md").write_text(table + "\n")
  print(f"wrote {out}/results.json, {out}/tables.md{also}")
