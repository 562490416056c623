"""Planning: which funnel, and which quantised stores, an index should search with.

    plan = plan_schedule(index, validation_queries, target_recall=0.99)   # cheapest float funnel
    plan = plan_budget(index, validation_queries, qrels=qrels, query_ids=ids, bytes_per_vector=96)
    print(plan.format_table()); write_plan(plan, "plan.json")
    config = read_plan("plan.json")
    index = MatryoshkaIndex.build(corpus, adaptor=model, stores=config["stores"],
                                  schedule=config["schedule"])

Two planners, one plan file: `matryoshka-adaptor plan` runs either (--recall,
or --bytes-per-vector / --quality) and writes plan.json, which
`matryoshka-adaptor index build --config` reads. Both measure candidate
schedules on validation queries with the index's own search; plan on
validation queries (e.g. the train split) and report on test.

Plan files are JSON. Each starts with the same header (`plan_config`): format
"matryoshka-plan", format_version 1, d, k, the adaptor fingerprint, the
quantised stores to build ([{"precision", "dims"}]) and the default schedule
([[dim, keep, precision], ...]); the planner's details follow. `read_plan`
checks the header and returns the whole file.

The recall-target planner (`plan_schedule`, `Plan`) ranks two- and
three-stage float funnels by the cost model of adaptor/search.py at a given
corpus size and measures them cheapest first; the first whose top k agrees
with full-size exact search on a `target_recall` share of results (recall@k
against full-size exact results) wins. It needs no stores.

The budget planner (`plan_budget`, `BudgetPlan`) measures every
configuration of a grid (`Grid`): single-stage exact search at each (dims,
precision) - float32, int8 or binary - and two- and three-stage funnels whose
first stage scans a binary or int8 prefix and whose later stages rescore the
shortlist with int8 and/or the full float vectors, e.g.
256:400:binary,256:40:int8,768:10.

For each it records
- bytes/vector in memory. Convention "first-stage" (the default, and
  sentence-transformers' when it reports binary + int8 rescoring as "32x less
  memory"): the bytes per document of what the first stage scans over the whole
  corpus - binary m/8, int8 m, float itemsize * m (+ 4 for the prefix norm when
  m < d). Later stages read only their shortlist's rows, which can stay on disk
  (memory-mapped). Convention "all": every store the schedule reads counts, as
  if all were held in memory (the stored bytes below).
- stored bytes/vector: the bytes per document of all the data the schedule
  reads, each store once: a binary store of the largest binary prefix, an int8
  store per int8 prefix, the float vectors (itemsize * d, + 4 per float prefix
  norm m < d) if any stage is float32. (The index also keeps its float vectors,
  whatever the schedule.)
- quality: nDCG@k against qrels when they are given, else recall@k against
  full-size float32 exact search; and relative quality, its ratio to the same
  metric of full-size float32 exact search on the same index.
- query time: median over `repeats` runs of (by default the first 256 of) the
  validation queries, ms/query.

The Pareto frontier keeps the configurations no other one beats on all three of
bytes (in the chosen convention), quality and time. The choice is the best
quality within `bytes_per_vector` (ties: fewer bytes, then faster), or the
fewest bytes reaching relative `quality` (ties: better quality, then faster).
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np

from adaptor import quant
from adaptor.checks import check_dim, check_k, check_positive
from adaptor.data import InputError, atomic_file
from adaptor.metrics import evaluate_topk, topk_overlap
from adaptor.model import adaptor_fingerprint, default_dims
from adaptor.search import Stage, check_schedule, format_schedule, schedule_cost

CONVENTIONS = ("first-stage", "all")
_CONFIG_FORMAT = "matryoshka-plan"
_CONFIG_VERSION = 1
DEFAULT_QUALITY = 0.98


def _fingerprint(index) -> str | None:
  return None if index.adaptor is None else adaptor_fingerprint(index.adaptor)


# ---------------------------------------------------------------- recall target


@dataclasses.dataclass(frozen=True)
class Plan:
  """A planned float funnel and what it was measured to achieve (`plan_schedule`).

  Attributes:
    schedule: the chosen `Stage`s, or full-size exact search (Stage(d, k),)
      if no cheaper candidate reached the target.
    recall: mean top-k overlap with full-size exact search on the validation
      queries (recall@k against full-size exact results).
    cost: estimated ms per query on the reference CPU (`search.schedule_cost`)
      at `corpus_size` documents.
    exact_cost: the same for full-size exact search, the schedule [(d, k)].
    speedup: exact_cost / cost.
    corpus_size: the corpus size the costs are estimated for.
    target: the recall target.
    candidates: the candidates measured, cheapest first: {"schedule" (as
      [[dim, keep, precision], ...]), "label", "recall", "cost"}.
    k, d: results per query and vector size.
    n_queries, n_docs: the validation set.
    adaptor_fingerprint: the index's adaptor (None without one).
  """

  schedule: tuple[Stage, ...]
  recall: float
  cost: float
  exact_cost: float
  speedup: float
  corpus_size: int
  target: float
  candidates: list
  k: int
  d: int
  n_queries: int
  n_docs: int
  adaptor_fingerprint: str | None

  def config(self) -> dict:
    """The plan-file header (`plan_config`): no stores, the planned schedule."""
    return plan_config(d=self.d, k=self.k, adaptor_fingerprint=self.adaptor_fingerprint,
                       stores=[], schedule=self.schedule)

  def to_dict(self) -> dict:
    """The plan file: the header, then what was measured."""
    out = self.config()
    out.update({"planner": "recall-target", "recall": self.recall, "target": self.target,
                "cost": self.cost, "exact_cost": self.exact_cost, "speedup": self.speedup,
                "corpus_size": self.corpus_size, "n_queries": self.n_queries,
                "n_docs": self.n_docs, "candidates": list(self.candidates)})
    return out

  def format_table(self, rows: int = 8) -> str:
    """A Markdown table of the last `rows` candidates measured (the costliest, nearest the
    target) and of full-size exact search; the chosen row is marked with *."""
    shown = self.candidates[-rows:] if rows > 0 else []
    exact = {"schedule": [[self.d, self.k, "float32"]], "recall": 1.0, "cost": self.exact_cost}
    lines = [f"| | schedule | recall@{self.k} vs full exact | est. ms/query at "
             f"{self.corpus_size} docs | speed-up |", "|---|---|---|---|---|"]
    if len(self.candidates) > len(shown):
      lines.append(f"| | ({len(self.candidates) - len(shown)} cheaper candidates, below the "
                   f"target) | | | |")
    for c in shown + [exact]:
      chosen = [tuple(st) for st in c["schedule"]] == list(self.schedule)
      lines.append(f"| {'*' if chosen else ''} | {format_schedule(c['schedule'])} | "
                   f"{c['recall']:.4f} | {c['cost']:.3g} | {self.exact_cost / c['cost']:.1f}x |")
    return "\n".join(lines)


def plan_schedule(index, query_embeddings, *, k: int = 10, target_recall: float = 0.99,
                  first_dims=None, first_keeps=None, middle_dims=None, middle_keeps=None,
                  corpus_size: int | None = None, adapted: bool = False) -> Plan:
  """Picks the cheapest float funnel whose top-k matches full-size exact search often enough.

  Considers every two-stage schedule [(m1, K1), (d, k)] and three-stage
  schedule [(m1, K1), (m2, K2), (d, k)] from the given grids, cheapest first
  (by `search.schedule_cost`), and measures on the validation queries the mean
  overlap of its top k with the top k of exact search at all d dims (recall@k
  against full-size exact results); the first at or above `target_recall` wins.
  The index's own search measures them: one first-stage search per m1 (at the
  largest K1), then its re-rank (`MatryoshkaIndex.rerank_rows`) per later stage.

  Args:
    index: the `MatryoshkaIndex` to plan for.
    query_embeddings: validation queries (raw), with shape [n_q, d_in].
    k: results per query.
    target_recall: the recall@k against full-size exact search to reach, in (0, 1].
    first_dims: candidate m1 (default: the index's stored dims below d).
    first_keeps: candidate K1 (default 20, 50, 100, 200, 500, 1000, 2000, 4000).
    middle_dims: candidate m2 (default: the first dims); m1 < m2 < d.
    middle_keeps: candidate K2 (default 20, 50, 100, 200); k <= K2 < K1.
    corpus_size: corpus size the costs are estimated for (default: the index's).
    adapted: the queries are already adapted vectors [n_q, d].

  Returns:
    A `Plan`; if no candidate cheaper than full-size exact search reaches
    the target, its schedule is full-size exact search (Stage(d, k),), recall 1.
  """
  if isinstance(target_recall, bool) or not isinstance(target_recall, (int, float)) or \
      not 0 < target_recall <= 1:
    raise InputError(f"target_recall must be in (0, 1], got {target_recall!r}")
  n, d = index.n, index.d
  k = check_k(k, n, what="the index size")
  q = index.prepare_queries(query_embeddings, adapted=adapted)
  corpus_size = n if corpus_size is None else check_positive(corpus_size, "corpus_size")
  first_dims = [m for m in index.dims if m < d] if first_dims is None else list(first_dims)
  middle_dims = first_dims if middle_dims is None else list(middle_dims)
  first_keeps = (20, 50, 100, 200, 500, 1000, 2000, 4000) if first_keeps is None else first_keeps
  middle_keeps = (20, 50, 100, 200) if middle_keeps is None else middle_keeps
  first_keeps = sorted({c for c in first_keeps if k <= c <= n})
  middle_keeps = sorted({c for c in middle_keeps if k <= c})
  for m in set(first_dims) | set(middle_dims):
    check_dim(m, d, name="planned dims")

  schedules = []
  for m1 in sorted(m for m in set(first_dims) if m < d):
    for k1 in first_keeps:
      schedules.append((Stage(m1, k1), Stage(d, k)))
      schedules += [(Stage(m1, k1), Stage(m2, k2), Stage(d, k)) for m2 in sorted(set(middle_dims))
                    for k2 in middle_keeps if m1 < m2 < d and k2 < k1]
  cost = lambda sch: schedule_cost([st[:2] for st in sch], corpus_size)   # Float stages only.
  exact_cost = cost((Stage(d, k),))
  # Only funnels estimated cheaper than full-size exact search are worth trying.
  schedules = sorted((sch for sch in schedules if cost(sch) < exact_cost), key=cost)

  # Cheapest first, stopping at the first that reaches the target; the
  # first-stage shortlists are computed once per m1, at the largest K1 (the
  # best K1 of them are the top K1: best first, ties to the lower row).
  _, exact = index.search_rows(q, k, dim=d, adapted=True)
  shortlists, candidates, best = {}, [], None
  for schedule in schedules:
    m1, k1, _ = schedule[0]
    if m1 not in shortlists:
      shortlists[m1] = index.search_rows(q, max(first_keeps), dim=m1, adapted=True)[1]
    rows = shortlists[m1][:, :k1]
    for m, keep, precision in schedule[1:]:
      rows = index.rerank_rows(q, rows, keep, dim=m, precision=precision, adapted=True)[1]
    candidates.append({"schedule": [list(st) for st in schedule],
                       "label": format_schedule(schedule),
                       "recall": topk_overlap(rows, exact), "cost": cost(schedule)})
    if candidates[-1]["recall"] >= target_recall:
      best = schedule
      break

  if best is not None:
    schedule, recall, best_cost = best, candidates[-1]["recall"], candidates[-1]["cost"]
  else:
    schedule, recall, best_cost = (Stage(d, k),), 1.0, exact_cost
  return Plan(schedule=schedule, recall=recall, cost=best_cost, exact_cost=exact_cost,
              speedup=exact_cost / best_cost, corpus_size=corpus_size, target=target_recall,
              candidates=candidates, k=k, d=d, n_queries=q.shape[0], n_docs=n,
              adaptor_fingerprint=_fingerprint(index))


# ---------------------------------------------------------------- budget


@dataclasses.dataclass(frozen=True)
class Grid:
  """The configurations the budget planner measures.

  Attributes:
    dims: prefix lengths (default: 32, 64, 128, ... below d, and d); binary
      stages use those that are multiples of 8.
    precisions: precisions of single-stage exact search.
    first_precisions: precisions of a funnel's first stage.
    shortlists: a two-stage funnel's first keep, as multiples of k
      (sentence-transformers' rescore_multiplier is 4). Two-stage funnels
      rescore with the full float vectors or with int8 at any grid dims
      (after an int8 first stage: more dims than it).
    deep_shortlists: a three-stage funnel's first keep, as multiples of k.
    middle_shortlist: a three-stage funnel's second keep, as a multiple of k.
  """

  dims: tuple[int, ...] | None = None
  precisions: tuple[str, ...] = ("binary", "int8", "float32")
  first_precisions: tuple[str, ...] = ("binary", "int8")
  shortlists: tuple[int, ...] = (4, 10, 40)
  deep_shortlists: tuple[int, ...] = (10, 40)
  middle_shortlist: int = 4

  def resolved_dims(self, d: int) -> tuple[int, ...]:
    if self.dims is None:   # Shorter prefixes than 32 dims keep too little to be worth a store.
      return tuple(m for m in default_dims(d) if m >= 32 or m == d)
    dims = tuple(sorted({int(m) for m in self.dims}))
    for m in dims:
      check_dim(m, d, name="grid dims")
    return dims


def candidate_schedules(d: int, k: int, n_docs: int, grid: Grid | None = None) -> list:
  """Every schedule of the grid, as tuples of (dim, keep, precision) stages."""
  grid = grid or Grid()
  dims = grid.resolved_dims(d)
  ok = lambda p, m: p != "binary" or m % 8 == 0
  out = [((m, k, p),) for p in grid.precisions for m in dims if ok(p, m)]
  keeps = sorted({c * k for c in grid.shortlists if k < c * k <= n_docs})
  for p1 in grid.first_precisions:
    for m1 in dims:
      if not ok(p1, m1):
        continue
      for k1 in keeps:
        out.append(((m1, k1, p1), (d, k, "float32")))
        # int8 rescoring of a binary shortlist may use fewer dims than it (less
        # memory when every store is held); of an int8 one, only more dims.
        out += [((m1, k1, p1), (m2, k, "int8")) for m2 in dims if p1 == "binary" or m2 > m1]
  middle = grid.middle_shortlist * k
  for m1 in dims:
    if not ok("binary", m1) or "binary" not in grid.first_precisions:
      continue
    for k1 in sorted({c * k for c in grid.deep_shortlists if middle < c * k <= n_docs}):
      out += [((m1, k1, "binary"), (m2, middle, "int8"), (d, k, "float32"))
              for m2 in dims if m2 >= m1]
  return list(dict.fromkeys(out))


def stores_for(schedule) -> list[tuple[str, int]]:
  """The quantised stores a schedule reads: one binary store of its largest binary prefix, one int8 store per int8 prefix."""
  binary = [m for m, _, p in schedule if p == "binary"]
  int8 = sorted({m for m, _, p in schedule if p == "int8"})
  return ([("binary", max(binary))] if binary else []) + [("int8", m) for m in int8]


def schedule_bytes(schedule, d: int, *, float_itemsize: int = 4) -> dict[str, float]:
  """Bytes per document of a schedule (see the module docstring).

  Returns:
    {"first_stage": bytes the first stage scans, "stored": bytes of all the
    data the schedule reads}.
  """
  def stage_bytes(m, p):
    if p == "binary":
      return m / 8
    if p == "int8":
      return float(m)
    return float(float_itemsize * m + (4 if m < d else 0))

  m1, _, p1 = schedule[0]
  stored = sum(m / 8 if p == "binary" else float(m) for p, m in stores_for(schedule))
  float_dims = {m for m, _, p in schedule if p == "float32"}
  if float_dims:
    stored += float_itemsize * d + 4 * sum(1 for m in float_dims if m < d)
  return {"first_stage": stage_bytes(m1, p1), "stored": float(stored)}


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One measured configuration.

  Attributes:
    schedule: (dim, keep, precision) stages.
    memory_bytes: bytes/vector in memory ("first-stage" convention).
    stored_bytes: bytes/vector of all the data it reads ("all" convention).
    quality: nDCG@k (with qrels) or recall@k against full-size float32 search.
    relative: quality / the same for full-size float32 exact search.
    ms_per_query: median query time on the validation queries.
  """

  schedule: tuple
  memory_bytes: float
  stored_bytes: float
  quality: float
  relative: float
  ms_per_query: float

  @property
  def label(self) -> str:
    return format_schedule(self.schedule)

  def bytes(self, convention: str) -> float:
    return self.memory_bytes if convention == "first-stage" else self.stored_bytes

  def to_dict(self) -> dict:
    return {"schedule": [list(s) for s in self.schedule], "label": self.label,
            "memory_bytes": self.memory_bytes, "stored_bytes": self.stored_bytes,
            "quality": self.quality, "relative": self.relative,
            "ms_per_query": self.ms_per_query,
            "stores": [{"precision": p, "dims": m} for p, m in stores_for(self.schedule)]}


def pareto_front(candidates, convention: str = "first-stage") -> list[int]:
  """Indices of the candidates no other one beats on bytes, quality and time.

  Another candidate dominates one if it is at least as good on all three (fewer
  or equal bytes, higher or equal quality, faster or equal) and better on one.
  Returned in order of increasing bytes (then decreasing quality).
  """
  pts = [(c.bytes(convention), -c.quality, c.ms_per_query) for c in candidates]
  front = [i for i, a in enumerate(pts)
           if not any(all(x <= y for x, y in zip(b, a)) and b != a for b in pts)]
  return sorted(front, key=lambda i: (pts[i][0], pts[i][1], pts[i][2]))


def choose(candidates, *, bytes_per_vector: float | None = None, quality: float | None = None,
           convention: str = "first-stage") -> int:
  """Index of the chosen candidate (see the module docstring); InputError if none qualifies."""
  if (bytes_per_vector is None) == (quality is None):
    raise ValueError(f"give bytes_per_vector or quality, exactly one (got {bytes_per_vector!r} "
                     f"and {quality!r})")
  if not candidates:
    raise InputError("no configurations to choose from")
  idx = range(len(candidates))
  b = lambda i: candidates[i].bytes(convention)
  if bytes_per_vector is not None:
    fits = [i for i in idx if b(i) <= bytes_per_vector + 1e-9]
    if not fits:
      small = min(idx, key=b)
      raise InputError(f"bytes_per_vector must allow at least one configuration: the smallest "
                       f"needs {b(small):g} bytes/vector ({candidates[small].label}, convention "
                       f"{convention}), got {bytes_per_vector:g}")
    return min(fits, key=lambda i: (-candidates[i].quality, b(i), candidates[i].ms_per_query))
  reach = [i for i in idx if candidates[i].relative >= quality - 1e-12]
  if not reach:
    best = max(idx, key=lambda i: candidates[i].relative)
    raise InputError(f"quality must be reachable: the best configuration keeps "
                     f"{candidates[best].relative:.4f} of full-size float32 quality "
                     f"({candidates[best].label}), got {quality:g}")
  return min(reach, key=lambda i: (b(i), -candidates[i].quality, candidates[i].ms_per_query))


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
  """The measured grid, its Pareto frontier and the chosen configuration.

  Attributes:
    candidates: every measured `Candidate`.
    frontier: indices into candidates (see `pareto_front`).
    choice: index of the chosen candidate.
    metric: "ndcg@k" (qrels) or "recall@k" (agreement with full-size float32 search).
    full_quality: the metric of full-size float32 exact search.
    k, d: results per query and vector size.
    convention: "first-stage" or "all" (see the module docstring).
    criterion: {"bytes_per_vector": B} or {"quality": Q}.
    n_queries, n_docs: the validation set.
    adaptor_fingerprint: the index's adaptor (None without one).
  """

  candidates: list
  frontier: list
  choice: int
  metric: str
  full_quality: float
  k: int
  d: int
  convention: str
  criterion: dict
  n_queries: int
  n_docs: int
  adaptor_fingerprint: str | None

  @property
  def chosen(self) -> Candidate:
    return self.candidates[self.choice]

  def config(self) -> dict:
    """The plan-file header (`plan_config`): the chosen stores and schedule."""
    return plan_config(d=self.d, k=self.k, adaptor_fingerprint=self.adaptor_fingerprint,
                       stores=self.chosen.to_dict()["stores"], schedule=self.chosen.schedule)

  def to_dict(self) -> dict:
    """The plan file: the header, then the choice, the frontier and every candidate."""
    out = self.config()
    out.update({"planner": "budget", "chosen": self.chosen.to_dict(), "metric": self.metric,
                "full_quality": self.full_quality, "convention": self.convention,
                "criterion": self.criterion, "n_queries": self.n_queries, "n_docs": self.n_docs,
                "frontier": [self.candidates[i].to_dict() for i in self.frontier],
                "candidates": [c.to_dict() for c in self.candidates]})
    return out

  def format_table(self) -> str:
    """A Markdown table of the frontier; the chosen row is marked with *."""
    rows = list(self.frontier)
    if self.choice not in rows:  # Cannot happen for a unique best, but ties may hide it.
      rows = sorted(rows + [self.choice], key=lambda i: self.candidates[i].bytes(self.convention))
    lines = [(f"| | bytes/vector in memory ({self.convention}) | stored bytes/vector | schedule | "
              f"{self.metric} | % of full float32 | ms/query |"), "|---|---|---|---|---|---|---|"]
    for i in rows:
      c = self.candidates[i]
      lines.append(f"| {'*' if i == self.choice else ''} | {c.bytes(self.convention):g} | "
                   f"{c.stored_bytes:g} | {c.label} | {c.quality:.4f} | {100 * c.relative:.1f}% | "
                   f"{c.ms_per_query:.3f} |")
    return "\n".join(lines)

  def plot(self, path, *, title: str = "") -> None:
    """Frontier PNG: relative quality vs bytes/vector (log), frontier coloured by ms/query."""
    plot_frontier(self.candidates, self.frontier, self.choice, path, convention=self.convention,
                  metric=self.metric, budget=self.criterion.get("bytes_per_vector"), title=title)


def plot_frontier(candidates, frontier, choice, path, *, convention="first-stage",
                  metric="ndcg@10", budget=None, title="") -> None:
  """Scatter of every candidate, the frontier coloured by query time, the choice starred."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
  xs = np.array([c.bytes(convention) for c in candidates])
  ys = np.array([100 * c.relative for c in candidates])
  ax.scatter(xs, ys, s=10, c="lightgrey", label="measured")
  f = np.asarray(frontier, dtype=int)
  if len(f):
    times = np.array([candidates[i].ms_per_query for i in f])
    sc = ax.scatter(xs[f], ys[f], s=28, c=times, cmap="viridis", label="Pareto frontier",
                    zorder=3)
    fig.colorbar(sc, ax=ax, label="ms / query")
  c = candidates[choice]
  ax.scatter([xs[choice]], [ys[choice]], marker="*", s=220, c="red", zorder=4,
             label=f"chosen: {c.label}")
  if budget is not None:
    ax.axvline(budget, color="red", ls="--", lw=0.8)
  ax.axhline(100, color="black", lw=0.6)
  ax.set_xscale("log", base=2)
  ax.set_xlabel(f"bytes / vector in memory ({convention})")
  ax.set_ylabel(f"{metric}, % of full-size float32")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower right")
  from adaptor.evaluation import save_figure
  save_figure(fig, path)


def measure(index, queries, schedule, *, k: int, qrels=None, query_ids=None, reference=None,
            repeats: int = 3, query_batch: int = 256,
            time_queries: int | None = None) -> tuple[float, float]:
  """Quality and median time of one schedule on adapted queries.

  Args:
    index: a `MatryoshkaIndex` holding the stores the schedule reads.
    queries: adapted queries, with shape [n_q, d] (float32).
    schedule: (dim, keep[, precision]) stages.
    k: results per query.
    qrels, query_ids: for nDCG@k; else `reference` rows [n_q, k] give recall@k.
    repeats: timed runs (after one untimed run that compiles).
    time_queries: time only the first this many queries (default all); the
      quality is always measured on all of them.

  Returns:
    (quality, ms_per_query).
  """
  run = lambda q: index.search_rows(q, k, schedule=schedule, adapted=True,
                                    query_batch=query_batch)
  scores, rows = run(queries)
  timed = queries if time_queries is None else queries[:time_queries]
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    run(timed)
    times.append(time.perf_counter() - t)
  ms = 1000 * float(np.median(times)) / timed.shape[0] if times else float("nan")
  if qrels is not None:
    quality = evaluate_topk(rows, scores, query_ids, index.ids, qrels, k_values=(k,))[f"ndcg@{k}"]
  else:
    quality = topk_overlap(rows, reference)
  return float(quality), ms


def plan_budget(index, query_embeddings, *, k: int = 10, qrels=None, query_ids=None,
                bytes_per_vector: float | None = None, quality: float | None = None,
                grid: Grid | None = None, convention: str = "first-stage", repeats: int = 3,
                time_queries: int | None = 256, adapted: bool = False, query_batch: int = 256,
                progress=None) -> BudgetPlan:
  """Measures the grid on validation queries and chooses a configuration.

  Args:
    index: a `MatryoshkaIndex` (its float vectors are used as they are; the
      stores the grid needs are added to a view of it, not to it).
    query_embeddings: validation queries, raw [n_q, d_in] (or adapted [n_q, d]
      with adapted=True).
    k: results per query (nDCG@k / recall@k).
    qrels, query_ids: judgements {query id: {doc id: grade}} and the ids of
      the query rows; without qrels, quality is recall@k against full-size
      float32 exact search.
    bytes_per_vector: choose the best quality within this many bytes/vector.
    quality: or the fewest bytes reaching this share of full-size float32
      quality (e.g. 0.98); default 0.98 when neither is given.
    grid: the configurations to measure (default `Grid()`).
    convention: "first-stage" or "all" (see the module docstring).
    repeats: timed runs per configuration.
    time_queries: queries per timed run (one batch by default; None: all).
    adapted: the queries are already adapted.
    query_batch: queries per search batch.
    progress: optional fn(str) called after each configuration.

  Returns:
    A `BudgetPlan`.
  """
  if convention not in CONVENTIONS:
    raise InputError(f"convention must be one of {list(CONVENTIONS)}, got {convention!r}")
  if bytes_per_vector is not None and quality is not None:
    raise InputError(f"give bytes_per_vector or quality, not both (got {bytes_per_vector!r} "
                     f"and {quality!r})")
  if bytes_per_vector is not None and not bytes_per_vector > 0:
    raise InputError(f"bytes_per_vector must be > 0, got {bytes_per_vector!r}")
  if quality is not None and not quality > 0:
    raise InputError(f"quality must be a share of full-size quality > 0 (e.g. 0.98), got {quality!r}")
  if bytes_per_vector is None and quality is None:
    quality = DEFAULT_QUALITY
  d, n = index.d, index.n
  k = check_k(k, n, what="the index size")
  q = index.prepare_queries(query_embeddings, adapted=adapted)
  if qrels is not None:
    if query_ids is None or len(query_ids) != q.shape[0]:
      raise InputError(f"query_ids must name the {q.shape[0]} validation queries when qrels are "
                       f"given, got {None if query_ids is None else len(query_ids)}")
    qrels = {qid: qrels[qid] for qid in query_ids if qid in qrels}
    if not qrels:
      raise InputError("qrels must judge at least one of the validation queries, got none")
  schedules = candidate_schedules(d, k, n, grid)
  itemsize = np.dtype(index.vectors.dtype).itemsize
  sizes = [schedule_bytes(sch, d, float_itemsize=itemsize) for sch in schedules]
  if bytes_per_vector is not None:  # Refused before anything is measured.
    key = "first_stage" if convention == "first-stage" else "stored"
    small = min(range(len(schedules)), key=lambda i: sizes[i][key])
    if sizes[small][key] > bytes_per_vector + 1e-9:
      raise InputError(f"bytes_per_vector must allow at least one configuration: the smallest "
                       f"needs {sizes[small][key]:g} bytes/vector "
                       f"({format_schedule(schedules[small])}, convention {convention}), "
                       f"got {bytes_per_vector:g}")
  work = index.view()
  needed = {st for sch in schedules for st in stores_for(sch)}
  binary = [m for p, m in needed if p == "binary"]
  if binary:  # One binary store serves every shorter binary prefix.
    work.add_store("binary", max(binary))
  for m in sorted(m for p, m in needed if p == "int8"):
    work.add_store("int8", m)
  _, reference = work.search_rows(q, k, dim=d, adapted=True, query_batch=query_batch)
  candidates = []
  for schedule, size in zip(schedules, sizes):
    qual, ms = measure(work, q, schedule, k=k, qrels=qrels, query_ids=query_ids,
                       reference=reference, repeats=repeats, query_batch=query_batch,
                       time_queries=time_queries)
    candidates.append([schedule, size["first_stage"], size["stored"], qual, ms])
    if progress is not None:
      progress(f"{format_schedule(schedule)}: quality {qual:.4f}, {ms:.3f} ms/query "
               f"({len(candidates)}/{len(schedules)})")
  full = next(c[3] for c in candidates if c[0] == ((d, k, "float32"),))
  if not full > 0:
    raise InputError(f"full-size float32 search scores {full} on the validation queries; "
                     f"expected > 0 to measure relative quality")
  candidates = [Candidate(schedule=s, memory_bytes=mb, stored_bytes=sb, quality=qq,
                          relative=qq / full, ms_per_query=ms) for s, mb, sb, qq, ms in candidates]
  choice = choose(candidates, bytes_per_vector=bytes_per_vector, quality=quality,
                  convention=convention)
  criterion = ({"bytes_per_vector": bytes_per_vector} if bytes_per_vector is not None
               else {"quality": quality})
  return BudgetPlan(candidates=candidates, frontier=pareto_front(candidates, convention),
                    choice=choice, metric=f"{'ndcg' if qrels is not None else 'recall'}@{k}",
                    full_quality=full, k=k, d=d, convention=convention, criterion=criterion,
                    n_queries=q.shape[0], n_docs=n, adaptor_fingerprint=_fingerprint(index))


# ---------------------------------------------------------------- plan files


def plan_config(*, d: int, k: int, adaptor_fingerprint, stores, schedule) -> dict:
  """The header every plan file starts with, and all that `index build --config` needs.

  Args:
    d: the adapted size the plan is for.
    k: results per query.
    adaptor_fingerprint: `index.adaptor_fingerprint` of the adaptor, or None.
    stores: quantised stores to build, as [{"precision", "dims"}].
    schedule: the default funnel, (dim, keep[, precision]) stages; written
      as [[dim, keep, precision], ...].
  """
  return {"format": _CONFIG_FORMAT, "format_version": _CONFIG_VERSION, "d": int(d), "k": int(k),
          "adaptor_fingerprint": adaptor_fingerprint, "stores": list(stores),
          "schedule": [list(Stage(*st)) for st in schedule]}


def write_plan(plan: Plan | BudgetPlan, path) -> None:
  """Writes either planner's plan as JSON, atomically: its header (`config()`), then its details."""
  with atomic_file(path) as f:
    json.dump(plan.to_dict(), f, indent=2)
    f.write("\n")


def read_plan(path) -> dict:
  """Reads and checks a plan file (see the module docstring); InputError naming what is wrong.

  Returns:
    the whole file as a dict; its "stores" and "schedule" are checked against its "d".
  """
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise InputError(f"{path}: expected a plan JSON from `matryoshka-adaptor plan`, got error: "
                     f"{e}") from None
  if not isinstance(config, dict) or config.get("format") != _CONFIG_FORMAT or \
      config.get("format_version") != _CONFIG_VERSION:
    found = (f"format {config.get('format')!r} format_version {config.get('format_version')!r}"
             if isinstance(config, dict) else f"a JSON {type(config).__name__}")
    raise InputError(f"{path}: expected a {_CONFIG_FORMAT} format_version {_CONFIG_VERSION}, "
                     f"found {found}")
  missing = [key for key in ("d", "stores", "schedule") if key not in config]
  if missing:
    raise InputError(f"{path}: expected keys d, stores and schedule, missing {missing}")
  try:
    check_schedule(config["schedule"], int(config["d"]))
    stores = [(st["precision"], int(st["dims"])) for st in config["stores"]]
  except (ValueError, TypeError, KeyError) as e:
    raise InputError(f"{path}: bad stores or schedule: {e}") from None
  for p, m in stores:
    if p not in quant.QUANTISED:
      raise InputError(f"{path}: store precision must be one of {list(quant.QUANTISED)}, got {p!r}")
    quant.check_store_dims(p, m, int(config["d"]), name=f"{path}: {p} store dims")
  return config
