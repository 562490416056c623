"""Quantised stores and scoring: exact against numpy references, top-k against brute force."""

import json
import re

import jax
import numpy as np
import pytest

import adaptor
from adaptor import quant
from adaptor.index import MatryoshkaIndex
from adaptor.data import InputError
from adaptor.quant import parse_stores
from adaptor.search import Stage, format_schedule, parse_schedule
from adaptor.truncation import truncate


def _unit(x):
  x = np.asarray(x, np.float64)
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _np_hamming(q_bits, doc_bits):
  """numpy reference: popcount of XOR via unpackbits, int64 [n_q, n_docs]."""
  x = np.bitwise_xor(q_bits[:, None, :], doc_bits[None, :, : q_bits.shape[1]])
  return np.unpackbits(x, axis=2).sum(axis=2).astype(np.int64)


def _order(keys, k):
  """Rows sorted by keys ascending, ties to the lower index: [n_q, k]."""
  idx = np.broadcast_to(np.arange(keys.shape[1]), keys.shape)
  return np.lexsort((idx, keys), axis=1)[:, :k]


def _assert_top_k_up_to_ties(scores, rows, ref_scores, k, tol=1e-5):
  """The returned rows are a top-k of ref_scores [n_q, n] (ties anywhere are tolerated)."""
  rows, scores = np.asarray(rows), np.asarray(scores)
  best = -np.sort(-ref_scores, axis=1)[:, :k]
  np.testing.assert_allclose(scores, best, atol=tol)
  np.testing.assert_allclose(np.take_along_axis(ref_scores, rows, 1), scores, atol=tol)
  assert all(len(set(r)) == k for r in rows.tolist())


# ---------------------------------------------------------------- binary


@pytest.mark.parametrize("m", [8, 13, 64])
def test_pack_unpack_round_trip_and_numpy_layout(m):
  x = np.random.default_rng(0).normal(size=(7, m)).astype(np.float32)
  x[0, :3] = 0.0  # Zero is not positive: bit 0.
  for fn in (quant.pack_bits, jax.jit(quant.pack_bits)):
    packed = np.asarray(fn(x))
    np.testing.assert_array_equal(packed, np.packbits(x > 0, axis=1))


def test_hamming_distances_exact_on_a_prefix():
  rng = np.random.default_rng(1)
  q = rng.integers(0, 256, (5, 40), dtype=np.uint8)       # 40 bytes: two uint8 chunks
  docs = rng.integers(0, 256, (33, 48), dtype=np.uint8)   # longer rows: a prefix is compared
  plain = quant.hamming_top_k
  for fn in (plain, jax.jit(plain, static_argnames=("k", "block_size"))):
    for queries in (q, q[:, :2]):
      h, rows = (np.asarray(a) for a in fn(queries, docs, 33, block_size=33))   # every document
      assert h.dtype == np.int32
      assert all(sorted(r) == list(range(33)) for r in rows.tolist())
      np.testing.assert_array_equal(h, np.take_along_axis(_np_hamming(queries, docs), rows, 1))


@pytest.mark.parametrize("n,block", [(300, 64), (300, 100), (300, 300), (20, 7), (97, 32)])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_hamming_top_k_equals_brute_force_with_ties(n, block, k):
  rng = np.random.default_rng(n + block + k)
  # 2 bytes of bits: many equal distances, so the tie rule is exercised.
  docs = rng.integers(0, 4, (n, 2), dtype=np.uint8)
  q = rng.integers(0, 4, (6, 2), dtype=np.uint8)
  k = min(k, n)
  ref = _np_hamming(q, docs)
  fn = jax.jit(quant.hamming_top_k, static_argnames=("k", "block_size"))
  dist, rows = fn(q, docs, k=k, block_size=block)
  want = _order(ref, k)
  np.testing.assert_array_equal(np.asarray(rows), want)
  np.testing.assert_array_equal(np.asarray(dist), np.take_along_axis(ref, want, 1))


# ---------------------------------------------------------------- int8


def test_int8_dot_exact():
  rng = np.random.default_rng(2)
  for m in (5, 64, 1100):
    a = rng.integers(-127, 128, (4, m)).astype(np.int8)
    b = rng.integers(-128, 128, (9, m)).astype(np.int8)
    a[0], b[0] = 127, -128                         # the largest magnitudes
    ref = a.astype(np.int64) @ b.astype(np.int64).T
    for fn in (quant.int8_dot, jax.jit(quant.int8_dot)):
      out = np.asarray(fn(a, b))
      assert out.dtype == np.int32
      np.testing.assert_array_equal(out, ref)


def test_calibration_codes_and_clipping():
  x = np.array([[0.0, 1.0, 5.0], [1.0, 1.0, -5.0], [0.25, 1.0, 0.0]], np.float32)
  cal = quant.calibrate_int8(x)
  np.testing.assert_allclose(cal.scales, [1 / 255, 1.0, 10 / 255], rtol=1e-6)
  codes = cal.quantize(x)
  assert codes.dtype == np.int8
  np.testing.assert_array_equal(codes[:, 0], [-128, 127, -64])       # min -> -128, max -> 127
  np.testing.assert_array_equal(codes[:, 1], [-128, -128, -128])     # constant dim: exact
  np.testing.assert_allclose(cal.offsets + cal.scales * codes, x, atol=np.max(cal.scales) / 2 + 1e-6)
  out = cal.quantize(np.array([[-3.0, 9.0, 6.0], [4.0, -9.0, -6.0]], np.float32))
  # Clipped outside the calibrated range (the constant dim has scale 1: 9 -> 9 - 129).
  np.testing.assert_array_equal(out, [[-128, -120, 127], [127, -128, -128]])
  ref = np.clip(np.rint((x - cal.offsets) / cal.scales), -128, 127)
  np.testing.assert_array_equal(codes, ref)


def _in_fresh_process(code: str) -> dict:
  """The JSON that `code` prints, run in a new interpreter on the CPU."""
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_calibration_sample_is_deterministic():
  x = np.random.default_rng(3).normal(size=(1000, 4)).astype(np.float32)
  a = quant.calibrate_int8(x, calibration_rows=100)
  # Without a key: the 100 evenly spaced rows, worked out here.
  rows = np.linspace(0, 999, 100).round().astype(int)
  lo, hi = x[rows].min(0), x[rows].max(0)
  np.testing.assert_array_equal(a.scales, ((hi - lo) / 255.0).astype(np.float32))
  np.testing.assert_array_equal(a.offsets, quant.calibrate_int8(x[rows]).offsets)
  c = quant.calibrate_int8(x, calibration_rows=100, key=jax.random.key(7))
  # The keyed sample is the same in a fresh interpreter (not a second call here).
  fresh = _in_fresh_process(
      "import json, jax, numpy as np; from adaptor import quant; "
      "x = np.random.default_rng(3).normal(size=(1000, 4)).astype(np.float32); "
      "c = quant.calibrate_int8(x, calibration_rows=100, key=jax.random.key(7)); "
      "print(json.dumps({'scales': c.scales.tolist(), 'offsets': c.offsets.tolist()}))")
  np.testing.assert_array_equal(c.scales, np.asarray(fresh["scales"], np.float32))
  np.testing.assert_array_equal(c.offsets, np.asarray(fresh["offsets"], np.float32))
  assert not np.array_equal(a.scales, c.scales)
  with pytest.raises(ValueError, match="calibration_rows must be a positive int"):
    quant.calibrate_int8(x, calibration_rows=0)


def test_quantize_queries_matches_numpy():
  rng = np.random.default_rng(4)
  q = _unit(rng.normal(size=(6, 10)))
  offsets = rng.normal(size=12).astype(np.float32) * 0.1
  scales = rng.uniform(0.001, 0.01, 12).astype(np.float32)
  codes, t, bias = jax.jit(quant.quantize_queries)(q, offsets, scales)
  w = q * scales[:10]
  t_ref = np.abs(w).max(1) / np.float32(127)
  np.testing.assert_allclose(np.asarray(t), t_ref, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(codes), np.clip(np.rint(w / t_ref[:, None]), -127, 127))
  np.testing.assert_allclose(np.asarray(bias), q @ offsets[:10], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n,block", [(200, 64), (200, 50), (40, 40)])
def test_int8_top_k_equals_brute_force(n, block):
  rng = np.random.default_rng(n + block)
  codes = rng.integers(-3, 4, (n, 16)).astype(np.int8)   # few values: ties
  cq = rng.integers(-2, 3, (5, 12)).astype(np.int8)
  t = np.ones(5, np.float32)
  bias = np.zeros(5, np.float32)
  ints = cq.astype(np.int64) @ codes[:, :12].astype(np.int64).T
  s, rows = jax.jit(quant.int8_top_k, static_argnames=("k", "block_size"))(
      cq, t, bias, codes, k=7, block_size=block)
  want = _order(-ints, 7)    # Integer scores: exact order, ties to the lower index.
  np.testing.assert_array_equal(np.asarray(rows), want)
  np.testing.assert_array_equal(np.asarray(s), np.take_along_axis(ints, want, 1))
  inv = rng.uniform(0.5, 2, n).astype(np.float32)
  t2 = rng.uniform(0.5, 1.5, 5).astype(np.float32)
  b2 = rng.normal(size=5).astype(np.float32)
  s, rows = quant.int8_top_k(cq, t2, b2, codes, 7, block_size=block, inv_norms=inv)
  ref = (t2[:, None] * ints.astype(np.float32) + b2[:, None]) * inv[None, :]
  _assert_top_k_up_to_ties(s, rows, ref, 7)


# ---------------------------------------------------------------- stores in an index


@pytest.fixture(scope="module")
def corpus():
  rng = np.random.default_rng(5)
  return (rng.normal(size=(150, 24)) * np.linspace(1, 0.3, 24)).astype(np.float32)


def _int8_ref(index, q, dim, store_dims, *, quantise):
  """numpy reference of the int8 scores of adapted queries at `dim` from the store at store_dims."""
  st = index.stores[("int8", store_dims)]
  cal = st.calibration
  qn = _unit(q[:, :dim])
  w = qn * cal.scales[:dim]
  bias = qn @ cal.offsets[:dim]
  c = st.codes[:, :dim].astype(np.float64)
  if quantise:
    t = np.abs(w).max(1) / 127
    ints = np.clip(np.rint(w / t[:, None]), -127, 127) @ c.T
    s = t[:, None] * ints + bias[:, None]
  else:
    s = w @ c.T + bias[:, None]
  if dim < store_dims:
    deq = cal.offsets[:dim] + cal.scales[:dim] * c
    s = s / np.linalg.norm(deq, axis=1)[None, :]
  return s


def test_int8_store_codes_normalised_prefix(corpus):
  index = MatryoshkaIndex.build(corpus, stores={"int8": 16})
  st = index.stores[("int8", 16)]
  x = np.asarray(truncate(index.vectors[:, :16]))
  np.testing.assert_array_equal(st.codes, st.calibration.quantize(x))
  np.testing.assert_allclose(st.calibration.offsets - 128 * st.calibration.scales, x.min(0), atol=1e-6)


@pytest.mark.parametrize("dim,store_dims", [(16, 16), (8, 16)])
def test_index_int8_search_matches_numpy(corpus, dim, store_dims):
  index = MatryoshkaIndex.build(corpus, stores=[("int8", store_dims)], block_size=64)
  q = np.random.default_rng(6).normal(size=(5, 24)).astype(np.float32)
  s, rows = index.search_rows(q, 6, dim=dim, precision="int8")
  _assert_top_k_up_to_ties(s, rows, _int8_ref(index, q, dim, store_dims, quantise=True), 6)


@pytest.mark.parametrize("dim", [8, 16, 24])
def test_index_binary_search_matches_numpy(corpus, dim):
  index = MatryoshkaIndex.build(corpus, stores={"binary": 24}, block_size=64)
  q = np.random.default_rng(7).normal(size=(5, 24)).astype(np.float32)
  s, rows = index.search_rows(q, 9, dim=dim, precision="binary")
  ref = _np_hamming(np.packbits(q[:, :dim] > 0, axis=1), np.packbits(corpus[:, :dim] > 0, axis=1))
  want = _order(ref, 9)
  np.testing.assert_array_equal(rows, want)
  np.testing.assert_allclose(s, 1 - 2 * np.take_along_axis(ref, want, 1) / dim, atol=1e-6)


def test_funnel_with_whole_corpus_shortlist_equals_exact(corpus):
  index = MatryoshkaIndex.build(corpus, stores={"binary": 24, "int8": 16}, block_size=64)
  q = np.random.default_rng(8).normal(size=(5, 24)).astype(np.float32)
  n = index.n
  exact = index.search_rows(q, 7, dim=16, precision="binary")
  funnel = index.search_rows(q, 7, schedule=[(4, n), (16, 7, "binary")])
  for a, b in zip(exact, funnel):
    np.testing.assert_array_equal(a, b)
  # int8 rescoring (float query x int8 documents) of every document.
  s, rows = index.search_rows(q, 7, schedule=[(8, n, "binary"), (16, 7, "int8")])
  _assert_top_k_up_to_ties(s, rows, _int8_ref(index, q, 16, 16, quantise=False), 7)
  s, rows = index.search_rows(q, 7, schedule=[(24, n, "binary"), (8, 7, "int8")])
  _assert_top_k_up_to_ties(s, rows, _int8_ref(index, q, 8, 16, quantise=False), 7)
  # A float32 last stage over the whole corpus is exact float search.
  full = index.search_rows(q, 7)
  both = index.search_rows(q, 7, schedule=[(16, n, "int8"), (24, 7, "float32")])
  np.testing.assert_array_equal(full[1], both[1])
  np.testing.assert_allclose(full[0], both[0], atol=1e-6)


def test_three_stage_funnel_runs_and_narrows(corpus):
  index = MatryoshkaIndex.build(corpus, stores={"binary": 24, "int8": 16})
  q = corpus[:4] + 0.01
  s, ids = index.search(q, 3, schedule=[(16, 60, "binary"), (16, 20, "int8"), (24, 3)])
  assert ids.shape == (4, 3) and [row[0] for row in ids] == ["0", "1", "2", "3"]
  assert np.all(np.diff(s, axis=1) <= 0)


def test_three_stage_quantised_funnel_equals_brute_force_stage_by_stage(corpus):
  # Each stage re-done in numpy over the whole corpus, restricted to the previous
  # stage's survivors: Hamming on 16 sign bits (ties to the lower row, as the
  # kernel breaks them), then float query x int8 codes at 16 dims, then float
  # cosine at full size. Random queries, so the stages disagree and each matters.
  index = MatryoshkaIndex.build(corpus, stores={"binary": 24, "int8": 16}, block_size=64)
  q = np.random.default_rng(9).normal(size=(6, 24)).astype(np.float32)
  s, rows = index.search_rows(q, 3, schedule=[(16, 60, "binary"), (16, 20, "int8"), (24, 3)])
  ham = _np_hamming(np.packbits(q[:, :16] > 0, axis=1), np.packbits(corpus[:, :16] > 0, axis=1))
  first = _order(ham, 60)
  int8_scores = _int8_ref(index, q, 16, 16, quantise=False)
  cosine = _unit(q) @ _unit(corpus).T
  for i in range(len(q)):
    second = first[i][np.argsort(-int8_scores[i, first[i]], kind="stable")[:20]]
    third = second[np.argsort(-cosine[i, second], kind="stable")[:3]]
    np.testing.assert_array_equal(rows[i], third, err_msg=f"query {i}")
    np.testing.assert_allclose(s[i], cosine[i, third], atol=1e-5)
  # The funnel is not exact search here: the first stages dropped true neighbours.
  exact = np.argsort(-cosine, axis=1)[:, :3]
  assert not np.array_equal(rows, exact)


def test_save_load_round_trip_with_stores(tmp_path, corpus):
  index = MatryoshkaIndex.build(corpus, stores={"binary": 16, "int8": 8}, calibration_rows=50,
                                schedule=[(16, 40, "binary"), (24, 5)])
  index.save(tmp_path / "ix")
  meta = json.loads((tmp_path / "ix" / "index.json").read_text())
  assert meta["format_version"] == 1 and meta["schedule"] == [[16, 40, "binary"], [24, 5, "float32"]]
  back = MatryoshkaIndex.load(tmp_path / "ix")
  assert sorted(back.stores) == [("binary", 16), ("int8", 8)] and back.schedule == index.schedule
  for key, st in index.stores.items():
    for name, arr in st.arrays().items():
      got = back.stores[key].arrays()[name]
      assert got.dtype == arr.dtype
      assert name == "calibration" or got.ctypes.data % 4096 == 0   # zero-copy on device_put
      np.testing.assert_array_equal(got, arr)
  q = corpus[:3] * -1
  for how in ({}, {"dim": 8, "precision": "int8"}, {"dim": 16, "precision": "binary"}):
    for a, b in zip(index.search(q, 4, **how), back.search(q, 4, **how)):
      np.testing.assert_array_equal(a, b)
  # An index written before stores existed (no "stores"/"schedule" keys) still loads.
  meta.pop("stores"), meta.pop("schedule")
  for f in (tmp_path / "ix").glob("store-*"):
    f.unlink()
  (tmp_path / "ix" / "index.json").write_text(json.dumps(meta))
  old = MatryoshkaIndex.load(tmp_path / "ix")
  assert old.stores == {} and old.schedule is None


@pytest.mark.parametrize("damage", ["missing bits", "truncated codes", "short calibration",
                                    "nan calibration", "zero scale", "unknown precision"])
def test_damaged_store_is_named_by_load_and_check(tmp_path, corpus, damage, capsys):
  from adaptor import cli
  ix = tmp_path / "ix"
  MatryoshkaIndex.build(corpus, stores={"binary": 16, "int8": 8}).save(ix)
  codes, cal = ix / "store-int8-8-codes.npy", ix / "store-int8-8-calibration.npy"
  if damage == "missing bits":
    (ix / "store-binary-16-bits.npy").unlink()
    want = r"store-binary-16-bits\.npy: cannot read"
  elif damage == "truncated codes":
    codes.write_bytes(codes.read_bytes()[:-5])
    want = r"store-int8-8-codes\.npy: expected \d+ bytes of data, found \d+ \(truncated file\)"
  elif damage == "short calibration":
    np.save(cal, np.ones((2, 7), np.float32))
    want = r"store-int8-8-calibration\.npy: expected a C-order float32 array of shape \(2, 8\)"
  elif damage in ("nan calibration", "zero scale"):
    values = np.load(cal)
    values[(0, 3) if damage == "nan calibration" else (1, 5)] = np.nan if damage == "nan calibration" else 0.0
    np.save(cal, values)
    want = r"store-int8-8-calibration\.npy: int8 calibration must have finite offsets and finite scales > 0"
  else:
    meta = json.loads((ix / "index.json").read_text())
    meta["stores"][0]["precision"] = "int4"
    (ix / "index.json").write_text(json.dumps(meta))
    want = r"index\.json: expected a store precision in \['int8', 'binary'\]"
  with pytest.raises(adaptor.InputError, match=want):
    MatryoshkaIndex.load(ix)
  assert cli.main(["check", str(ix)]) == 2
  out = capsys.readouterr().out
  assert re.search(want, out), out


def test_default_schedule_is_used_and_checked(corpus):
  index = MatryoshkaIndex.build(corpus, stores={"binary": 24}, schedule=[(24, 30, "binary"), (24, 5)])
  q = corpus[:2]
  np.testing.assert_array_equal(index.search_rows(q, 5)[1],
                                index.search_rows(q, 5, schedule=index.schedule)[1])
  assert index.search_rows(q, 5, dim=24)[0][0, 0] == pytest.approx(1.0, abs=1e-5)  # exact, float
  with pytest.raises(ValueError, match="k=6 exceeds the last keep 5 of the index's default schedule"):
    index.search_rows(q, 6)
  with pytest.raises(adaptor.InputError, match="no int8 store holds a 8-dim prefix"):
    MatryoshkaIndex.build(corpus, schedule=[(8, 30, "int8"), (24, 5)])


def test_add_keeps_stores_consistent(corpus):
  a, b = corpus[:100], corpus[100:]
  index = MatryoshkaIndex.build(a, stores={"binary": 24, "int8": 16}, precision="float16")
  cal = index.stores[("int8", 16)].calibration
  index.add(b * 3.0)   # Larger raw values: still unit norm after normalisation.
  whole = MatryoshkaIndex.build(np.concatenate([a, b]), precision="float16")
  np.testing.assert_array_equal(index.stores[("binary", 24)].bits,
                                np.packbits(whole.vectors[:, :24] > 0, axis=1))
  st = index.stores[("int8", 16)]
  assert st.calibration is cal and st.n == 150
  expected = quant.Int8Store.build(whole.vectors, 16, calibration=cal)
  np.testing.assert_array_equal(st.codes, expected.codes)
  q = corpus[:3]
  s, rows = index.search_rows(q, 4, dim=8, precision="int8")
  ref = MatryoshkaIndex(whole.vectors, whole.ids, stores={("int8", 16): expected})
  for x, y in zip((s, rows), ref.search_rows(q, 4, dim=8, precision="int8")):
    np.testing.assert_array_equal(x, y)


def test_bad_inputs(corpus):
  index = MatryoshkaIndex.build(corpus, stores={"int8": 16})
  q = corpus[:2]
  with pytest.raises(adaptor.InputError, match=r"precision must be one of \['float32', 'int8', 'binary'\], got 'int4'"):
    index.search(q, 3, dim=8, precision="int4")
  with pytest.raises(adaptor.InputError, match=r"no int8 store holds a 24-dim prefix: expected an? int8 store with dims >= 24, the index has stores \[int8 16\]"):
    index.search(q, 3, dim=24, precision="int8")
  with pytest.raises(adaptor.InputError, match="no binary store"):
    index.search(q, 3, schedule=[(16, 30, "binary"), (24, 3)])
  with pytest.raises(adaptor.InputError, match="must be a multiple of 8.*got 12"):
    index.add_store("binary", 12)
  with pytest.raises(adaptor.InputError, match="must be a multiple of 8.*got 12"):
    index.search(q, 3, schedule=[(12, 30, "binary"), (24, 3)])
  with pytest.raises(adaptor.InputError, match="store precision must be one of"):
    index.add_store("float32", 8)
  with pytest.raises(ValueError, match=r"int8 store dims must be in \[1, 24\]"):
    index.add_store("int8", 32)
  with pytest.raises(adaptor.InputError, match="store precision must be one of"):
    MatryoshkaIndex.build(corpus, stores={"int4": 8})
  with pytest.raises(ValueError, match="keeps must not increase"):
    index.search(q, 3, schedule=[(16, 30, "int8"), (24, 40)])
  with pytest.raises(ValueError, match=r"schedule\[1\] repeats the dim and precision"):
    index.search(q, 3, schedule=[(16, 30, "int8"), (16, 3, "int8")])
  with pytest.raises(ValueError, match="give precision"):
    index.search(q, 3, precision="int8", schedule=[(16, 30, "int8"), (24, 3)])
  with pytest.raises(ValueError, match="last keep must be >= k=5"):
    index.search(q, 5, schedule=[(16, 30, "int8"), (24, 3)])


def test_cli_parsers():
  stages = parse_schedule("256:400:binary, 256:40:int8,768:10")
  assert stages == (Stage(256, 400, "binary"), Stage(256, 40, "int8"), Stage(768, 10, "float32"))
  assert format_schedule(stages) == "256:400:binary,256:40:int8,768:10"
  assert format_schedule([(32, 500), (768, 10, "float32")]) == "32:500,768:10"
  assert parse_stores("binary:768,int8:256") == [("binary", 768), ("int8", 256)]
  for bad in ("256:400:int4", "256", "a:b", "1:2:3:4", ""):
    with pytest.raises(InputError, match="DIM:KEEP"):
      parse_schedule(bad)
  with pytest.raises(InputError, match="PRECISION:DIMS"):
    parse_stores("float32:8")


def test_bounded_group_selection_in_quantised_scans():
  # Group maxima (313 groups, k = 100), then members masked below the bound (search.best_groups).
  rng = np.random.default_rng(13)
  docs = rng.integers(0, 256, (10_000, 2), dtype=np.uint8)
  q = rng.integers(0, 256, (3, 2), dtype=np.uint8)
  _, rows = quant.hamming_top_k(q, docs, 100, block_size=4096)
  want = _order(_np_hamming(q, docs), 100)
  np.testing.assert_array_equal(np.asarray(rows), want)
  codes = rng.integers(-3, 4, (10_000, 8)).astype(np.int8)
  cq = rng.integers(-2, 3, (3, 8)).astype(np.int8)
  ints = cq.astype(np.int64) @ codes.astype(np.int64).T
  s, rows = quant.int8_top_k(cq, np.ones(3, np.float32), np.zeros(3, np.float32), codes, 100,
                             block_size=4096)
  want = _order(-ints, 100)
  np.testing.assert_array_equal(np.asarray(rows), want)
  np.testing.assert_array_equal(np.asarray(s), np.take_along_axis(ints, want, 1))
