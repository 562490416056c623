"""Tests for adaptor.data: every format round-trips and every bad input is named."""

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adaptor import data
from adaptor.data import InputError


def _vecs(n=4, d=3, dtype=np.float32):
  # Row i is [i+1, i+2, ...], so no row is zero and every value is exact.
  return (np.arange(n)[:, None] + np.arange(1, d + 1)[None, :]).astype(dtype)


def _write_parquet(path, x, *, fixed=False, ids=None, column="embedding"):
  flat = pa.array(np.asarray(x).reshape(-1))
  if fixed:
    col = pa.FixedSizeListArray.from_arrays(flat, x.shape[1])
  else:
    offsets = pa.array(np.arange(0, x.size + 1, x.shape[1], dtype=np.int32))
    col = pa.ListArray.from_arrays(offsets, flat)
  cols = {column: col}
  if ids is not None:
    cols["id"] = pa.array(ids)
  pq.write_table(pa.table(cols), path)


# ---------------------------------------------------------------------------
# check_embeddings


def test_check_embeddings_keeps_float32_and_float16():
  x = _vecs()
  assert data.check_embeddings(x) is x
  h = _vecs(dtype=np.float16)
  assert data.check_embeddings(h).dtype == np.float16
  out = data.check_embeddings(h, allow_float16=False)
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("dtype", [np.float64, np.int64, np.int8, np.uint16])
def test_check_embeddings_converts_to_float32(dtype):
  out = data.check_embeddings(_vecs(dtype=dtype))
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, _vecs())


def test_check_embeddings_accepts_lists():
  out = data.check_embeddings([[1, 2], [3, 4]])
  assert out.dtype == np.float32 and out.shape == (2, 2)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4)])
def test_check_embeddings_rejects_wrong_rank(shape):
  with pytest.raises(InputError, match=r"vecs must be 2-D.*" + re.escape(str(shape))):
    data.check_embeddings(np.ones(shape, np.float32), name="vecs")


@pytest.mark.parametrize("shape", [(0, 3), (3, 0)])
def test_check_embeddings_rejects_empty(shape):
  with pytest.raises(InputError, match=r"at least 1 row and 1 column.*" + str(shape[0])):
    data.check_embeddings(np.ones(shape, np.float32))


@pytest.mark.parametrize("x, dtype", [
    (np.ones((2, 2), bool), "bool"),
    (np.ones((2, 2), np.complex64), "complex64"),
    (np.array([["a", "b"]]), "<U1"),
    (np.array([[1, None]], dtype=object), "object"),
])
def test_check_embeddings_rejects_dtype(x, dtype):
  with pytest.raises(InputError, match=f"embeddings must have a real float.*dtype {dtype}"):
    data.check_embeddings(x)


def test_check_embeddings_rejects_nan_inf_zero_with_counts_and_rows():
  x = _vecs(n=10)
  x[2, 0] = x[2, 1] = np.nan
  x[7, 2] = np.nan
  x[5, 1] = -np.inf
  x[8] = 0.0
  x[9] = -0.0
  with pytest.raises(InputError) as e:
    data.check_embeddings(x, name="train.npy")
  msg = str(e.value)
  assert "train.npy" in msg
  assert "2 rows with NaN (3 NaN values) (first rows [2, 7])" in msg
  assert "1 row with Inf (1 Inf values) (first rows [5])" in msg
  assert "2 rows all zeros (first rows [8, 9])" in msg
  assert "out of 10 rows" in msg


def test_check_embeddings_float64_overflow_is_inf():
  x = _vecs(dtype=np.float64)
  x[1, 1] = 1e300
  with pytest.raises(InputError, match=r"1 row with Inf.*first rows \[1\]"):
    data.check_embeddings(x)


def test_scan_across_chunk_boundaries_lists_first_rows():
  x = _vecs(n=20)
  bad = [3, 4, 9, 12, 13, 17, 19]
  x[bad, 0] = np.nan
  want = "7 rows with NaN (7 NaN values) (first rows [3, 4, 9, 12, 13])"
  with pytest.raises(InputError, match=re.escape(want)):
    data._scan_rows(x, "x", chunk_rows=4)


def test_check_embeddings_dim():
  assert data.check_embeddings(_vecs(d=3), dim=3).shape == (4, 3)
  with pytest.raises(InputError, match=r"q must have d=5 columns, got shape \(4, 3\)"):
    data.check_embeddings(_vecs(d=3), dim=5, name="q")


def test_check_embeddings_memmap_stays_memmap(tmp_path):
  path = tmp_path / "m.dat"
  m = np.memmap(path, dtype=np.float32, mode="w+", shape=(6, 3))
  m[:] = _vecs(n=6)
  m.flush()
  ro = np.memmap(path, dtype=np.float32, mode="r", shape=(6, 3))
  out = data.check_embeddings(ro)
  assert isinstance(out, np.memmap)
  np.testing.assert_array_equal(out, _vecs(n=6))


# ---------------------------------------------------------------------------
# load_embeddings: formats


@pytest.mark.parametrize("mmap", [True, False])
def test_npy_round_trip(tmp_path, mmap):
  x = _vecs()
  np.save(tmp_path / "e.npy", x)
  emb = data.load_embeddings(tmp_path / "e.npy", mmap=mmap)
  assert isinstance(emb.vectors, np.memmap) == mmap
  np.testing.assert_array_equal(emb.vectors, x)
  assert emb.ids is None


def test_npy_float64_and_float16(tmp_path):
  np.save(tmp_path / "d.npy", _vecs(dtype=np.float64))
  np.save(tmp_path / "h.npy", _vecs(dtype=np.float16))
  assert data.load_embeddings(str(tmp_path / "d.npy")).vectors.dtype == np.float32
  h = data.load_embeddings(tmp_path / "h.npy").vectors
  assert h.dtype == np.float16 and isinstance(h, np.memmap)


def test_npz_round_trip(tmp_path):
  x = _vecs()
  np.savez(tmp_path / "one.npz", vecs=x)
  np.testing.assert_array_equal(data.load_embeddings(tmp_path / "one.npz").vectors, x)
  np.savez(tmp_path / "two.npz", a=x, b=2 * x)
  got = data.load_embeddings(tmp_path / "two.npz", column="b").vectors
  np.testing.assert_array_equal(got, 2 * x)


def test_npz_several_arrays_needs_column(tmp_path):
  path = tmp_path / "two.npz"
  np.savez(path, alpha=_vecs(), beta=_vecs())
  with pytest.raises(InputError, match=r"two\.npz holds 2 arrays \['alpha', 'beta'\].*column="):
    data.load_embeddings(path)
  with pytest.raises(InputError, match=r"two\.npz has no array 'gamma'.*\['alpha', 'beta'\]"):
    data.load_embeddings(path, column="gamma")


@pytest.mark.parametrize("fixed", [False, True])
def test_parquet_round_trip(tmp_path, fixed):
  x = _vecs()
  path = tmp_path / "e.parquet"
  _write_parquet(path, x, fixed=fixed, ids=["d0", "d1", "d2", "d3"])
  emb = data.load_embeddings(path, ids_column="id")
  np.testing.assert_array_equal(emb.vectors, x)
  assert emb.vectors.dtype == np.float32
  assert emb.ids == ["d0", "d1", "d2", "d3"]


def test_parquet_float64_and_int_ids(tmp_path):
  path = tmp_path / "e.parquet"
  _write_parquet(path, _vecs(dtype=np.float64), column="vec", ids=[10, 11, 12, 13])
  emb = data.load_embeddings(path, column="vec", ids_column="id")
  assert emb.vectors.dtype == np.float32
  assert emb.ids == ["10", "11", "12", "13"]


def test_parquet_missing_column(tmp_path):
  path = tmp_path / "e.parquet"
  _write_parquet(path, _vecs(), column="vec")
  with pytest.raises(InputError, match=r"e\.parquet has no column 'embedding'.*\['vec'\]"):
    data.load_embeddings(path)
  with pytest.raises(InputError, match=r"no column 'doc_id'.*\['vec'\]"):
    data.load_embeddings(path, column="vec", ids_column="doc_id")


def test_parquet_ragged_rows(tmp_path):
  path = tmp_path / "r.parquet"
  pq.write_table(pa.table({"embedding": [[1.0, 2.0], [3.0, 4.0], [5.0], [6.0, 7.0, 8.0]]}), path)
  with pytest.raises(InputError, match=r"r\.parquet.*row 0 has 2 values but row 2 has 1"):
    data.load_embeddings(path)


def test_parquet_null_row_and_null_value(tmp_path):
  path = tmp_path / "n.parquet"
  pq.write_table(pa.table({"embedding": [[1.0, 2.0], None, [5.0, 6.0]]}), path)
  with pytest.raises(InputError, match=r"n\.parquet must have no null rows, got 1 \(first at row 1"):
    data.load_embeddings(path)
  pq.write_table(pa.table({"embedding": [[1.0, 2.0], [None, 3.0]]}), path)
  with pytest.raises(InputError, match=r"n\.parquet must have no null values inside rows"):
    data.load_embeddings(path)


def test_parquet_wrong_column_type(tmp_path):
  path = tmp_path / "s.parquet"
  pq.write_table(pa.table({"embedding": ["a", "b"]}), path)
  with pytest.raises(InputError, match=r"must be list<float> or fixed_size_list<float>, got string"):
    data.load_embeddings(path)


def test_parquet_corrupt(tmp_path):
  path = tmp_path / "c.parquet"
  path.write_bytes(b"not a parquet file at all")
  with pytest.raises(InputError, match=r"c\.parquet is not a readable Parquet file"):
    data.load_embeddings(path)


def test_hf_dataset_on_disk_and_object(tmp_path):
  datasets = pytest.importorskip("datasets")
  x = _vecs()
  ds = datasets.Dataset.from_dict({"embedding": x.tolist(), "doc": ["a", "b", "c", "d"]})
  ds.save_to_disk(str(tmp_path / "ds"))
  emb = data.load_embeddings(tmp_path / "ds", ids_column="doc")
  np.testing.assert_array_equal(emb.vectors, x)
  assert emb.ids == ["a", "b", "c", "d"]
  # An object with an indices mapping (select) must come back in its logical order.
  emb = data.load_embeddings(ds.select([2, 0]), ids_column="doc")
  np.testing.assert_array_equal(emb.vectors, x[[2, 0]])
  assert emb.ids == ["c", "a"]


def test_hf_dataset_dict(tmp_path):
  datasets = pytest.importorskip("datasets")
  x = _vecs()
  one = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"v": x.tolist()})})
  np.testing.assert_array_equal(data.load_embeddings(one, column="v").vectors, x)
  two = datasets.DatasetDict({
      "train": datasets.Dataset.from_dict({"v": x.tolist()}),
      "test": datasets.Dataset.from_dict({"v": (2 * x).tolist()}),
  })
  two.save_to_disk(str(tmp_path / "dd"))
  with pytest.raises(InputError, match=r"DatasetDict with splits \['train', 'test'\]; pass split="):
    data.load_embeddings(tmp_path / "dd", column="v")
  got = data.load_embeddings(tmp_path / "dd", column="v", split="test").vectors
  np.testing.assert_array_equal(got, 2 * x)
  with pytest.raises(InputError, match=r"no column 'embedding'.*\['v'\]"):
    data.load_embeddings(two, split="train")


def test_directory_that_is_not_a_dataset(tmp_path):
  pytest.importorskip("datasets")
  (tmp_path / "plain").mkdir()
  with pytest.raises(InputError, match=r"plain must be a dataset written by"):
    data.load_embeddings(tmp_path / "plain")


def test_array_source_and_id_list():
  emb = data.load_embeddings(_vecs(n=3, dtype=np.int32), ids=["x", "y", 7])
  assert emb.vectors.dtype == np.float32
  assert emb.ids == ["x", "y", "7"]


def test_ids_sidecar(tmp_path):
  np.save(tmp_path / "e.npy", _vecs(n=3))
  (tmp_path / "ids.txt").write_text("a\nb  \nc\n\n")
  emb = data.load_embeddings(tmp_path / "e.npy", ids=tmp_path / "ids.txt")
  assert emb.ids == ["a", "b", "c"]


# ---------------------------------------------------------------------------
# load_embeddings: rejections


def test_missing_path(tmp_path):
  path = tmp_path / "nope.npy"
  with pytest.raises(InputError, match=f"{path} does not exist"):
    data.load_embeddings(path)


def test_unknown_suffix(tmp_path):
  path = tmp_path / "e.csv"
  path.write_text("1,2\n")
  with pytest.raises(InputError, match=r"e\.csv must be a \.npy, \.npz or \.parquet.*'\.csv'"):
    data.load_embeddings(path)


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("keep", ["body", "header", "empty"])
def test_truncated_npy(tmp_path, mmap, keep):
  path = tmp_path / "t.npy"
  np.save(path, _vecs(n=50, d=8))
  raw = path.read_bytes()
  path.write_bytes({"body": raw[:-10], "header": raw[:60], "empty": b""}[keep])
  with pytest.raises(InputError, match=f"{path} is not a readable .npy array"):
    data.load_embeddings(path, mmap=mmap)


def test_bad_data_in_file_names_the_path(tmp_path):
  x = _vecs()
  x[1, 1] = np.nan
  path = tmp_path / "nan.npy"
  np.save(path, x)
  with pytest.raises(InputError, match=f"{path} must have finite.*1 row with NaN"):
    data.load_embeddings(path)


def test_ids_count_mismatch(tmp_path):
  (tmp_path / "ids.txt").write_text("a\nb\n")
  want = r"ids file .*ids\.txt must have one id per row of embeddings \(3\), got 2 ids"
  with pytest.raises(InputError, match=want):
    data.load_embeddings(_vecs(n=3), ids=tmp_path / "ids.txt")


def test_duplicate_ids():
  with pytest.raises(InputError, match=r"duplicate id 'b' at positions 1 and 3"):
    data.load_embeddings(_vecs(n=4), ids=["a", "b", "c", "b"])


def test_empty_id():
  with pytest.raises(InputError, match=r"non-empty strings, got '' at position 2"):
    data.load_embeddings(_vecs(n=3), ids=["a", "b", ""])


def test_bad_id_type():
  with pytest.raises(InputError, match=r"ids\[1\] must be a str.*float"):
    data.load_embeddings(_vecs(n=2), ids=["a", 1.5])


def test_duplicate_ids_from_column(tmp_path):
  path = tmp_path / "e.parquet"
  _write_parquet(path, _vecs(n=3), ids=["a", "b", "a"])
  with pytest.raises(InputError, match=r"ids column 'id'.*duplicate id 'a' at positions 0 and 2"):
    data.load_embeddings(path, ids_column="id")


def test_ids_and_ids_column_together(tmp_path):
  with pytest.raises(InputError, match="ids or ids_column, not both"):
    data.load_embeddings(_vecs(), ids=["a"], ids_column="id")


def test_column_arguments_on_npy(tmp_path):
  np.save(tmp_path / "e.npy", _vecs())
  with pytest.raises(InputError, match=r"column applies to .*e\.npy"):
    data.load_embeddings(tmp_path / "e.npy", column="x")
  with pytest.raises(InputError, match=r"ids_column needs a Parquet file or dataset.*e\.npy"):
    data.load_embeddings(tmp_path / "e.npy", ids_column="id")


# ---------------------------------------------------------------------------
# load_ids


def test_load_ids(tmp_path):
  path = tmp_path / "ids.txt"
  path.write_text("q1\r\nq2 \nq3")
  assert data.load_ids(path) == ["q1", "q2", "q3"]


def test_load_ids_rejects_empty_file_and_blank_line(tmp_path):
  path = tmp_path / "ids.txt"
  path.write_text("\n")
  with pytest.raises(InputError, match=f"ids file {path} .*empty file"):
    data.load_ids(path)
  path.write_text("a\n\nb\n")
  with pytest.raises(InputError, match=r"line 2 is empty"):
    data.load_ids(path)
  with pytest.raises(InputError, match=r"missing\.txt does not exist"):
    data.load_ids(tmp_path / "missing.txt")


# ---------------------------------------------------------------------------
# Qrels


def test_qrels_beir_with_header(tmp_path):
  path = tmp_path / "q.tsv"
  path.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t2\nq2\td1\t0\n")
  assert data.load_qrels(path) == {"q1": {"d1": 1, "d2": 2}, "q2": {"d1": 0}}


def test_qrels_beir_without_header(tmp_path):
  path = tmp_path / "q.tsv"
  path.write_text("1\t31715818\t1\n3\t14717500\t1\n\n")
  assert data.load_qrels(path) == {"1": {"31715818": 1}, "3": {"14717500": 1}}


def test_qrels_trec_graded(tmp_path):
  path = tmp_path / "q.txt"
  path.write_text("q1 0 d1 3\nq1 0 d2 0\nq2  0  d9  4\n")
  assert data.load_qrels(path) == {"q1": {"d1": 3, "d2": 0}, "q2": {"d9": 4}}


@pytest.mark.parametrize("body, line, what", [
    ("q-id\tc-id\tscore\nq1\td1\t1\nq1\td2\thigh\n", 3, "score must be an integer, got 'high'"),
    ("q1\td1\t1\nq1\td2\n", 2, "expected 3 fields"),
    ("q1\td1\t1\nq1 0 d2 1\n", 2, "expected 3 fields like the lines before, got 4"),
    ("q1\td1\t1\nq1\td2\t1.5\n", 2, "score must be an integer, got '1.5'"),
    ("q1\td1\t1\nq1\td1\t2\n", 2, "judged again with 2, earlier with 1"),
])
def test_qrels_malformed(tmp_path, body, line, what):
  path = tmp_path / "bad.tsv"
  path.write_text(body)
  with pytest.raises(InputError) as e:
    data.load_qrels(path)
  assert f"{path}:{line}:" in str(e.value)
  assert what in str(e.value)


@pytest.mark.parametrize("body", ["", "query-id\tcorpus-id\tscore\n"])
def test_qrels_empty(tmp_path, body):
  path = tmp_path / "e.tsv"
  path.write_text(body)
  with pytest.raises(InputError, match=f"qrels file {path} must hold at least one judgement"):
    data.load_qrels(path)


def test_check_qrels():
  qrels = {"q1": {"d1": 1}, "q2": {"d2": 1, "d3": 1}, "q3": {"d3": 0}}
  data.check_qrels(qrels, query_ids=["q1", "q2", "q3"], doc_ids=["d1", "d2", "d3"])
  want = "test has 2 query ids not in the query ids (first: ['q2', 'q3'])"
  with pytest.raises(InputError, match=re.escape(want)):
    data.check_qrels(qrels, query_ids=["q1"], doc_ids=["d1", "d2", "d3"], name="test")
  want = "qrels has 1 document ids not in the corpus ids (first: ['d3'])"
  with pytest.raises(InputError, match=re.escape(want)):
    data.check_qrels(qrels, query_ids=["q1", "q2", "q3"], doc_ids=["d1", "d2"])


# ---------------------------------------------------------------------------
# load_beir


def _make_beir(root, model="tiny", d=3):
  emb = root / "embeddings" / model
  emb.mkdir(parents=True)
  np.save(emb / "corpus.npy", _vecs(n=5, d=d))
  (emb / "corpus_ids.txt").write_text("".join(f"d{i}\n" for i in range(5)))
  np.save(emb / "queries.npy", _vecs(n=4, d=d) * 10)
  (emb / "query_ids.txt").write_text("q0\nq1\nq2\nq3\n")
  (root / "qrels").mkdir()
  (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq2\td1\t1\nq0\td0\t2\n")
  (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq3\td4\t1\n")
  return root


def test_load_beir(tmp_path):
  rd = data.load_beir(_make_beir(tmp_path), "tiny")
  assert rd.corpus.ids == [f"d{i}" for i in range(5)]
  assert rd.queries.vectors.shape == (4, 3)
  assert sorted(rd.qrels) == ["test", "train"]
  vecs, ids, qrels = rd.split_queries("train")
  assert ids == ["q0", "q2"]  # query_ids order, not qrels order
  np.testing.assert_array_equal(vecs, _vecs(n=4)[[0, 2]] * 10)
  assert qrels == {"q2": {"d1": 1}, "q0": {"d0": 2}}
  with pytest.raises(InputError, match=r"split must be one of \['test', 'train'\], got 'dev'"):
    rd.split_queries("dev")


def test_load_beir_rejections(tmp_path):
  root = _make_beir(tmp_path)
  want = "embeddings/other does not exist; available models: ['tiny']"
  with pytest.raises(InputError, match=re.escape(want)):
    data.load_beir(root, "other")
  (root / "qrels" / "test.tsv").write_text("q3\td9\t1\n")
  want = "test.tsv has 1 document ids not in the corpus ids (first: ['d9'])"
  with pytest.raises(InputError, match=re.escape(want)):
    data.load_beir(root, "tiny")
  np.save(root / "embeddings" / "tiny" / "queries.npy", _vecs(n=4, d=2))
  with pytest.raises(InputError, match=r"queries must have the corpus width d=3, got d=2"):
    data.load_beir(root, "tiny")


def test_load_beir_needs_qrels(tmp_path):
  root = _make_beir(tmp_path)
  for p in (root / "qrels").iterdir():
    p.unlink()
  with pytest.raises(InputError, match=r"qrels must hold at least one of"):
    data.load_beir(root, "tiny")


# ---------------------------------------------------------------------------
# fingerprint


def test_fingerprint_stable_and_sensitive(tmp_path):
  x = _vecs(n=6)
  fp = data.fingerprint(x)
  assert len(fp) == 16 and int(fp, 16) >= 0
  assert data.fingerprint(x.copy()) == fp
  np.save(tmp_path / "x.npy", x)
  assert data.fingerprint(np.load(tmp_path / "x.npy", mmap_mode="r")) == fp
  y = x.copy()
  y[5, 2] += 1
  assert data.fingerprint(y) != fp
  assert data.fingerprint(x.astype(np.float16)) != fp
  assert data.fingerprint(x.reshape(2, 9)) != fp
  # Non-contiguous views hash their values, not their memory layout.
  assert data.fingerprint(np.asfortranarray(x)) == fp


def test_fingerprint_is_chunk_independent(monkeypatch):
  x = _vecs(n=10)
  fp = data.fingerprint(x)
  monkeypatch.setattr(data, "_CHUNK_ROWS", 3)
  assert data.fingerprint(x) == fp
