"""Index search on every CPU core: one pinned worker process per core, over shared memory.

    index = MatryoshkaIndex.load("indexes/big", workers=2)   # or index.start_workers(2)
    scores, ids = index.search(queries, 10, schedule=[(64, 100), (256, 20), (768, 10)])
    index.stop_workers()

XLA's CPU runtime spreads one large matmul over the cores, but the rest of a
search (top-k selection, shortlist gathers, re-ranking) runs on one, so a
funnel search in one process barely gains from a second core. A `SearchPool`
instead starts one worker process per CPU, each pinned to its CPU (so XLA in
it uses only that one), and gives each worker a contiguous share of the
queries. Every worker searches its share exactly as a single process would,
so the results are the same, bit for bit.

The index's arrays (vectors, prefix norms, quantised stores, first-stage
copies) live in shared-memory files that every worker maps without copying:
the pool moves them there when it starts (`MatryoshkaIndex.load(workers=)`
reads them there directly), and the files are unlinked as soon as every
worker has mapped them, so a killed program leaves none behind. Arrays a
search needs later (the norms of a new prefix, a first-stage copy) are shared
the same way with the request that first needs them.

Workers are started with `python -m adaptor.pool`, not multiprocessing, so a
user's script is never re-imported in them. A worker that dies fails the
search with its exit code and stops the pool; the index then searches in one
process again.
"""

from __future__ import annotations

import mmap
import os
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
import weakref
from multiprocessing.connection import Connection

import numpy as np

from adaptor.data import InputError
from adaptor.search import SearchArrays
from adaptor.topk import available_cpus

# Seconds a worker may take to start (import JAX, map the arrays).
_START_TIMEOUT = 300.0
_ERRORS = {"InputError": InputError, "ValueError": ValueError, "TypeError": TypeError}


def _shm_dir() -> str:
  return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


class SharedArrays:
  """Arrays allocated in shared-memory files, with the files' paths until unlinked."""

  def __init__(self):
    self._paths = {}   # id(array) -> (array, path)
    self._finalizer = weakref.finalize(self, _unlink_all, self._paths)

  def empty(self, shape, dtype) -> np.ndarray:
    """An uninitialised array in a new shared-memory file (page aligned)."""
    shape = tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    size = max(1, count * dtype.itemsize)
    fd, path = tempfile.mkstemp(prefix="matryoshka-", suffix=".shm", dir=_shm_dir())
    try:
      os.ftruncate(fd, size)
      buf = mmap.mmap(fd, size)
    except BaseException:
      os.unlink(path)
      raise
    finally:
      os.close(fd)
    out = np.frombuffer(buf, dtype, count).reshape(shape)
    self._paths[id(out)] = (out, path)
    return out

  def share(self, array) -> np.ndarray:
    """`array` itself if it is one of ours and still has its file, else a shared copy."""
    entry = self._paths.get(id(array))
    if entry is not None and entry[0] is array:
      return array
    out = self.empty(array.shape, array.dtype)
    out[...] = array
    return out

  def spec(self, array) -> tuple[str, tuple[int, ...], str]:
    """(path, shape, dtype) that `attach` maps in another process."""
    entry = self._paths.get(id(array))
    if entry is None or entry[0] is not array:
      raise ValueError("array is not in a shared-memory file of this SharedArrays")
    return entry[1], array.shape, array.dtype.str

  def unlink(self) -> None:
    """Removes every file (the mappings stay valid where they exist)."""
    _unlink_all(self._paths)


def _unlink_all(paths: dict) -> None:
  for _, path in list(paths.values()):
    try:
      os.unlink(path)
    except FileNotFoundError:
      pass
  paths.clear()


def attach(spec) -> np.ndarray:
  """Maps an array shared by `SharedArrays.spec` (read-only, no copy)."""
  path, shape, dtype = spec
  dtype = np.dtype(dtype)
  count = int(np.prod(shape))
  with open(path, "rb") as f:
    buf = mmap.mmap(f.fileno(), max(1, count * dtype.itemsize), access=mmap.ACCESS_READ)
  return np.frombuffer(buf, dtype, count).reshape(shape)


class WorkerError(RuntimeError):
  """A search worker died or failed in a way that is not the caller's input."""


class SearchPool:
  """Worker processes that search one index's arrays, each on its own CPU.

  Made by `MatryoshkaIndex.start_workers`; use the index's `search`, which
  hands its checked stages and adapted queries to `search` here. Each worker
  maps the arrays and searches them through `search.SearchArrays`, as the
  index does in its own process.

  Attributes:
    arrays: the `search.SearchArrays` searched, moved into shared memory
      (the index searches these from then on).
    workers: the number of worker processes.
    cpus: the CPU each worker is pinned to.
    pids: their process ids.
    closed: whether the pool is stopped.
  """

  def __init__(self, arrays, workers: int | None = None, *, shared: SharedArrays | None = None,
               cpus=None):
    import jax
    if jax.default_backend() != "cpu":
      raise ValueError(f"search workers are for CPU search; the {jax.default_backend()} backend "
                       f"already runs one search over the whole device")
    cpus = list(available_cpus() if cpus is None else cpus)
    if workers is None:
      workers = len(cpus)
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
      raise ValueError(f"workers must be a positive int, got {workers!r}")
    self.workers = int(workers)
    self.cpus = [cpus[i % len(cpus)] for i in range(self.workers)]
    self.shared = shared or SharedArrays()
    self._sent = {}       # key -> the array the workers have for it
    self._procs, self._conns = [], []
    self.closed = False
    self._lock = threading.Lock()   # One search at a time talks to the workers.
    moved = {key: self.shared.share(a) for key, a in arrays.arrays().items()}
    self.arrays = SearchArrays.from_arrays(moved)
    self.arrays.alloc = self.shared.empty   # First-stage copies made later are shared too.
    specs = {key: self.shared.spec(a) for key, a in moved.items()}
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    try:
      for cpu in self.cpus:
        parent, child = socket.socketpair()
        proc = subprocess.Popen([sys.executable, "-m", "adaptor.pool", str(child.fileno()), str(cpu)],
                                pass_fds=(child.fileno(),), env=env)
        child.close()
        conn = Connection(parent.detach())
        self._procs.append(proc)
        self._conns.append(conn)
        conn.send(specs)
      for i in range(self.workers):
        reply = self._reply(i, timeout=_START_TIMEOUT)
        if isinstance(reply, BaseException):   # It could not map the index.
          raise reply
    except BaseException:
      self.close()
      raise
    finally:
      self.shared.unlink()   # Every worker has mapped them (or the pool is closed).
    self._sent.update(moved)

  @property
  def pids(self) -> list[int]:
    return [p.pid for p in self._procs]

  def _reply(self, i: int, *, timeout: float | None = None):
    conn, proc = self._conns[i], self._procs[i]
    try:
      if timeout is not None and not conn.poll(timeout):
        raise WorkerError(f"search worker {i} (pid {proc.pid}, CPU {self.cpus[i]}) did not answer "
                          f"within {timeout:.0f} s")
      msg = conn.recv()
    except (EOFError, OSError):
      code = proc.wait(timeout=10)
      raise WorkerError(f"search worker {i} (pid {proc.pid}, CPU {self.cpus[i]}) exited with code "
                        f"{code}; the pool is stopped (start_workers() starts a new one)") from None
    if msg[0] == "error":
      _, name, text, tb = msg
      if name in _ERRORS:
        return _ERRORS[name](text)
      return WorkerError(f"search worker {i} (pid {proc.pid}) failed: {name}: {text}\n{tb}")
    return msg

  def search(self, queries: np.ndarray, stages, k: int, **how):
    """Top-k rows for adapted queries [n_q, d], split over the workers in order.

    Args:
      queries: adapted queries, float32 [n_q, d].
      stages: checked stages (see `SearchArrays.search`).
      k: results per query.
      how: block_size, query_batch and copy, as `SearchArrays.search` takes them.
    """
    with self._lock:
      return self._search(queries, stages, k, how)

  def _search(self, queries, stages, k, how):
    if self.closed:
      raise WorkerError("the search pool is stopped")
    new = {}   # Norms and first-stage copies this search reads that the workers lack.
    for key, array in self.arrays.needs(stages, copy=how.get("copy", False)).items():
      if self._sent.get(key) is not array:
        shared = self.shared.share(array)
        self.arrays.adopt(key, shared)
        new[key] = shared
    specs = {key: self.shared.spec(a) for key, a in new.items()}
    chunks = [c for c in np.array_split(np.arange(queries.shape[0]), self.workers) if len(c)]
    try:
      try:
        for i, rows in enumerate(chunks):
          try:
            self._conns[i].send(("search", np.ascontiguousarray(queries[rows[0]:rows[-1] + 1]),
                                 tuple(stages), k, how, specs))
          except OSError:   # A dead worker; _reply says how it ended.
            self._reply(i)
            raise
        replies = [self._reply(i) for i in range(len(chunks))]
      finally:
        self.shared.unlink()
    except BaseException:
      self.close()   # Workers may be mid-reply: the pool cannot be reused.
      raise
    self._sent.update(new)
    for r in replies:
      if isinstance(r, BaseException):
        raise r
    return (np.concatenate([r[1] for r in replies]), np.concatenate([r[2] for r in replies]))

  def close(self) -> None:
    """Stops the workers; idempotent."""
    if self.closed:
      return
    self.closed = True
    for conn in self._conns:
      try:
        conn.send(("stop",))
      except OSError:
        pass
    for proc in self._procs:
      try:
        proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for conn in self._conns:
      conn.close()
    self.shared.unlink()

  def __del__(self):
    try:
      self.close()
    except Exception:
      pass

  def __repr__(self):
    state = "stopped" if self.closed else "running"
    return f"SearchPool(workers={self.workers}, cpus={self.cpus}, {state})"


def _worker(fd: int, cpu: int) -> None:
  """A worker's life: map the arrays, then answer searches until told to stop."""
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {cpu})   # Before XLA sizes its thread pool.
  conn = Connection(fd)
  try:
    specs = conn.recv()
  except EOFError:
    return
  try:
    arrays = SearchArrays.from_arrays({key: attach(spec) for key, spec in specs.items()})
    conn.send(("ready", os.getpid()))
  except Exception as e:
    conn.send(("error", type(e).__name__, str(e), traceback.format_exc()))
    return
  while True:
    try:
      msg = conn.recv()
    except EOFError:   # The parent is gone.
      return
    if msg[0] == "stop":
      return
    _, queries, stages, k, how, specs = msg
    try:
      for key, spec in specs.items():
        arrays.adopt(key, attach(spec))
      scores, rows = arrays.search(queries, stages, k, **how)
      conn.send(("ok", scores, rows))
    except Exception as e:
      conn.send(("error", type(e).__name__, str(e), traceback.format_exc()))


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]))
