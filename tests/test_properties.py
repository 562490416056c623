"""Property tests: search against brute force, truncation, metrics, save/load, batching.

Shapes are drawn from a few fixed sizes so that the jitted functions compile a
handful of times, not once per example.
"""

import math
import os
import tempfile

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays

import adaptor
from adaptor.model import MatryoshkaAdaptor

# PROPERTY_EXAMPLES=1000 runs a longer search locally.
SETTINGS = settings(max_examples=int(os.environ.get("PROPERTY_EXAMPLES", 25)), deadline=None)
D = 6


def _brute_force_cosine(queries, corpus, dim):
  """[n_queries, n_docs] float64 cosines of the `dim`-prefixes; zero prefixes score 0."""
  def unit(x):
    x = np.asarray(x, np.float64)[:, :dim]
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
  return unit(queries) @ unit(corpus).T


# Small integer coordinates make exact ties (equal documents, zero prefixes) common.
small_ints = st.integers(-2, 2)


# (n_docs, k, block_size): one block, several blocks with a ragged tail, k = n_docs.
SEARCH_SHAPES = [(9, 1, 9), (9, 9, 4), (40, 1, 40), (40, 5, 16), (40, 40, 16)]


@SETTINGS
@given(data=st.data())
def test_exact_search_equals_brute_force_up_to_ties(data):
  n, k, block = data.draw(st.sampled_from(SEARCH_SHAPES), label="(n_docs, k, block_size)")
  dim = data.draw(st.sampled_from([1, 3, D]), label="dim")
  corpus = data.draw(arrays(np.int8, (n, D), elements=small_ints)).astype(np.float32)
  queries = data.draw(arrays(np.int8, (3, D), elements=small_ints)).astype(np.float32)

  scores, idx = adaptor.exact_search(queries, corpus, k, dim=dim, block_size=block)
  want = _brute_force_cosine(queries, corpus, dim)
  assert scores.shape == idx.shape == (3, k)
  tol = 1e-5
  for q in range(3):
    assert len(set(idx[q].tolist())) == k, "a document returned twice"
    assert ((0 <= idx[q]) & (idx[q] < n)).all()
    np.testing.assert_allclose(scores[q], want[q, idx[q]], atol=tol)  # Scores are the docs' own.
    assert (np.diff(scores[q]) <= tol).all(), "not best first"
    # The same multiset of top-k scores as brute force; any document left out
    # scores no better than the worst one returned (a tie at the boundary).
    np.testing.assert_allclose(scores[q], np.sort(want[q])[::-1][:k], atol=tol)
    left_out = np.setdiff1d(np.arange(n), idx[q])
    assert (want[q, left_out] <= scores[q, -1] + tol).all()


finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)


@SETTINGS
@given(x=arrays(np.float32, (3, 8),
                elements=finite_f32 | st.sampled_from([0.0, 1e-40, 1e-20, 1e20])),
       dim=st.sampled_from([1, 3, 8]))
def test_truncate_gives_unit_or_zero_rows(x, dim):
  t = np.asarray(adaptor.truncate(jnp.asarray(x), dim))
  assert t.shape == (x.shape[0], dim) and t.dtype == np.float32
  assert np.isfinite(t).all()
  norms = np.linalg.norm(t.astype(np.float64), axis=1)
  prefix = np.linalg.norm(x[:, :dim].astype(np.float64), axis=1)
  for row, norm, p in zip(t, norms, prefix):
    assert (row == 0).all() or abs(norm - 1) < 1e-5, (norm, p)
    if 2e-12 < p < 1e18:  # Comfortably normalisable in float32: never zeroed.
      assert abs(norm - 1) < 1e-5, (norm, p)
    if p < 0.5e-12:
      assert (row == 0).all()


@st.composite
def judged(draw):
  """qrels where every query has a relevant document, and a run of arbitrary scores."""
  docs = [f"d{i}" for i in range(8)]
  qrels, run = {}, {}
  for q in range(draw(st.integers(1, 4))):
    grades = draw(st.dictionaries(st.sampled_from(docs), st.integers(0, 3), min_size=1))
    grades[draw(st.sampled_from(docs))] = draw(st.integers(1, 3))
    qrels[f"q{q}"] = grades
    run[f"q{q}"] = draw(st.dictionaries(st.sampled_from(docs), st.floats(-5, 5)))
  return qrels, run


def _reference_metrics(run, qrels, k):
  """nDCG@k, Recall@k and MRR@k by trec_eval's rules, written out plainly.

  A second implementation for the property test: the whole run is sorted by
  (score, doc id) descending (trec_eval's order, ties by larger id first),
  where adaptor.metrics counts, for each relevant document, those ranked above it.
  """
  ndcg, recall, mrr = [], [], []
  for q, rels in qrels.items():
    ranked = sorted(run.get(q, {}).items(), key=lambda item: (item[1], item[0]), reverse=True)
    top = [doc for doc, _ in ranked[:k]]
    gains = [max(rels.get(doc, 0), 0) for doc in top]
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains))
    ideal = sorted((g for g in rels.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    ndcg.append(dcg / idcg)
    recall.append(sum(g > 0 for g in gains) / sum(g > 0 for g in rels.values()))
    mrr.append(next((1.0 / (i + 1) for i, g in enumerate(gains) if g > 0), 0.0))
  return {"ndcg": sum(ndcg) / len(ndcg), "recall": sum(recall) / len(recall),
          "mrr": sum(mrr) / len(mrr)}


@SETTINGS
@given(case=judged(), k_values=st.lists(st.integers(1, 10), min_size=1, max_size=3))
def test_metrics_equal_a_plain_python_reference_and_one_for_a_perfect_ranking(case, k_values):
  qrels, run = case
  got = adaptor.evaluate(run, qrels, k_values=k_values)
  for k in k_values:
    want = _reference_metrics(run, qrels, k)
    for name in ("ndcg", "recall", "mrr"):
      assert abs(got[f"{name}@{k}"] - want[name]) < 1e-12, (name, k, got, want)
  # Perfect: each judged document scored by its grade; unjudged ones below them all.
  perfect = {q: {**{f"x{i}": -1.0 - i for i in range(3)},
                 **{d: float(g) for d, g in rels.items()}} for q, rels in qrels.items()}
  got = adaptor.evaluate(perfect, qrels, k_values=k_values + [100])
  for k in k_values:
    assert abs(got[f"ndcg@{k}"] - 1.0) < 1e-12
    assert got[f"mrr@{k}"] == 1.0
    want_recall = np.mean([min(k, sum(g > 0 for g in r.values())) / sum(g > 0 for g in r.values())
                           for r in qrels.values()])
    assert abs(got[f"recall@{k}"] - want_recall) < 1e-12
  assert got["recall@100"] == 1.0


def _random_adaptor(d_in, d_out, hidden, reorder, seed):
  """An adaptor with normal(0, 1) weights; built abstractly, so nothing compiles."""
  abstract = nnx.eval_shape(lambda: MatryoshkaAdaptor(d_in, d_out=d_out, hidden=hidden,
                                                      reorder=reorder, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape), v.dtype), params)
  module = nnx.merge(graphdef, params, rest)
  module.config = abstract.config
  return adaptor.Adaptor(module, info={"seed": seed})


@SETTINGS
@given(d_in=st.integers(2, 6), d_out_frac=st.floats(0, 1), layers=st.sampled_from(
    [(True, 0), (True, 3), (False, 3)]), seed=st.integers(0, 2**31 - 1))
def test_save_load_round_trips_exactly(d_in, d_out_frac, layers, seed):
  # (reorder=False, hidden=0) is plain truncation with no parameters; saving it fails.
  reorder, hidden = layers
  d_out = max(1, int(round(d_out_frac * d_in)))
  a = _random_adaptor(d_in, d_out, hidden, reorder, seed)
  with tempfile.TemporaryDirectory() as tmp:
    a.save(f"{tmp}/ck")
    b = adaptor.load(f"{tmp}/ck")
  assert b.config == a.config and b.info == a.info
  leaves_a = jax.tree.leaves(nnx.state(a.module, nnx.Param))
  leaves_b = jax.tree.leaves(nnx.state(b.module, nnx.Param))
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


APPLY_MODEL = _random_adaptor(D, D, 4, True, 0)


def _rounding_bound(model, x, dim):
  """Per row: how far two float32 evaluations of `apply` may differ.

  An output coordinate is a sum of terms of total magnitude m; two summation
  orders differ by at most about d * eps * m; normalising the `dim`-prefix
  divides that by the prefix norm.
  """
  m = model.module
  value = lambda v: np.asarray(v.get_value(), np.float64)
  k, b = value(m.base.kernel), value(m.base.bias)
  w1, b1, w2, b2 = (value(m.hidden_layer.kernel), value(m.hidden_layer.bias),
                    value(m.out_layer.kernel), value(m.out_layer.bias))
  x = x.astype(np.float64)
  h = x @ w1 + b1
  gelu = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
  y = x @ k + b + gelu @ w2 + b2
  # Rounding in h reaches y through gelu (slope at most ~1.13) and w2.
  magnitude = (np.abs(x) @ np.abs(k) + np.abs(b) + np.abs(gelu) @ np.abs(w2) + np.abs(b2)
               + (np.abs(x) @ np.abs(w1) + np.abs(b1)) @ np.abs(w2))
  eps = np.finfo(np.float32).eps
  return 16 * D * eps * magnitude[:, :dim].max(axis=1) / np.linalg.norm(y[:, :dim], axis=1)


@SETTINGS
@given(x=arrays(np.float32, st.tuples(st.sampled_from([5, 13]), st.just(D)),
                elements=st.floats(-3, 3, width=32)).filter(
                    lambda x: (np.linalg.norm(x, axis=1) > 1e-3).all()),
       batch_size=st.sampled_from([1, 4, 16]))
def test_apply_is_invariant_to_batch_size_and_padding(x, batch_size):
  # Each row is adapted on its own: neither its batch-mates nor the rows
  # padding the last batch change it, bit for bit. Across batch sizes XLA may
  # pick another matmul kernel (a matrix-vector one for batch 1), so only up
  # to float32 rounding there.
  got = APPLY_MODEL.apply(x, dim=2, batch_size=batch_size)
  one_batch = APPLY_MODEL.apply(x, dim=2, batch_size=x.shape[0])
  bound = _rounding_bound(APPLY_MODEL, x, 2)
  assert (np.abs(got - one_batch).max(axis=1) <= bound).all(), (got - one_batch, bound)
  n = len(x)
  if batch_size < n and n % batch_size:
    # The last batch is zero-padded; real rows in place of the zeros change nothing.
    filled = np.concatenate([x, np.ones((batch_size - n % batch_size, D), np.float32)])
    np.testing.assert_array_equal(APPLY_MODEL.apply(filled, dim=2, batch_size=batch_size)[:n],
                                  got)
  perm = np.random.default_rng(n).permutation(n)
  np.testing.assert_array_equal(APPLY_MODEL.apply(x[perm], dim=2, batch_size=batch_size),
                                got[perm])
