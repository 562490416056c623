"""MatryoshkaIndex: build, search (exact and funnel), add, save/load, CLI handlers."""

import os
from pathlib import Path

import numpy as np
import pytest

import adaptor
from adaptor import index as index_lib
from adaptor.index import MatryoshkaIndex
from adaptor.model import MatryoshkaAdaptor
from adaptor.search import exact_search as search

DATA = Path(__file__).resolve().parents[1] / "data" / "scifact"
EMB = DATA / "embeddings" / "all-MiniLM-L6-v2"


def _unit(x):
  x = np.asarray(x, np.float64)
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _brute_rows(queries, corpus, k, dim):
  q, c = _unit(queries[:, :dim]), _unit(corpus[:, :dim])
  return np.argsort(-(q.astype(np.float64) @ c.T.astype(np.float64)), axis=1, kind="stable")[:, :k]


@pytest.fixture(scope="module")
def small_adaptor():
  from flax import nnx
  module = MatryoshkaAdaptor(12, d_out=12, hidden=0, reorder=True, rngs=nnx.Rngs(0))
  return adaptor.Adaptor(module)


def test_build_and_search_exact_matches_brute_force():
  rng = np.random.default_rng(0)
  corpus = rng.normal(size=(300, 16)).astype(np.float32)
  queries = rng.normal(size=(4, 16)).astype(np.float32)
  ids = [f"d{i}" for i in range(300)]
  index = MatryoshkaIndex.build(corpus, ids=ids, dims=(4,))
  for dim in (4, 8, None):
    scores, found = index.search(queries, 5, dim=dim)
    ref = _brute_rows(queries, corpus, 5, dim or 16)
    assert found.shape == scores.shape == (4, 5)
    assert [[int(v[1:]) for v in row] for row in found] == ref.tolist()
  assert set(index.dims) == {4, 8, 16}          # 8 was computed on first use and kept


def test_adaptor_applied_to_documents_and_queries(small_adaptor):
  rng = np.random.default_rng(1)
  corpus = rng.normal(size=(120, 12)).astype(np.float32)
  queries = rng.normal(size=(3, 12)).astype(np.float32)
  index = MatryoshkaIndex.build(corpus, adaptor=small_adaptor)
  np.testing.assert_allclose(index.vectors, small_adaptor.apply(corpus), atol=1e-6)
  scores, rows = index.search_rows(queries, 4, dim=6)
  ref_s, ref_i = search(small_adaptor.apply(queries), small_adaptor.apply(corpus), 4, dim=6)
  np.testing.assert_array_equal(rows, ref_i)
  np.testing.assert_allclose(scores, ref_s, atol=1e-6)


def test_funnel_through_index_and_add():
  rng = np.random.default_rng(2)
  corpus = rng.normal(size=(200, 16)).astype(np.float32)
  more = rng.normal(size=(50, 16)).astype(np.float32)
  index = MatryoshkaIndex.build(corpus, precision="float16")
  index.add(more)
  assert index.ids[-1] == "249" and index.vectors.dtype == np.float16
  whole = MatryoshkaIndex.build(np.concatenate([corpus, more]), precision="float16")
  np.testing.assert_array_equal(index.vectors, whole.vectors)
  for m in whole.dims:
    np.testing.assert_array_equal(index.prefix_inv_norms(m), whole.prefix_inv_norms(m))
  q = rng.normal(size=(3, 16)).astype(np.float32)
  _, a = index.search(q, 5, schedule=[(4, 60), (16, 5)])
  _, b = whole.search(q, 5, schedule=[(4, 60), (16, 5)])
  np.testing.assert_array_equal(a, b)
  with pytest.raises(adaptor.InputError, match="already in the index"):
    index.add(more[:2], ids=["3", "new"])


def test_first_stage_copy_is_kept_and_renewed_by_add():
  rng = np.random.default_rng(6)
  corpus = rng.normal(size=(300, 16)).astype(np.float32)
  index = MatryoshkaIndex.build(corpus)
  q = rng.normal(size=(4, 16)).astype(np.float32)
  index.prefix_inv_norms(4)
  before = index.nbytes
  _, rows = index.search_rows(q, 5, schedule=[(4, 40), (16, 5)])
  assert index.nbytes == before + 300 * 4 * 4     # the kept float32 [n, 4] copy
  # Documents equal to the queries must come first once added: a stale copy
  # of the first stage would not see them.
  index.add(q, ids=[f"q{i}" for i in range(4)])
  scores, rows = index.search_rows(q, 5, schedule=[(4, 40), (16, 5)])
  np.testing.assert_array_equal(rows[:, 0], 300 + np.arange(4))
  np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-6)
  whole = MatryoshkaIndex.build(np.concatenate([corpus, q]))
  np.testing.assert_array_equal(rows, whole.search_rows(q, 5, schedule=[(4, 40), (16, 5)])[1])


def test_save_load_round_trip_exactly(tmp_path, small_adaptor):
  rng = np.random.default_rng(3)
  corpus = rng.normal(size=(90, 12)).astype(np.float32)
  for precision in ("float32", "float16"):
    index = MatryoshkaIndex.build(corpus, ids=[f"x{i}" for i in range(90)],
                                  adaptor=small_adaptor, precision=precision)
    index.save(tmp_path / precision)
    back = MatryoshkaIndex.load(tmp_path / precision)
    assert back.vectors.dtype == index.vectors.dtype and back.vectors.ctypes.data % 4096 == 0
    np.testing.assert_array_equal(back.vectors, index.vectors)
    assert back.ids == index.ids and back.dims == index.dims
    for m in index.dims:
      np.testing.assert_array_equal(back.prefix_inv_norms(m), index.prefix_inv_norms(m))
    q = rng.normal(size=(2, 12)).astype(np.float32)
    for a, b in zip(index.search(q, 3, dim=4), back.search(q, 3, dim=4)):
      np.testing.assert_array_equal(a, b)


def test_crash_mid_save_leaves_old_index(tmp_path, monkeypatch):
  corpus = np.random.default_rng(4).normal(size=(30, 8)).astype(np.float32)
  MatryoshkaIndex.build(corpus).save(tmp_path / "ix")
  bigger = MatryoshkaIndex.build(np.concatenate([corpus, corpus + 1]))

  def boom(*a, **kw):
    raise KeyboardInterrupt("crash")
  monkeypatch.setattr(index_lib.checkpoint, "fsync_tree", boom)
  with pytest.raises(KeyboardInterrupt):
    bigger.save(tmp_path / "ix", overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["ix"]           # No temporary left behind.
  assert MatryoshkaIndex.load(tmp_path / "ix").n == 30


def test_clear_errors(tmp_path, small_adaptor):
  rng = np.random.default_rng(5)
  corpus = rng.normal(size=(40, 12)).astype(np.float32)
  index = MatryoshkaIndex.build(corpus, adaptor=small_adaptor)
  with pytest.raises(adaptor.InputError, match=r"query_embeddings must have d=12 columns, got shape \(2, 8\)"):
    index.search(np.ones((2, 8), np.float32), 3)
  bad = np.ones((2, 12), np.float32)
  bad[1, 3] = np.nan
  with pytest.raises(adaptor.InputError, match="NaN"):
    index.search(bad, 3)
  with pytest.raises(adaptor.InputError, match=r"corpus_embeddings must have d=12 columns"):
    MatryoshkaIndex.build(np.ones((5, 7), np.float32), adaptor=small_adaptor)
  with pytest.raises(ValueError, match=r"k must be an int in \[1, 40\]"):
    index.search(corpus[:1], 41)
  with pytest.raises(ValueError, match="dim must be in"):
    index.search(corpus[:1], 3, dim=13)
  with pytest.raises(adaptor.InputError, match=r"unknown ids \(first \['nope'\]\)"):
    index.get_vectors(["0", "nope"])
  np.testing.assert_allclose(np.linalg.norm(index.get_vectors(["3"], dim=5), axis=1), 1, rtol=1e-6)
  with pytest.raises(adaptor.InputError, match="precision must be one of"):
    MatryoshkaIndex.build(corpus, precision="int8")
  index.save(tmp_path / "ix")
  from flax import nnx
  other = adaptor.Adaptor(MatryoshkaAdaptor(12, d_out=12, hidden=4, reorder=True, rngs=nnx.Rngs(1)))
  with pytest.raises(adaptor.InputError, match="adaptor mismatch"):
    MatryoshkaIndex.load(tmp_path / "ix", adaptor=other)
  with pytest.raises(adaptor.InputError, match="COMPLETE marker"):
    MatryoshkaIndex.load(tmp_path / "nothing")
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "file").write_text("x")
  with pytest.raises(adaptor.InputError, match="refusing to replace"):
    index.save(tmp_path / "junk", overwrite=True)


# ---------------------------------------------------------------- CLI


def _cli(argv) -> int:
  """The `index` commands through the real entry point (exit status, as a shell sees it)."""
  from adaptor import cli
  return cli.main(argv)


@pytest.mark.slow
def test_cli_build_search_on_shipped_data(tmp_path):
  out = tmp_path / "ix"
  assert _cli(["index", "build", "--corpus", str(EMB / "corpus.npy"), "--corpus-ids",
               str(EMB / "corpus_ids.txt"), "--precision", "float16", "--out", str(out)]) == 0
  run = tmp_path / "run.tsv"
  queries = ["--queries", str(EMB / "queries.npy"), "--query-ids", str(EMB / "query_ids.txt")]
  assert _cli(["index", "search", "--index", str(out), *queries, "--k", "3",
               "--schedule", "32:200,384:3", "--output", str(run)]) == 0
  lines = run.read_text().splitlines()
  assert len(lines) == 1 + 1109 * 3 and lines[1].split("\t")[2] == "1"
  corpus = np.load(EMB / "corpus.npy")
  ids = (EMB / "corpus_ids.txt").read_text().split()
  q = np.load(EMB / "queries.npy")[:1]
  top = _brute_rows(q.astype(np.float32), corpus.astype(np.float16).astype(np.float32), 1, 384)
  assert lines[1].split("\t")[1] == ids[top[0, 0]]


def test_cli_bad_input_exits_2(tmp_path, capsys):
  assert _cli(["index", "search", "--index", str(tmp_path / "none"), "--queries",
               str(EMB / "queries.npy")]) == 2
  assert "COMPLETE marker" in capsys.readouterr().err
  ok = tmp_path / "ix"
  assert _cli(["index", "build", "--corpus", str(EMB / "corpus.npy"), "--out", str(ok)]) == 0
  bad = tmp_path / "q.npy"
  np.save(bad, np.ones((2, 5), np.float32))
  assert _cli(["index", "search", "--index", str(ok), "--queries", str(bad)]) == 2
  assert "must have d=384 columns" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    _cli(["index", "search", "--index", str(ok), "--queries", str(bad), "--schedule", "32-100"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_to_faiss_returns_the_library_funnel_on_scifact(kind):
  faiss = pytest.importorskip("faiss")
  from flax import nnx
  from adaptor.model import init_reorder_from_pca
  data = adaptor.load_beir(DATA, "all-MiniLM-L6-v2")
  queries, _, _ = data.split_queries("test")
  module = MatryoshkaAdaptor(384, hidden=0, rngs=nnx.Rngs(0))
  init_reorder_from_pca(module, data.corpus.vectors)
  index = MatryoshkaIndex.build(data.corpus.vectors, ids=data.corpus.ids,
                                adaptor=adaptor.Adaptor(module))
  q = index.prepare_queries(queries)
  # Refined: [(32, 10 * 10), (384, 10)]; efSearch 400 >> 100 makes HNSW exact on 5183 docs.
  fi = index.to_faiss(32, kind=kind, ef_search=400, k_factor=10)
  assert isinstance(fi, faiss.IndexRefineFlat) and fi.ntotal == index.n
  scores, rows = fi.search(q, 10)
  ref_scores, ref_rows = index.search_rows(q, 10, schedule=[(32, 100), (384, 10)], adapted=True)
  assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, ref_rows)]) >= 0.999
  np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
  # Without refine: cosine at the 32-prefix, as exact search at dim=32.
  scores, rows = index.to_faiss(32, kind=kind, refine=False, ef_search=400).search(q, 10)
  ref_scores, ref_rows = index.search_rows(q, 10, dim=32, adapted=True)
  assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, ref_rows)]) >= 0.999
  np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
  with pytest.raises(adaptor.InputError, match="kind must be 'hnsw' or 'flat', got 'ivf'"):
    index.to_faiss(32, kind="ivf")
