"""Search worker processes (adaptor/pool.py): same results as one process, shared memory, failures."""

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from adaptor.index import MatryoshkaIndex
from adaptor.pool import SharedArrays, WorkerError, _shm_dir, attach

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="shared-memory workers: Linux")

# (name, search kwargs): exact float search, a float funnel whose first stage
# reads a contiguous copy (made while the workers run), a mixed-precision
# funnel, an exact binary search, and a new prefix whose norms are not stored.
CASES = [
    ("exact", {}),
    ("exact-16", {"dim": 16}),
    ("exact-new-dim", {"dim": 40}),
    ("float-funnel", {"schedule": [(16, 300), (32, 60), (64, 10)]}),
    ("mixed-funnel", {"schedule": [(64, 400, "binary"), (32, 50, "int8"), (64, 10)]}),
    ("binary", {"dim": 48, "precision": "binary"}),
]


def _ours():
  """Shared-memory files this process's pools made (their names carry no pid: all ours here)."""
  return sorted(p.name for p in Path(_shm_dir()).glob("matryoshka-*.shm"))


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  corpus = (rng.standard_normal((3000, 64)) * np.linspace(1.0, 0.2, 64)).astype(np.float32)
  queries = rng.standard_normal((37, 64)).astype(np.float32)   # 37: an uneven split
  return corpus, queries


def _index(corpus):
  return MatryoshkaIndex.build(corpus, ids=[f"d{i}" for i in range(len(corpus))], dims=(16,),
                               stores={"binary": 64, "int8": 32})


def _results(index, queries, k=10):
  return {name: index.search(queries, k, **how) for name, how in CASES}


def _assert_same(found, ref):
  for name in ref:
    np.testing.assert_array_equal(found[name][1], ref[name][1], err_msg=name)
    np.testing.assert_array_equal(found[name][0], ref[name][0], err_msg=name)


def _mappings(pid):
  """The file mappings of process `pid`, from /proc/<pid>/maps."""
  out = []
  for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
    parts = line.split(maxsplit=5)
    if len(parts) == 6 and parts[4] != "0":
      start, end = (int(x, 16) for x in parts[0].split("-"))
      out.append({"start": start, "end": end, "perms": parts[1], "dev": parts[3],
                  "inode": parts[4], "path": parts[5]})
  return out


def _mapping_at(pid, address):
  found = [m for m in _mappings(pid) if m["start"] <= address < m["end"]]
  assert len(found) == 1, (hex(address), found)
  return found[0]


def test_workers_return_exactly_what_one_process_returns(data):
  corpus, queries = data
  ref = _results(_index(corpus), queries)
  before = _ours()
  index = _index(corpus)
  index.start_workers(2)
  try:
    assert index.workers == 2 and len(set(index.worker_pids)) == 2
    assert _ours() == before   # Files are unlinked once every worker has mapped them.
    _assert_same(_results(index, queries), ref)
    one = {name: index.search(queries[:1], 10, **how) for name, how in CASES}
    _assert_same(one, {name: (s[:1], i[:1]) for name, (s, i) in ref.items()})
    assert _ours() == before   # Also the arrays shared with a request (new norms, copies).
    # Each worker may only run on its own CPU (XLA then uses that one alone).
    for pid, cpu in zip(index.worker_pids, index.worker_cpus):
      assert os.sched_getaffinity(pid) == {cpu}
    # The index's arrays now live in shared memory and are the same values.
    np.testing.assert_array_equal(index.vectors, corpus / np.linalg.norm(corpus, axis=1,
                                                                           keepdims=True))
    # ... and every worker maps that very file (same device and inode, a shared
    # mapping), so the pages are one copy, not a copy per worker.
    mine = _mapping_at(os.getpid(), index.vectors.ctypes.data)
    assert "s" in mine["perms"] and Path(mine["path"].removesuffix(" (deleted)")).name.startswith(
        "matryoshka-"), mine
    for pid in index.worker_pids:
      theirs = [m for m in _mappings(pid) if (m["dev"], m["inode"]) == (mine["dev"], mine["inode"])]
      assert theirs and all("s" in m["perms"] for m in theirs), (pid, theirs)
  finally:
    index.stop_workers()
  assert index.workers == 0
  _assert_same(_results(index, queries), ref)   # And searches in this process after.


def test_add_and_add_store_restart_the_workers(data):
  corpus, queries = data
  rng = np.random.default_rng(1)
  extra = rng.standard_normal((500, 64)).astype(np.float32)
  ref_index = _index(corpus)
  ref_index.add(extra)
  ref_index.add_store("binary", 32)
  index = _index(corpus)
  index.start_workers(2)
  try:
    old = index.worker_pids
    index.add(extra)
    assert index.workers == 2 and index.worker_pids != old
    index.add_store("binary", 32)
    _assert_same(_results(index, queries), _results(ref_index, queries))
    how = {"dim": 32, "precision": "binary"}
    np.testing.assert_array_equal(index.search(queries, 5, **how)[1],
                                  ref_index.search(queries, 5, **how)[1])
  finally:
    index.stop_workers()


def test_a_dead_worker_fails_the_search_and_the_index_carries_on(data):
  corpus, queries = data
  ref = _index(corpus).search(queries, 10, dim=16)
  index = _index(corpus)
  index.start_workers(2)
  pids = index.worker_pids
  try:
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(WorkerError, match=rf"worker 1 \(pid {pids[1]}, CPU \d+\) exited with code -9"):
      index.search(queries, 10, dim=16)
    assert index.workers == 0
    for pid in pids:   # The other worker was stopped too.
      with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    found = index.search(queries, 10, dim=16)   # Now in this process.
    np.testing.assert_array_equal(found[1], ref[1])
  finally:
    index.stop_workers()


def test_bad_input_is_the_callers_error_and_keeps_the_pool(data):
  corpus, queries = data
  index = MatryoshkaIndex.build(corpus, stores={"binary": 32})
  index.start_workers(2)
  try:
    with pytest.raises(ValueError, match=r"dim must be in \[1, 64\].*got 65"):
      index.search(queries, 10, dim=65)
    with pytest.raises(ValueError, match="k must be an int in"):
      index.search(queries, 3001)
    with pytest.raises(ValueError, match="no binary store holds a 64-dim prefix"):
      index.search(queries, 10, dim=64, precision="binary")
    with pytest.raises(ValueError, match=r"query_embeddings.*d=64|expected.*64"):
      index.search(queries[:, :10], 10)
    assert index.workers == 2
    assert index.search(queries, 3, dim=8)[1].shape == (37, 3)
  finally:
    index.stop_workers()


def test_load_reads_into_shared_memory_for_the_workers(data, tmp_path):
  corpus, queries = data
  saved = _index(corpus)
  saved.save(tmp_path / "ix")
  ref = _results(saved, queries)
  before = _ours()
  index = MatryoshkaIndex.load(tmp_path / "ix", workers=2)
  try:
    assert index.workers == 2 and _ours() == before
    _assert_same(_results(index, queries), ref)
  finally:
    index.stop_workers()


def test_shared_arrays_round_trip_and_unlink():
  shared = SharedArrays()
  a = shared.empty((3, 5), np.float16)
  a[...] = np.arange(15).reshape(3, 5)
  assert a.ctypes.data % 4096 == 0   # Page aligned: JAX maps it without a copy.
  assert shared.share(a) is a
  b = attach(shared.spec(a))
  np.testing.assert_array_equal(b, a)
  assert not b.flags.writeable
  path = shared.spec(a)[0]
  shared.unlink()
  assert not os.path.exists(path)
  np.testing.assert_array_equal(b, a)   # Mappings outlive the file.
  c = shared.share(a)                   # Unlinked: sharing again makes a new file.
  assert c is not a and os.path.exists(shared.spec(c)[0])
  shared.unlink()
  with pytest.raises(ValueError, match="not in a shared-memory file"):
    shared.spec(np.zeros(3))


def test_searches_from_several_threads_each_get_their_own_results(data):
  from concurrent.futures import ThreadPoolExecutor
  corpus, queries = data
  ref = _index(corpus)
  index = _index(corpus)
  index.start_workers(2)
  try:
    dims = [8, 16, 24, 32, 40, 48, 56, 64]
    with ThreadPoolExecutor(4) as ex:
      found = list(ex.map(lambda m: index.search(queries, 5, dim=m), dims))
    for m, (s, i) in zip(dims, found):
      np.testing.assert_array_equal(i, ref.search(queries, 5, dim=m)[1], err_msg=f"dim {m}")
  finally:
    index.stop_workers()


def test_cli_search_with_workers_writes_the_same_run(data, tmp_path):
  from adaptor import cli
  corpus, queries = data
  _index(corpus).save(tmp_path / "ix")
  np.save(tmp_path / "q.npy", queries)
  common = ["index", "search", "--index", str(tmp_path / "ix"), "--queries", str(tmp_path / "q.npy"),
            "--schedule", "16:300,64:10"]
  assert cli.main([*common, "--output", str(tmp_path / "one.tsv")]) == 0
  assert cli.main([*common, "--output", str(tmp_path / "two.tsv"), "--workers", "2"]) == 0
  one = (tmp_path / "one.tsv").read_text()
  assert one == (tmp_path / "two.tsv").read_text() and len(one.splitlines()) == 1 + 37 * 10


def test_a_worker_that_cannot_map_the_index_fails_the_start(data):
  from adaptor.pool import SearchPool
  from adaptor.search import SearchArrays
  corpus, queries = data
  index = _index(corpus)
  shared = SharedArrays()
  vectors = shared.share(index.vectors)
  os.unlink(shared.spec(vectors)[0])   # Gone before the workers map it.
  arrays = SearchArrays(vectors, inv_norms={m: index.prefix_inv_norms(m) for m in index.dims})
  with pytest.raises(WorkerError, match=r"worker 0 \(pid \d+\) failed: FileNotFoundError"):
    SearchPool(arrays, 2, shared=shared)
  assert index.workers == 0 and index.search(queries, 3)[1].shape == (37, 3)
