"""Qdrant (local mode): funnel agreement with the library on SciFact, resumable upload, CLI."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flax import nnx

pytest.importorskip("qdrant_client")

import adaptor
from adaptor import cli, qdrant
from adaptor.model import MatryoshkaAdaptor, init_reorder_from_pca
from conftest import REPO, reap, subprocess_env

SCHEDULE = "32:500,128:50,384:10"
DIMS = (32, 128, 384)


@pytest.fixture(scope="module")
def scifact():
  """SciFact (shipped) with a PCA-initialised adaptor and the library's index of the corpus."""
  data = adaptor.load_beir(REPO / "data" / "scifact", "all-MiniLM-L6-v2")
  queries, query_ids, qrels = data.split_queries("test")
  module = MatryoshkaAdaptor(384, hidden=0, rngs=nnx.Rngs(0))
  init_reorder_from_pca(module, data.corpus.vectors)
  model = adaptor.Adaptor(module)
  index = adaptor.MatryoshkaIndex.build(data.corpus.vectors, ids=data.corpus.ids, adaptor=model)
  return index, np.asarray(queries), query_ids, qrels


@pytest.fixture(scope="module")
def client(scifact):
  """An in-memory local-mode client holding the whole SciFact corpus."""
  from qdrant_client import QdrantClient
  index = scifact[0]
  c = QdrantClient(location=":memory:")
  assert qdrant.create_collection("scifact", DIMS, client=c)
  stats = qdrant.upload("scifact", index.vectors, ids=index.ids, batch_size=1024, client=c)
  assert stats["uploaded"] == index.n and stats["skipped"] == 0
  yield c
  c.close()


def _run(query_ids, ids, scores):
  return {q: {str(d): float(s) for d, s in zip(row, srow)} for q, row, srow in zip(query_ids, ids, scores)}


@pytest.mark.slow
def test_funnel_in_qdrant_matches_the_library(scifact, client):
  index, queries, query_ids, qrels = scifact
  # Every 10th test query (30): local mode re-scores a prefetch by filtering every point in
  # Python (0.3 s per query here). experiments/bench_serving.py checks all 300.
  queries, query_ids = queries[::10], query_ids[::10]
  qrels = {q: qrels[q] for q in query_ids}
  adapted = index.prepare_queries(queries)
  stages = qdrant.parse_schedule(SCHEDULE, DIMS)
  ref_scores, ref_ids = index.search(queries, 10, schedule=stages)
  scores, ids = qdrant.search("scifact", adapted, SCHEDULE, client=client)
  assert ids.shape == ref_ids.shape == (len(query_ids), 10)
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref_ids)])
  assert recall >= 0.99, recall
  np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
  ours = adaptor.evaluate(_run(query_ids, ids, scores), qrels, k_values=(10,))
  theirs = adaptor.evaluate(_run(query_ids, ref_ids, ref_scores), qrels, k_values=(10,))
  assert abs(ours["ndcg@10"] - theirs["ndcg@10"]) <= 1e-4, (ours, theirs)
  # Raw embeddings with the adaptor (the portable one works the same way) give the same.
  _, raw_ids = qdrant.search("scifact", queries[:20], SCHEDULE, adaptor=index.adaptor, client=client)
  np.testing.assert_array_equal(raw_ids, ids[:20])


def test_one_stage_schedule_is_exact_search(scifact, client):
  index, queries, _, _ = scifact
  adapted = index.prepare_queries(queries[:30])
  ref_scores, ref_ids = index.search(adapted, 5, dim=128, adapted=True)
  scores, ids = qdrant.search("scifact", adapted, [(128, 5)], client=client)
  assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ids, ref_ids)]) >= 0.99
  np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_bad_schedules_and_collections_are_refused(scifact, client):
  q = scifact[0].prepare_queries(scifact[1][:2])
  with pytest.raises(adaptor.InputError, match=r"prefix sizes of the collection \[32, 128, 384\], got \[64\]"):
    qdrant.search("scifact", q, "64:100,384:10", client=client)
  with pytest.raises(adaptor.InputError, match="expected DIM:KEEP"):
    qdrant.search("scifact", q, "32-500", client=client)
  with pytest.raises(adaptor.InputError, match="quantisation is a property"):
    qdrant.search("scifact", q, "32:500:binary,384:10", client=client)
  with pytest.raises(adaptor.InputError, match="keeps must not increase"):
    qdrant.search("scifact", q, "32:10,384:50", client=client)
  with pytest.raises(adaptor.InputError, match="last keep must be >= k=20"):
    qdrant.search("scifact", q, SCHEDULE, k=20, client=client)
  with pytest.raises(adaptor.InputError, match="exists with prefix sizes"):
    qdrant.create_collection("scifact", (32, 384), client=client)
  assert not qdrant.create_collection("scifact", DIMS, client=client)  # Same: kept.
  with pytest.raises(adaptor.InputError, match="'nope' must exist"):
    qdrant.search("nope", q, SCHEDULE, client=client)
  with pytest.raises(adaptor.InputError, match="exactly one of path="):
    qdrant.search("scifact", q, SCHEDULE)


def test_quantization_and_hnsw_are_set_per_prefix():
  from qdrant_client import QdrantClient, models
  c = QdrantClient(location=":memory:")
  try:
    qdrant.create_collection("c", (32, 128, 384), quantization={32: "binary", 128: "int8"},
                             hnsw_dims=(32,), client=c)
    vectors = c.get_collection("c").config.params.vectors
    assert isinstance(vectors["m32"].quantization_config, models.BinaryQuantization)
    assert isinstance(vectors["m128"].quantization_config, models.ScalarQuantization)
    assert vectors["m384"].quantization_config is None
    assert vectors["m32"].hnsw_config is None and vectors["m384"].hnsw_config.m == 0
    with pytest.raises(adaptor.InputError, match="quantization must map"):
      qdrant.create_collection("d", (32,), quantization={64: "int8"}, client=c)
  finally:
    c.close()


_KILLED_UPLOAD = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from qdrant_client import QdrantClient
    from adaptor import qdrant
    path, vectors, kill_batch, kill_row = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    x = np.load(vectors)
    client = QdrantClient(path=path)
    real_upsert, calls = client.upsert, [0]

    def upsert(collection, points, wait=True):
      # Batch `kill_batch` writes its first `kill_row` points, then the process is SIGKILLed.
      if calls[0] == kill_batch:
        part = type(points)(ids=points.ids[:kill_row],
                            vectors={k: v[:kill_row] for k, v in points.vectors.items()},
                            payloads=points.payloads[:kill_row])
        if kill_row:
          real_upsert(collection, part, wait=wait)
        os.kill(os.getpid(), signal.SIGKILL)
      calls[0] += 1
      return real_upsert(collection, points, wait=wait)

    client.upsert = upsert
    qdrant.create_collection("c", (32, 128, 384), client=client)
    qdrant.upload("c", x, ids=[f"doc{i}" for i in range(len(x))], batch_size=16, client=client)
""")


def _all_points(client, n):
  points = client.retrieve("c", [qdrant.point_id(f"doc{i}") for i in range(n)], with_vectors=True)
  return {p.payload["doc_id"]: p.vector for p in points}


N_KILL = 120  # Local mode commits each point on its own (~60 points/s here): keep it small.


@pytest.fixture(scope="module")
def kill_data(tmp_path_factory, scifact):
  """(vectors file, the points of an uninterrupted upload to disk) for the SIGKILL tests."""
  from qdrant_client import QdrantClient
  folder = tmp_path_factory.mktemp("kill")
  x = np.asarray(scifact[0].vectors[:N_KILL])
  np.save(folder / "x.npy", x)
  # On disk too: local mode keeps float32 vectors in memory, but float64 once reloaded.
  clean = QdrantClient(path=str(folder / "clean"))
  qdrant.create_collection("c", DIMS, client=clean)
  qdrant.upload("c", x, ids=[f"doc{i}" for i in range(N_KILL)], client=clean)
  clean.close()
  clean = QdrantClient(path=str(folder / "clean"))
  want = _all_points(clean, N_KILL)
  clean.close()
  return folder / "x.npy", want


def _rerun_and_compare(path, x_file, want, note):
  """Reruns the upload into `path`; it must end with the uninterrupted upload's points."""
  from qdrant_client import QdrantClient
  c = QdrantClient(path=str(path))
  before = c.count("c", exact=True).count
  c.close()
  x = np.load(x_file)
  stats = qdrant.upload("c", x, ids=[f"doc{i}" for i in range(N_KILL)], batch_size=16, path=path)
  assert (stats["skipped"], stats["uploaded"]) == (before, N_KILL - before), note
  c = QdrantClient(path=str(path))
  assert c.count("c", exact=True).count == N_KILL, note
  got = _all_points(c, N_KILL)
  c.close()
  assert got.keys() == want.keys(), note
  for doc, vecs in want.items():
    for name, v in vecs.items():
      np.testing.assert_array_equal(got[doc][name], v, err_msg=f"{note}: {doc} {name}")
  # A third run has nothing left to do.
  assert qdrant.upload("c", x, ids=[f"doc{i}" for i in range(N_KILL)], path=path)["uploaded"] == 0
  return before


@pytest.mark.slow
def test_upload_killed_mid_batch_then_rerun_gives_the_same_collection(tmp_path, kill_data, xla_cache):
  x_file, want = kill_data
  seed = int(os.environ.get("QDRANT_KILL_SEED", "0"))  # Try other moments by setting it.
  rng = np.random.default_rng(seed)
  kill_batch, kill_row = int(rng.integers(0, N_KILL // 16)), int(rng.integers(0, 16))
  note = (f"seed {seed} (rerun with QDRANT_KILL_SEED={seed}): SIGKILL in batch {kill_batch} "
          f"after row {kill_row}")
  path = tmp_path / "qdrant"
  proc = subprocess.run([sys.executable, "-c", _KILLED_UPLOAD, str(path), str(x_file),
                         str(kill_batch), str(kill_row)], env=subprocess_env(xla_cache),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == -signal.SIGKILL, (note, proc.stderr[-2000:])
  assert _rerun_and_compare(path, x_file, want, note) == 16 * kill_batch + kill_row, note


_UPLOAD = textwrap.dedent("""
    import sys
    import numpy as np
    from adaptor import qdrant
    path, vectors = sys.argv[1], sys.argv[2]
    x = np.load(vectors)
    qdrant.create_collection("c", (32, 128, 384), path=path)
    qdrant.upload("c", x, ids=[f"doc{i}" for i in range(len(x))], batch_size=16, quiet=False,
                  path=path)
""")


@pytest.mark.slow
def test_upload_killed_from_outside_then_rerun_gives_the_same_collection(tmp_path, kill_data,
                                                                         xla_cache):
  """The parent SIGKILLs the uploader once it reports a seeded number of batches (wherever it is then)."""
  x_file, want = kill_data
  seed = int(os.environ.get("QDRANT_KILL_SEED", "0"))
  after = int(np.random.default_rng(seed).integers(1, N_KILL // 16))
  note = f"seed {seed} (rerun with QDRANT_KILL_SEED={seed}): SIGKILL after {after} batches reported"
  path = tmp_path / "qdrant"
  log = open(tmp_path / "stderr.txt", "w")
  proc = subprocess.Popen([sys.executable, "-c", _UPLOAD, str(path), str(x_file)],
                          env=subprocess_env(xla_cache), stdout=subprocess.PIPE, stderr=log,
                          text=True)
  try:
    reported = 0
    for line in proc.stdout:
      reported += line.startswith("upload c:")
      if reported == after:
        proc.kill()
        break
    proc.wait(timeout=120)
  finally:
    reap(proc, log)
  # The kill follows the progress line at once, and at least 2 batches (32 points, each its own
  # SQLite commit) are left then: the child cannot have finished.
  assert reported == after and proc.returncode == -signal.SIGKILL, (
      note, (tmp_path / "stderr.txt").read_text()[-2000:])
  before = _rerun_and_compare(path, x_file, want, note)
  assert 16 * after <= before <= N_KILL, (note, before)


def test_cli_upload_from_apply_shards_and_search(tmp_path, capsys, scifact):
  index = scifact[0]
  index.adaptor.save(tmp_path / "ck")
  corpus = np.asarray(adaptor.load_beir(REPO / "data" / "scifact", "all-MiniLM-L6-v2").corpus.vectors[:200])
  np.save(tmp_path / "corpus.npy", corpus)
  (tmp_path / "corpus.ids.txt").write_text("".join(f"{v}\n" for v in index.ids[:200]))
  adaptor.apply_files(index.adaptor, str(tmp_path / "corpus.npy"), tmp_path / "adapted", quiet=True)
  where = ["--path", str(tmp_path / "qdrant"), "--collection", "c"]
  assert cli.main(["qdrant", "upload", *where, "--shards", str(tmp_path / "adapted"),
                   "--dims", "32,384", "--quiet"]) == 0
  assert "200 points: 200 uploaded, 0 already there" in capsys.readouterr().out
  # The same shards again: everything is there already.
  stats = qdrant.upload_shards("c", tmp_path / "adapted", path=tmp_path / "qdrant")
  assert (stats["uploaded"], stats["skipped"]) == (0, 200)
  queries = scifact[1][:3]
  np.save(tmp_path / "q.npy", queries)
  assert cli.main(["qdrant", "search", *where, "--queries", str(tmp_path / "q.npy"),
                   "--checkpoint", str(tmp_path / "ck"), "--schedule", "32:50,384:5", "--k", "5",
                   "--output", str(tmp_path / "run.tsv")]) == 0
  lines = (tmp_path / "run.tsv").read_text().splitlines()
  assert len(lines) == 1 + 3 * 5
  small = adaptor.MatryoshkaIndex.build(corpus, ids=index.ids[:200], adaptor=index.adaptor)
  _, ref = small.search(queries, 5, schedule=[(32, 50), (384, 5)])
  assert [line.split("\t")[1] for line in lines[1:6]] == list(ref[0])
  assert cli.main(["qdrant", "search", *where, "--queries", str(tmp_path / "q.npy"),
                   "--schedule", "64:50,384:5"]) == 2
  assert "prefix sizes of the collection [32, 384], got [64]" in capsys.readouterr().err
