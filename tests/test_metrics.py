"""Tests for adaptor.metrics: hand-computed cases, then agreement with pytrec_eval."""

import math

import numpy as np
import pytest

from adaptor import metrics

LOG2_3 = math.log2(3)


def _approx(x):
  return pytest.approx(x, abs=1e-12)


# ---------------------------------------------------------------- hand cases


def test_graded_ndcg_relevant_at_ranks_1_and_3():
  run = {"q": {"a": 3.0, "b": 2.0, "c": 1.0}}
  qrels = {"q": {"a": 2, "c": 1}}
  # DCG = 2/log2(2) + 1/log2(4) = 2.5; ideal grades (2, 1): IDCG = 2 + 1/log2(3).
  out = metrics.evaluate(run, qrels, k_values=(10,))
  assert out["ndcg@10"] == _approx(2.5 / (2 + 1 / LOG2_3))
  assert out["recall@10"] == 1.0
  assert out["mrr@10"] == 1.0


def test_ideal_uses_all_judged_grades_cut_at_k():
  run = {"q": {"a": 3.0, "b": 2.0, "c": 1.0}}
  qrels = {"q": {"a": 2, "c": 1, "z": 3}}  # z is judged but not retrieved.
  out = metrics.evaluate(run, qrels, k_values=(1, 3))
  # @3: DCG = 2 + 1/2; ideal grades (3, 2, 1): IDCG = 3 + 2/log2(3) + 1/2.
  assert out["ndcg@3"] == _approx(2.5 / (3 + 2 / LOG2_3 + 0.5))
  # @1: DCG = 2, IDCG = 3.
  assert out["ndcg@1"] == _approx(2 / 3)
  assert out["recall@1"] == _approx(1 / 3)
  assert out["recall@3"] == _approx(2 / 3)


def test_recall_and_mrr_by_cutoff():
  run = {"q": {"a": 5.0, "b": 4.0, "c": 3.0, "d": 2.0, "e": 1.0}}
  qrels = {"q": {"b": 1, "d": 1, "x": 1}}  # relevant at ranks 2 and 4, plus one unretrieved.
  out = metrics.evaluate(run, qrels, k_values=(1, 3, 5))
  assert out["recall@1"] == 0.0
  assert out["recall@3"] == _approx(1 / 3)
  assert out["recall@5"] == _approx(2 / 3)
  assert out["mrr@1"] == 0.0
  assert out["mrr@3"] == 0.5
  assert out["mrr@5"] == 0.5


def test_no_relevant_retrieved_scores_zero():
  out = metrics.evaluate({"q": {"a": 1.0, "b": 0.5}}, {"q": {"c": 2}}, k_values=(10,))
  assert out == {"ndcg@10": 0.0, "recall@10": 0.0, "mrr@10": 0.0}


def test_judged_query_missing_from_run_scores_zero():
  run = {"q1": {"a": 1.0}}
  qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
  per_query = metrics.evaluate_per_query(run, qrels, k_values=(10,))
  assert per_query["q2"] == {"ndcg@10": 0.0, "recall@10": 0.0, "mrr@10": 0.0}
  # q1 is perfect, q2 is 0: the mean is over both judged queries.
  assert metrics.evaluate(run, qrels, k_values=(10,))["ndcg@10"] == 0.5
  # An empty entry in the run is the same as a missing one.
  run_empty = {"q1": {"a": 1.0}, "q2": {}}
  assert metrics.evaluate(run_empty, qrels) == metrics.evaluate(run, qrels)


def test_unjudged_queries_are_skipped():
  run = {"q1": {"a": 1.0}, "q2": {"b": 1.0}, "q3": {"c": 1.0}}
  qrels = {"q1": {"a": 1}, "q3": {}}  # q2 absent from qrels, q3 judged nothing.
  per_query = metrics.evaluate_per_query(run, qrels, k_values=(10,))
  assert list(per_query) == ["q1"]
  assert metrics.evaluate(run, qrels, k_values=(10,))["ndcg@10"] == 1.0


def test_ties_broken_by_doc_id_descending():
  # Equal scores rank c, b, a (string order, descending), as in trec_eval.
  qrels = {"q": {"a": 1}}
  for order in (["a", "b", "c"], ["c", "b", "a"], ["b", "a", "c"]):
    run = {"q": {d: 1.0 for d in order}}
    out = metrics.evaluate(run, qrels, k_values=(1, 3))
    assert out["mrr@3"] == _approx(1 / 3)
    assert out["recall@1"] == 0.0
  # String, not numeric, comparison: "9" > "10", so "9" ranks first.
  out = metrics.evaluate({"q": {"10": 0.5, "9": 0.5}}, {"q": {"10": 1}}, k_values=(2,))
  assert out["mrr@2"] == 0.5
  # -0.0 == 0.0 is a tie too, so the larger id "b" ranks first.
  out = metrics.evaluate({"q": {"a": 0.0, "b": -0.0}}, qrels, k_values=(2,))
  assert out["mrr@2"] == 0.5
  # A tie only applies to exactly equal scores.
  out = metrics.evaluate({"q": {"a": 1.0 + 1e-12, "b": 1.0}}, qrels, k_values=(1,))
  assert out["mrr@1"] == 1.0


def test_zero_and_negative_grades_are_not_relevant():
  run = {"q": {"a": 3.0, "b": 2.0, "c": 1.0}}
  qrels = {"q": {"a": 0, "b": -1, "c": 2}}
  out = metrics.evaluate(run, qrels, k_values=(3,))
  # Only c counts, at rank 3: DCG = 2/log2(4) = 1, IDCG = 2.
  assert out["ndcg@3"] == _approx(0.5)
  assert out["recall@3"] == 1.0
  assert out["mrr@3"] == _approx(1 / 3)


def test_query_with_only_zero_grades_counts_as_zero():
  run = {"q1": {"a": 1.0}, "q2": {"b": 1.0}}
  qrels = {"q1": {"a": 1}, "q2": {"b": 0}}
  per_query = metrics.evaluate_per_query(run, qrels, k_values=(10,))
  assert per_query["q2"] == {"ndcg@10": 0.0, "recall@10": 0.0, "mrr@10": 0.0}
  assert metrics.evaluate(run, qrels, k_values=(10,))["recall@10"] == 0.5


def test_run_shorter_than_k_and_keys():
  out = metrics.evaluate({"q": {"a": 1.0}}, {"q": {"a": 1}}, k_values=(100, 10, 10))
  assert sorted(out) == sorted(
      f"{m}@{k}" for m in ("ndcg", "recall", "mrr") for k in (10, 100))
  assert all(v == 1.0 for v in out.values())


def test_evaluate_is_mean_of_per_query():
  run = {"q1": {"a": 2.0, "b": 1.0}, "q2": {"c": 1.0, "d": 2.0}}
  qrels = {"q1": {"b": 1}, "q2": {"c": 2, "d": 1}}
  per_query = metrics.evaluate_per_query(run, qrels, k_values=(1, 2))
  out = metrics.evaluate(run, qrels, k_values=(1, 2))
  for name, value in out.items():
    assert value == _approx(np.mean([m[name] for m in per_query.values()]))


# ---------------------------------------------------------------- top-k arrays


def test_run_from_topk_skips_padding():
  doc_ids = ["d0", "d1", "d2", "d3"]
  indices = np.array([[2, 0, -1], [-1, -1, -1], [3, 1, 0]])
  scores = np.array([[0.9, 0.5, -np.inf], [-np.inf] * 3, [0.8, 0.7, 0.1]], np.float32)
  run = metrics.run_from_topk(indices, scores, ["qa", "qb", "qc"], doc_ids)
  assert run == {
      "qa": {"d2": pytest.approx(0.9), "d0": pytest.approx(0.5)},
      "qb": {},
      "qc": {"d3": pytest.approx(0.8), "d1": pytest.approx(0.7), "d0": pytest.approx(0.1)},
  }
  qrels = {"qa": {"d0": 1}, "qb": {"d1": 1}, "qc": {"d3": 2}}
  out = metrics.evaluate_topk(indices, scores, ["qa", "qb", "qc"], doc_ids, qrels, k_values=(1, 2))
  assert out == metrics.evaluate(run, qrels, k_values=(1, 2))
  # qa: relevant at rank 2; qb: nothing retrieved; qc: relevant at rank 1.
  assert out["mrr@2"] == _approx((0.5 + 0 + 1) / 3)
  assert out["recall@1"] == _approx(1 / 3)


def test_evaluate_topk_on_exact_search_results():
  from adaptor.search import exact_search

  corpus = np.eye(4, dtype=np.float32)
  queries = np.array([[1.0, 0.2, 0, 0], [0, 0, 0.1, 1.0]], np.float32)
  scores, indices = exact_search(queries, corpus, 2)
  qrels = {"q0": {"d0": 1}, "q1": {"d2": 1}}
  out = metrics.evaluate_topk(
      indices, scores, ["q0", "q1"], ["d0", "d1", "d2", "d3"], qrels, k_values=(1, 2))
  assert out["mrr@1"] == 0.5
  assert out["mrr@2"] == 0.75


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "10"])
def test_bad_k_values(bad):
  with pytest.raises(ValueError, match=rf"k_values.*{bad!r}"):
    metrics.evaluate({"q": {"a": 1.0}}, {"q": {"a": 1}}, k_values=(10, bad))


def test_empty_or_scalar_k_values():
  with pytest.raises(ValueError, match="k_values"):
    metrics.evaluate({"q": {"a": 1.0}}, {"q": {"a": 1}}, k_values=())
  with pytest.raises(TypeError, match="k_values"):
    metrics.evaluate({"q": {"a": 1.0}}, {"q": {"a": 1}}, k_values=10)


def test_empty_qrels():
  with pytest.raises(ValueError, match="qrels"):
    metrics.evaluate({"q": {"a": 1.0}}, {})
  with pytest.raises(ValueError, match="qrels"):
    metrics.evaluate({"q": {"a": 1.0}}, {"q": {}})


def test_non_integer_grade():
  with pytest.raises(TypeError, match=r"qrels.*1\.5.*'q'.*'a'"):
    metrics.evaluate({"q": {"a": 1.0}}, {"q": {"a": 1.5}})


def test_nan_score():
  with pytest.raises(ValueError, match="NaN.*'q'"):
    metrics.evaluate({"q": {"a": float("nan")}}, {"q": {"a": 1}})


def test_run_from_topk_errors():
  idx = np.array([[0, 1], [1, -1]])
  s = np.ones((2, 2), np.float32)
  docs = ["d0", "d1"]
  with pytest.raises(ValueError, match=r"shape.*\(2, 2\).*\(2, 3\)"):
    metrics.run_from_topk(idx, np.ones((2, 3)), ["a", "b"], docs)
  with pytest.raises(ValueError, match=r"query_ids.*\(2\).*3"):
    metrics.run_from_topk(idx, s, ["a", "b", "c"], docs)
  with pytest.raises(ValueError, match="unique"):
    metrics.run_from_topk(idx, s, ["a", "a"], docs)
  with pytest.raises(ValueError, match=r"len\(doc_ids\) = 2, got 7"):
    metrics.run_from_topk(np.array([[0, 7], [1, -1]]), s, ["a", "b"], docs)
  with pytest.raises(ValueError, match="got -2"):
    metrics.run_from_topk(np.array([[0, -2], [1, -1]]), s, ["a", "b"], docs)
  with pytest.raises(TypeError, match="integer"):
    metrics.run_from_topk(s, idx, ["a", "b"], docs)  # (scores, indices) swapped.
  with pytest.raises(ValueError, match="NaN"):
    metrics.run_from_topk(idx, np.full((2, 2), np.nan), ["a", "b"], docs)
  with pytest.raises(TypeError, match="doc_ids must be strs.*int"):
    metrics.run_from_topk(idx, s, ["a", "b"], [0, 1])


# ---------------------------------------------------------------- pytrec_eval


def _random_case(seed, n_queries=60, n_docs=40, run_len=30):
  rng = np.random.default_rng(seed)
  # Ids of different lengths, so that string order differs from numeric order.
  doc_ids = [f"d{i}" for i in range(n_docs)]
  run, qrels = {}, {}
  for q in range(n_queries):
    qid = f"q{q}"
    docs = rng.choice(n_docs, size=rng.integers(1, run_len + 1), replace=False)
    # Few distinct scores, so many ties.
    run[qid] = {doc_ids[d]: float(rng.integers(0, 6)) / 5 for d in docs}
    judged = rng.choice(n_docs, size=rng.integers(1, 12), replace=False)
    qrels[qid] = {doc_ids[d]: int(rng.integers(0, 4)) for d in judged}
  # Some judged queries absent from the run, some run queries never judged.
  for q in range(0, n_queries, 7):
    del run[f"q{q}"]
  for q in range(3, n_queries, 11):
    del qrels[f"q{q}"]
  return run, qrels


@pytest.mark.parametrize("seed", range(4))
def test_agrees_with_pytrec_eval(seed):
  pytrec_eval = pytest.importorskip("pytrec_eval")
  run, qrels = _random_case(seed)
  # BEIR passes a run entry for every query; pytrec_eval then scores a judged
  # query with no results as 0 instead of dropping it.
  beir_run = {qid: run.get(qid, {}) for qid in set(run) | set(qrels)}
  measures = {"ndcg_cut.10", "ndcg_cut.100", "recall.10", "recall.100", "recip_rank"}
  ref = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(beir_run)

  # k = 100 exceeds every run length, so mrr@100 is trec_eval's recip_rank.
  ours = metrics.evaluate_per_query(run, qrels, k_values=(10, 100))
  assert set(ours) == set(ref) == {q for q, rels in qrels.items() if rels}
  pairs = [("ndcg@10", "ndcg_cut_10"), ("ndcg@100", "ndcg_cut_100"),
           ("recall@10", "recall_10"), ("recall@100", "recall_100"), ("mrr@100", "recip_rank")]
  for qid in ref:
    for name, ref_name in pairs:
      assert ours[qid][name] == pytest.approx(ref[qid][ref_name], abs=1e-6), (qid, name)

  means = metrics.evaluate(run, qrels, k_values=(10, 100))
  for name, ref_name in pairs:
    ref_mean = np.mean([m[ref_name] for m in ref.values()])
    assert means[name] == pytest.approx(ref_mean, abs=1e-6), name


def test_pytrec_eval_drops_queries_missing_from_run():
  # Documents why the BEIR-style run above is needed: pytrec_eval alone skips a
  # judged query that has no run entry, while evaluate() counts it as 0.
  pytrec_eval = pytest.importorskip("pytrec_eval")
  run = {"q1": {"a": 1.0}}
  qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
  ref = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run)
  assert list(ref) == ["q1"]
  assert metrics.evaluate(run, qrels)["mrr@10"] == 0.5


def test_ties_match_pytrec_eval():
  pytrec_eval = pytest.importorskip("pytrec_eval")
  ids = ["a", "B", "b", "10", "9", "d1", "d10", "d2", "é", "z"]
  run = {"q": {d: 1.0 for d in ids}}
  for target in ids:
    qrels = {"q": {target: 1}}
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run)
    ours = metrics.evaluate(run, qrels, k_values=(len(ids),))
    assert ours[f"mrr@{len(ids)}"] == pytest.approx(ref["q"]["recip_rank"], abs=1e-12), target


def test_topk_overlap_by_hand():
  from adaptor.metrics import topk_overlap
  found = np.array([[1, 2, 3], [7, 8, 9]])
  reference = np.array([[3, 1, 5], [9, 0, 4]])
  assert topk_overlap(found, reference) == pytest.approx((2 / 3 + 1 / 3) / 2)
  assert topk_overlap(found[:, :1], reference) == pytest.approx((1 / 3 + 0) / 2)   # 1 is found, 7 not
  with pytest.raises(ValueError, match=r"same rows, got shapes \(1, 3\) and \(2, 3\)"):
    topk_overlap(found[:1], reference)
