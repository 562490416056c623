"""Retrieval metrics over graded qrels, computed as trec_eval / pytrec_eval do.

The conventions, each checked against pytrec_eval in tests/test_metrics.py:

* Ranking: documents are sorted by score descending, and ties by document id
  descending (plain string comparison), which is trec_eval's order. The order
  in which a run lists its documents never matters.
* Relevance: a grade >= 1 is relevant; grades <= 0 give zero gain and do not
  count as relevant (trec_eval's default relevance level of 1).
* nDCG@k (trec_eval `ndcg_cut.k`): linear gain (gain = grade), discount
  1 / log2(rank + 1), ideal DCG from all judged grades sorted descending and
  cut at k.
* Recall@k (trec_eval `recall.k`): relevant documents in the top k divided by
  all relevant judged documents.
* MRR@k: 1 / rank of the first relevant document within the top k, else 0.
  trec_eval's `recip_rank` has no cut-off; it equals MRR@k for k >= run length.
* Which queries count: every query with at least one judgement (BEIR). A
  judged query that is absent from the run, or has no documents in it, scores
  0 on every metric; a judged query whose judgements are all <= 0 also scores
  0 (as in trec_eval). Queries without judgements are skipped. Note that
  pytrec_eval on its own silently drops judged queries absent from the run,
  which inflates the mean; BEIR avoids that by passing a run entry for every
  query, and this module gives the same numbers as BEIR does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

_METRICS = ("ndcg", "recall", "mrr")


def _check_k_values(k_values) -> tuple[int, ...]:
  """Validates k_values and returns them sorted and deduplicated."""
  if isinstance(k_values, (int, np.integer)):
    raise TypeError(f"k_values must be a sequence of positive ints, got the scalar {k_values!r}")
  k_values = tuple(k_values)
  if not k_values:
    raise ValueError("k_values must hold at least one positive int, got an empty sequence")
  for k in k_values:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
      raise ValueError(f"k_values must be positive ints, got {k!r} in {k_values!r}")
  return tuple(sorted({int(k) for k in k_values}))


def _check_qrels(qrels) -> dict[str, dict[str, int]]:
  """Drops queries without judgements and checks that grades are ints."""
  if not isinstance(qrels, Mapping):
    raise TypeError(f"qrels must be a dict query id -> {{doc id: grade}}, got {type(qrels).__name__}")
  judged = {}
  for qid, rels in qrels.items():
    if not rels:
      continue
    for doc, grade in rels.items():
      # trec_eval reads grades as integers (pytrec_eval refuses anything else).
      if isinstance(grade, bool) or not isinstance(grade, (int, np.integer)):
        raise TypeError(
            f"qrels grades must be ints, got {grade!r} for query {qid!r}, doc {doc!r}")
    judged[qid] = rels
  if not judged:
    raise ValueError(
        f"qrels must judge at least one query, got {len(qrels)} queries and no judgements")
  return judged


def _relevant_ranks(scores: Mapping[str, float], rels: Mapping[str, int], qid):
  """trec_eval ranks (1-based) and grades of the relevant documents in the run.

  Only relevant documents contribute to any metric here, so rather than sorting
  the whole run we count, for each of them, the documents that rank above it:
  a higher score, or an equal score and a larger doc id (trec_eval's order).
  """
  if not scores:
    return [], []
  s = np.fromiter(scores.values(), np.float64, len(scores))
  if np.isnan(s).any():
    raise ValueError(f"run scores must not be NaN, got NaN for query {qid!r}")
  docs = list(scores)
  found = [(doc, g) for doc, g in rels.items() if g > 0 and doc in scores]
  ranks = []
  for doc, _ in found:
    x = float(scores[doc])
    above = int(np.count_nonzero(s > x))
    above += sum(docs[i] > doc for i in np.flatnonzero(s == x).tolist())
    ranks.append(above + 1)
  return ranks, [g for _, g in found]


def _as_arrays(rows, ranks, grades):
  return (np.array(rows, np.int64), np.array(ranks, np.int64), np.array(grades, np.float64))


def _cut_metrics(rows, ranks, grades, ideal_rows, ideal_ranks, ideal_grades, num_rel, k_values):
  """Per-query metrics from the ranks of relevant documents.

  Args:
    rows, ranks, grades: query row, 1-based rank and grade (> 0) of each
      relevant document the run retrieved, each with shape [n_hits].
    ideal_rows, ideal_ranks, ideal_grades: the same for the ideal ranking
      (judged grades sorted descending), each with shape [n_relevant].
    num_rel: number of relevant judged documents, with shape [n_queries].
    k_values: cut-offs.

  Returns:
    Dict "ndcg@k" / "recall@k" / "mrr@k" -> values with shape [n_queries].
  """
  n = num_rel.shape[0]

  def dcg(r, rank, grade, k):
    keep = rank <= k
    return np.bincount(r[keep], weights=grade[keep] / np.log2(rank[keep] + 1.0), minlength=n)

  first = np.full(n, np.inf)
  np.minimum.at(first, rows, ranks)
  out = {}
  for k in k_values:
    ideal = dcg(ideal_rows, ideal_ranks, ideal_grades, k)
    hits = np.bincount(rows[ranks <= k], minlength=n)
    with np.errstate(divide="ignore", invalid="ignore"):
      out[f"ndcg@{k}"] = np.where(ideal > 0, dcg(rows, ranks, grades, k) / ideal, 0.0)
      out[f"recall@{k}"] = np.where(num_rel > 0, hits / num_rel, 0.0)
    out[f"mrr@{k}"] = np.where(first <= k, 1.0 / first, 0.0)
  return out


def evaluate_per_query(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    *,
    k_values: Sequence[int] = (10, 100),
) -> dict[str, dict[str, float]]:
  """nDCG@k, Recall@k and MRR@k for each judged query.

  Args:
    run: query id -> {doc id: score}; higher scores rank first.
    qrels: query id -> {doc id: integer relevance grade}.
    k_values: positive cut-offs; every metric is reported at each.

  Returns:
    Dict query id -> {"ndcg@k": ..., "recall@k": ..., "mrr@k": ...} for every
    query with at least one judgement (see the module docstring for why a
    judged query missing from the run is included with zeros).
  """
  k_values = _check_k_values(k_values)
  qrels = _check_qrels(qrels)
  if not isinstance(run, Mapping):
    raise TypeError(f"run must be a dict query id -> {{doc id: score}}, got {type(run).__name__}")
  qids = list(qrels)
  hits = ([], [], [])  # (row, rank, grade) of each relevant retrieved doc.
  ideal = ([], [], [])  # (row, rank, grade) of the ideal ranking.
  num_rel = np.zeros(len(qids))
  for row, qid in enumerate(qids):
    rels = qrels[qid]
    ranks, grades = _relevant_ranks(run.get(qid) or {}, rels, qid)
    hits[0].extend([row] * len(ranks))
    hits[1].extend(ranks)
    hits[2].extend(grades)
    positive = sorted((g for g in rels.values() if g > 0), reverse=True)
    ideal[0].extend([row] * len(positive))
    ideal[1].extend(range(1, len(positive) + 1))
    ideal[2].extend(positive)
    num_rel[row] = len(positive)

  values = _cut_metrics(*_as_arrays(*hits), *_as_arrays(*ideal), num_rel, k_values)
  names = [f"{m}@{k}" for m in _METRICS for k in k_values]
  return {qid: {n: float(values[n][row]) for n in names} for row, qid in enumerate(qids)}


def evaluate(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    *,
    k_values: Sequence[int] = (10, 100),
) -> dict[str, float]:
  """Mean nDCG@k, Recall@k and MRR@k over the judged queries.

  Args:
    run: query id -> {doc id: score}; higher scores rank first.
    qrels: query id -> {doc id: integer relevance grade}.
    k_values: positive cut-offs; every metric is reported at each.

  Returns:
    Dict like {"ndcg@10": ..., "recall@10": ..., "mrr@10": ..., ...}, each the
    mean over all queries with at least one judgement.
  """
  per_query = evaluate_per_query(run, qrels, k_values=k_values)
  names = next(iter(per_query.values())).keys()
  return {n: float(np.mean([m[n] for m in per_query.values()])) for n in names}


def run_from_topk(
    indices,
    scores,
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
) -> dict[str, dict[str, float]]:
  """Turns top-k search results into a run dict.

  Args:
    indices: corpus rows of the results, with shape [n_queries, k] (int);
      -1 marks an empty slot and is skipped.
    scores: scores of the results, with shape [n_queries, k].
    query_ids: ids of the queries, length n_queries.
    doc_ids: ids of the corpus documents, length n_docs.

  Returns:
    Dict query id -> {doc id: score}; every query gets an entry, possibly empty.
  """
  indices = np.asarray(indices)
  scores = np.asarray(scores)
  if indices.ndim != 2 or indices.shape != scores.shape:
    raise ValueError(
        f"indices and scores must have the same shape [n_queries, k], got {indices.shape} "
        f"and {scores.shape}")
  # Also catches (scores, indices) passed in the wrong order.
  if not np.issubdtype(indices.dtype, np.integer):
    raise TypeError(f"indices must be an integer array, got dtype {indices.dtype}")
  if len(query_ids) != indices.shape[0]:
    raise ValueError(
        f"query_ids must have one id per row of indices ({indices.shape[0]}), "
        f"got {len(query_ids)}")
  if len(set(query_ids)) != len(query_ids):
    raise ValueError(f"query_ids must be unique, got {len(query_ids) - len(set(query_ids))} duplicates")
  n_docs = len(doc_ids)
  if indices.size:
    hi, lo = int(indices.max()), int(indices.min())
    if hi >= n_docs:
      raise ValueError(f"indices must be < len(doc_ids) = {n_docs}, got {hi}")
    if lo < -1:
      raise ValueError(f"indices must be >= -1 (-1 marks an empty slot), got {lo}")
    if np.isnan(scores[indices >= 0]).any():
      raise ValueError("scores must not be NaN where indices >= 0")

  if n_docs and not isinstance(doc_ids[0], str):
    raise TypeError(f"doc_ids must be strs (as in qrels), got {type(doc_ids[0]).__name__}")
  # An object array gathers a whole row of ids at once, without copying strings.
  doc_arr = np.asarray(doc_ids, dtype=object)
  run = {}
  for qid, row_i, row_s in zip(query_ids, indices, scores):
    keep = row_i >= 0
    run[str(qid)] = dict(zip(doc_arr[row_i[keep]].tolist(), row_s[keep].tolist()))
  return run


def evaluate_topk(
    indices,
    scores,
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    qrels: Mapping[str, Mapping[str, int]],
    *,
    k_values: Sequence[int] = (10, 100),
) -> dict[str, float]:
  """`evaluate` on top-k search results; see `run_from_topk` for the arrays.

  Args:
    indices: corpus rows of the results, with shape [n_queries, k]; -1 = none.
    scores: scores of the results, with shape [n_queries, k].
    query_ids: ids of the queries, length n_queries.
    doc_ids: ids of the corpus documents, length n_docs.
    qrels: query id -> {doc id: integer relevance grade}.
    k_values: positive cut-offs; every metric is reported at each.
  """
  return evaluate(run_from_topk(indices, scores, query_ids, doc_ids), qrels, k_values=k_values)


def topk_overlap(found, reference) -> float:
  """Mean share of each row of `reference` found in the same row of `found`: recall@k against a reference.

  Args:
    found: int document rows (or ids), with shape [n_queries, >= 1].
    reference: the reference's rows, with shape [n_queries, k] (e.g. full-size
      exact search's top k).

  Returns:
    mean over queries of |found_i ∩ reference_i| / k, in [0, 1].
  """
  found, reference = np.asarray(found), np.asarray(reference)
  if found.ndim != 2 or reference.ndim != 2 or found.shape[0] != reference.shape[0]:
    raise ValueError(f"found and reference must be [n_queries, k] arrays with the same rows, got "
                     f"shapes {found.shape} and {reference.shape}")
  hits = (found[:, :, None] == reference[:, None, :]).any(axis=2).sum(axis=1)
  return float(np.mean(hits / reference.shape[1]))
