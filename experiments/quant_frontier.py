"""Quantised Matryoshka prefixes on SciFact: the budget frontier, sentence-transformers' recipe, Hamming speed.

Quality part (default), for each model (all-MiniLM-L6-v2, d=384; all-mpnet-base-v2,
d=768) and each adaptor setting (none; unsupervised and supervised adaptors fitted on
the train split, or loaded from <adaptors>/<model>-<setting> when there):
  - `plan.plan_budget` measures the default grid (single-stage float32 / int8 /
    binary at 32, 64, ... dims, and 2-3 stage funnels) on the 809 train queries
    (validation, nDCG@10 against the train qrels), and chooses the best configuration
    within 32x and 64x less memory than full-size float32 (4d/32 and 4d/64 bytes per
    vector), under both memory conventions of adaptor/plan.py: "first-stage" (what
    the first stage scans; as sentence-transformers counts it) and "all" (every store
    the funnel reads held in memory);
  - every measured configuration is then run on the 300 test queries; tables report
    test nDCG@10 and its share of the full-size float32 nDCG@10 of the raw model
    (no adaptor), next to sentence-transformers' recipe: binary index over all d bits,
    top rescore_multiplier * k = 40 by Hamming distance, rescored with the float query
    . int8 documents (ST's min/max int8 codes, calibrated on the corpus), top 10 -
    re-implemented in numpy as ST does it, and the same funnel through this library
    (d:40:binary,d:10:int8, whose int8 stage dequantises with the saved offsets and scales).
Speed part (--speed, separate): exact top-10 over a synthetic 1,000,000 x 768 corpus,
single-threaded, float32 vs int8 vs binary (Hamming) at 256 and 768 dims, medians.

Run (both models, all adaptors; fits the four adaptors first if <out>/adaptors lacks them,
which takes ~25 minutes on this 2-core machine; with them in place, ~10 minutes):
  python experiments/quant_frontier.py --data ../shared/data/scifact --out results/quant_frontier

Speed (1M x 768 synthetic, one thread, ~5 minutes, ~5 GB of memory):
  python experiments/quant_frontier.py --speed --out results/quant_frontier

Run locally in about a minute (shipped MiniLM data, no adaptors, small grid, 100k docs):
  python experiments/quant_frontier.py --smoke
  python experiments/quant_frontier.py --smoke --speed
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from pathlib import Path

import numpy as np

from common import median_time, use_one_cpu, write_results

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Config:
  data: str = str(REPO.parent / "shared" / "data" / "scifact")
  models: tuple[str, ...] = ("all-MiniLM-L6-v2", "all-mpnet-base-v2")
  settings: tuple[str, ...] = ("none", "unsupervised", "supervised")
  adaptors: str | None = None          # default <out>/adaptors
  k: int = 10
  reductions: tuple[int, ...] = (32, 64)   # memory budgets: 4d / reduction bytes per vector
  grid_dims: tuple[int, ...] | None = None  # None: 32, 64, ... and d
  repeats: int = 3
  st_multiplier: int = 4               # sentence-transformers' rescore_multiplier in its recipe
  fit_steps: int | None = None         # None: library defaults
  seed: int = 0
  out: str = "results/quant_frontier"
  # --speed
  n_docs: int = 1_000_000
  d: int = 768
  n_queries: int = 256
  speed_dims: tuple[int, ...] = (256, 768)
  speed_repeats: int = 3
  threads: str = "1"                   # "1" or "all"


def smoke_config() -> Config:
  return Config(data=str(REPO / "data" / "scifact"), models=("all-MiniLM-L6-v2",),
                settings=("none",), grid_dims=(64, 128, 384), repeats=1,
                out="results/quant_frontier-smoke", n_docs=100_000, d=384, n_queries=64,
                speed_dims=(384,), speed_repeats=2)


# ---------------------------------------------------------------- helpers


def st_recipe(corpus, queries, k: int, multiplier: int) -> tuple[np.ndarray, np.ndarray]:
  """sentence-transformers' binary search + int8 rescoring, re-implemented in numpy.

  As in ST's quantize_embeddings and its retrieval demo: documents binarised as
  packed (x > 0) bits and coded int8 as trunc((x - min) / ((max - min) / 255) - 128)
  with per-dimension min/max over the corpus; the binarised query finds the
  multiplier * k documents of smallest Hamming distance over all d bits; those are
  rescored by the float32 query . int8 codes (no dequantisation) and the best k kept.

  Args:
    corpus: document vectors, with shape [n, d] (float32).
    queries: query vectors, with shape [n_q, d] (float32).

  Returns:
    (scores, rows), [n_q, k] each.
  """
  lo, hi = corpus.min(axis=0), corpus.max(axis=0)
  step = (hi - lo) / 255
  step = np.where(step > 0, step, 1.0)   # A constant dimension (ST would divide by zero).
  codes = ((corpus - lo) / step - 128).astype(np.int8)
  # Hamming distance of the sign bits, as (d - (+-1 query) . (+-1 doc)) / 2: exact in float32.
  signs = lambda x: np.where(x > 0, 1.0, -1.0).astype(np.float32)
  dist = (corpus.shape[1] - signs(queries) @ signs(corpus).T) / 2
  short = np.argsort(dist, axis=1, kind="stable")[:, :multiplier * k]   # ties: lower index
  scores = np.einsum("qd,qcd->qc", queries.astype(np.float32), codes[short].astype(np.float32))
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, order, 1), np.take_along_axis(short, order, 1)


def get_adaptor(cfg: Config, data, model_name: str, setting: str):
  """None, or the adaptor of a setting, loaded from <adaptors>/<model>-<setting> or fitted there."""
  import adaptor
  if setting == "none":
    return None, 0.0
  path = Path(cfg.adaptors or os.path.join(cfg.out, "adaptors")) / f"{model_name}-{setting}"
  if (path / "COMPLETE").is_file():
    return adaptor.load(path), 0.0
  train_q, train_ids, train_qrels = data.split_queries("train")
  extra = {} if cfg.fit_steps is None else {"steps": cfg.fit_steps, "supervised_steps": cfg.fit_steps}
  if setting == "supervised":
    extra.update(qrels=train_qrels, query_ids=train_ids, corpus_ids=data.corpus.ids)
  t = time.perf_counter()
  model = adaptor.fit(data.corpus.vectors, queries=train_q, seed=cfg.seed, quiet=True, **extra)
  model.save(path)
  took = time.perf_counter() - t
  print(f"  fitted the {setting} adaptor for {model_name} in {took:.0f} s -> {path}", flush=True)
  return model, took


# ---------------------------------------------------------------- quality


def run_model(cfg: Config, model_name: str) -> dict:
  import adaptor
  from adaptor import plan as plan_lib
  from adaptor.search import format_schedule
  from adaptor.index import MatryoshkaIndex

  data = adaptor.load_beir(cfg.data, model_name)
  corpus = np.asarray(data.corpus.vectors, np.float32)
  d, k = corpus.shape[1], cfg.k
  train_q, train_ids, train_qrels = data.split_queries("train")
  test_q, test_ids, test_qrels = data.split_queries("test")
  budgets = {r: 4 * d / r for r in cfg.reductions}
  grid = plan_lib.Grid(dims=cfg.grid_dims)

  def ndcg(index, q, schedule):
    s, rows = index.search_rows(q, k, schedule=schedule, adapted=True)
    return adaptor.evaluate_topk(rows, s, test_ids, data.corpus.ids, test_qrels,
                                 k_values=(k,))[f"ndcg@{k}"]

  out = {"d": d, "budgets": budgets, "settings": {}}
  raw_full = None
  for setting in cfg.settings:
    t0 = time.perf_counter()
    model, fit_s = get_adaptor(cfg, data, model_name, setting)
    index = MatryoshkaIndex.build(corpus, ids=data.corpus.ids, adaptor=model, dims=())
    t = time.perf_counter()
    plan = plan_lib.plan_budget(index, train_q, k=k, qrels=train_qrels, query_ids=train_ids,
                                bytes_per_vector=budgets[cfg.reductions[0]], grid=grid,
                                repeats=cfg.repeats)
    plan_s = time.perf_counter() - t
    # Test nDCG@10 of every measured configuration, on an index holding the stores they read.
    work = index.view()
    needed = {st for c in plan.candidates for st in plan_lib.stores_for(c.schedule)}
    binary = [m for p, m in needed if p == "binary"]
    if binary:
      work.add_store("binary", max(binary))
    for m in sorted(m for p, m in needed if p == "int8"):
      work.add_store("int8", m)
    q_test = index.prepare_queries(test_q)
    test = [ndcg(work, q_test, c.schedule) for c in plan.candidates]
    if setting == "none":
      raw_full = test[next(i for i, c in enumerate(plan.candidates)
                           if c.schedule == ((d, k, "float32"),))]
    chosen = {}
    for r, b in budgets.items():
      for convention in plan_lib.CONVENTIONS:
        i = plan_lib.choose(plan.candidates, bytes_per_vector=b, convention=convention)
        chosen[f"{r}x/{convention}"] = {**plan.candidates[i].to_dict(), "test_ndcg": test[i]}
    # sentence-transformers' recipe, as ST does it (numpy), and through this library.
    vectors = np.asarray(index.vectors, np.float32)
    s, rows = st_recipe(vectors, q_test, k, cfg.st_multiplier)
    st = adaptor.evaluate_topk(rows, s, test_ids, data.corpus.ids, test_qrels,
                               k_values=(k,))[f"ndcg@{k}"]
    work.add_store("int8", d)
    st_lib = ndcg(work, q_test, ((d, cfg.st_multiplier * k, "binary"), (d, k, "int8")))
    frontier = [{**plan.candidates[i].to_dict(), "test_ndcg": test[i]} for i in plan.frontier]
    out["settings"][setting] = {
        "fit_seconds": fit_s, "plan_seconds": plan_s, "seconds": time.perf_counter() - t0,
        "n_candidates": len(plan.candidates), "train_full": plan.full_quality,
        "test_full": test[next(i for i, c in enumerate(plan.candidates)
                              if c.schedule == ((d, k, "float32"),))],
        "chosen": chosen, "st_recipe": st, "st_recipe_library": st_lib,
        "st_schedule": format_schedule(((d, cfg.st_multiplier * k, "binary"),
                                              (d, k, "int8"))),
        "frontier": frontier,
        "candidates": [{**c.to_dict(), "test_ndcg": t_} for c, t_ in zip(plan.candidates, test)]}
    plan.plot(os.path.join(cfg.out, f"frontier-{model_name}-{setting}.png"),
              title=f"SciFact {model_name}, adaptor: {setting} (train queries)")
    print(f"  {model_name} / {setting}: {len(plan.candidates)} configurations planned in "
          f"{plan_s:.0f} s, total {time.perf_counter() - t0:.0f} s", flush=True)
  out["raw_full"] = raw_full
  return out


def _pct(v, ref):
  return f"{v:.4f} ({100 * v / ref:.1f}%)" if ref else f"{v:.4f}"


def quality_tables(cfg: Config, res: dict) -> str:
  lines = []
  for model_name, r in res["models"].items():
    d, ref = r["d"], r["raw_full"]
    lines += ["", (f"### {model_name} (d={d}): SciFact test nDCG@10 (% of full-size float32 "
                   f"without adaptor, {ref:.4f}); planned on the train queries"), ""]
    head = "| adaptor | full float32 (" + f"{4 * d} B)"
    for red in cfg.reductions:
      head += f" | {red}x ({4 * d / red:g} B/vector in memory): planned config | nDCG@10"
    head += (f" | ST recipe (binary {d} bits -> top {cfg.st_multiplier * cfg.k} -> float q . "
             f"int8), {d // 8} B | same funnel, this library |")
    lines += [head, "|---|---|" + "---|---|" * len(cfg.reductions) + "---|---|"]
    for setting, s in r["settings"].items():
      row = f"| {setting} | {_pct(s['test_full'], ref)}"
      for red in cfg.reductions:
        c = s["chosen"][f"{red}x/first-stage"]
        row += f" | `{c['label']}` (stored {c['stored_bytes']:g} B) | {_pct(c['test_ndcg'], ref)}"
      row += f" | {_pct(s['st_recipe'], ref)} | {_pct(s['st_recipe_library'], ref)} |"
      lines.append(row)
    lines += ["", "Everything the funnel reads held in memory (convention \"all\"):", "",
              "| adaptor |" + "".join(f" {red}x ({4 * d / red:g} B): planned config | nDCG@10 |"
                                      for red in cfg.reductions),
              "|---|" + "---|---|" * len(cfg.reductions)]
    for setting, s in r["settings"].items():
      row = f"| {setting} |"
      for red in cfg.reductions:
        c = s["chosen"][f"{red}x/all"]
        row += f" `{c['label']}` ({c['stored_bytes']:g} B) | {_pct(c['test_ndcg'], ref)} |"
      lines.append(row)
  return "\n".join(lines)


def targets(cfg: Config, res: dict) -> str:
  """The issue's targets: >= 95% of full float32 nDCG@10 at 32x less memory, >= 90% at 64x."""
  want = {32: 0.95, 64: 0.90}
  lines = ["Targets (share of the raw model's full-size float32 test nDCG@10, best planned "
           "configuration; first-stage / all-in-memory conventions):"]
  for model_name, r in res["models"].items():
    for setting, s in r["settings"].items():
      parts = []
      for red in cfg.reductions:
        if red not in want:
          continue
        got = [s["chosen"][f"{red}x/{c}"]["test_ndcg"] / r["raw_full"] for c in ("first-stage", "all")]
        parts.append(f"{red}x >= {want[red]:.0%}: {got[0]:.1%} "
                     f"({'met' if got[0] >= want[red] else 'missed'}) / {got[1]:.1%} "
                     f"({'met' if got[1] >= want[red] else 'missed'})")
      lines.append(f"- {model_name}, adaptor {setting}: " + "; ".join(parts))
  return "\n".join(lines)


def frontier_table(cfg: Config, res: dict, model_name: str, setting: str) -> str:
  """Bytes-quality frontier (best train nDCG@10 at each memory size), with test nDCG@10."""
  r = res["models"][model_name]
  s, ref = r["settings"][setting], r["raw_full"]
  best, rows = -1.0, []
  for c in sorted(s["candidates"], key=lambda c: (c["memory_bytes"], -c["quality"])):
    if c["quality"] > best + 1e-9:
      best = c["quality"]
      rows.append(c)
  lines = [(f"#### {model_name}, adaptor {setting}: bytes/vector vs quality frontier "
            f"({s['n_candidates']} configurations; the 3-D frontier with time is in results.json)"),
           "", ("| B/vector in memory (first stage) | stored B/vector | schedule | nDCG@10 train | "
                "nDCG@10 test (% of raw full float32) | ms/query (train queries) |"),
           "|---|---|---|---|---|---|"]
  for c in rows:
    lines.append(f"| {c['memory_bytes']:g} | {c['stored_bytes']:g} | `{c['label']}` | "
                 f"{c['quality']:.4f} | {_pct(c['test_ndcg'], ref)} | {c['ms_per_query']:.3f} |")
  return "\n".join(lines)


# ---------------------------------------------------------------- speed


def speed(cfg: Config) -> dict:
  """Exact top-k ms/query over a synthetic corpus: float32 vs int8 vs binary at each dim."""
  from adaptor.index import MatryoshkaIndex
  from adaptor.truncation import aligned_empty
  rng = np.random.default_rng(cfg.seed)
  # Coordinate variance decays along the vector, as in experiments/bench_search.py.
  scale = np.linspace(1.0, 0.2, cfg.d).astype(np.float32)
  t = time.perf_counter()
  vectors = aligned_empty((cfg.n_docs, cfg.d), np.float32)
  for s in range(0, cfg.n_docs, 65536):
    x = rng.standard_normal((min(65536, cfg.n_docs - s), cfg.d), dtype=np.float32) * scale
    vectors[s:s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
  index = MatryoshkaIndex(vectors, [str(i) for i in range(cfg.n_docs)])
  index.add_store("binary", max(cfg.speed_dims))
  for m in cfg.speed_dims:
    index.add_store("int8", m)
  queries = rng.standard_normal((cfg.n_queries, cfg.d), dtype=np.float32) * scale
  print(f"speed: built {index!r} in {time.perf_counter() - t:.0f} s", flush=True)
  out = {}
  for m in cfg.speed_dims:
    out[str(m)] = {}
    for precision in ("float32", "int8", "binary"):
      # The library's exact search with its own default block and batch sizes.
      run = functools.partial(index.search_rows, queries, cfg.k, dim=m, precision=precision,
                              adapted=True)
      run()                                                     # compiles
      sec = median_time(run, cfg.speed_repeats)
      out[str(m)][precision] = {"ms_per_query": 1000 * sec / cfg.n_queries,
                                "bytes_per_vector": {"float32": 4 * m, "int8": m,
                                                     "binary": m / 8}[precision]}
      print(f"speed: dim {m} {precision}: {1000 * sec / cfg.n_queries:.3f} ms/query", flush=True)
  return out


def speed_table(cfg: Config, res: dict) -> str:
  lines = [(f"### Exact top-{cfg.k}, {cfg.n_docs:,} x {cfg.d} synthetic, {cfg.n_queries} queries, "
            f"threads: {cfg.threads} (median of {cfg.speed_repeats})"), "",
           ("| dims | precision | bytes/vector | ms/query | queries/s | "
            "speed-up vs float32 at the same dims |"),
           "|---|---|---|---|---|---|"]
  for m, row in res.items():
    base = row["float32"]["ms_per_query"]
    for p, r in row.items():
      lines.append(f"| {m} | {p} | {r['bytes_per_vector']:g} | {r['ms_per_query']:.3f} | "
                   f"{1000 / r['ms_per_query']:.1f} | {base / r['ms_per_query']:.2f}x |")
  return "\n".join(lines)


# ---------------------------------------------------------------- main


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="shipped data, small sizes")
  parser.add_argument("--speed", action="store_true", help="only the 1M-document speed part")
  parser.add_argument("--data", help="BEIR-layout SciFact folder")
  parser.add_argument("--models", help="comma-separated model folders")
  parser.add_argument("--settings", help="comma-separated adaptor settings: none,unsupervised,supervised")
  parser.add_argument("--adaptors", help="folder of fitted adaptors <model>-<setting> "
                      "(default <out>/adaptors; missing ones are fitted and saved there)")
  parser.add_argument("--repeats", type=int, help="timed runs per configuration")
  parser.add_argument("--n-docs", type=int, help="--speed corpus size")
  parser.add_argument("--n-queries", type=int, help="--speed queries")
  parser.add_argument("--threads", choices=["1", "all"], help="--speed threads (default 1)")
  parser.add_argument("--out", help="results folder")
  args = parser.parse_args(argv)
  cfg = smoke_config() if args.smoke else Config()
  for field in ("data", "adaptors", "repeats", "n_docs", "n_queries", "threads", "out"):
    if getattr(args, field) is not None:
      setattr(cfg, field, getattr(args, field))
  if args.models:
    cfg.models = tuple(args.models.split(","))
  if args.settings:
    cfg.settings = tuple(args.settings.split(","))
  if args.speed and cfg.threads == "1":
    use_one_cpu()  # Before JAX and XLA start (imported below).
  sys.path.insert(0, str(REPO))
  from adaptor.evaluation import write_json

  t0 = time.perf_counter()
  if args.speed:
    res = {"config": dataclasses.asdict(cfg), "speed": speed(cfg)}
    res["seconds"] = time.perf_counter() - t0
    table = speed_table(cfg, res["speed"])
    print("\n" + table + f"\n\n(total {res['seconds']:.0f} s)")
    write_json(res, os.path.join(cfg.out, "speed.json"))
    Path(cfg.out, "speed.md").write_text(table + "\n")
    print(f"wrote {cfg.out}/speed.json and {cfg.out}/speed.md")
    return 0
  if not os.path.isdir(cfg.data):
    parser.error(f"--data {cfg.data} is not a folder (the SciFact data in BEIR layout)")
  res = {"config": dataclasses.asdict(cfg), "models": {}}
  for model_name in cfg.models:
    res["models"][model_name] = run_model(cfg, model_name)
  res["seconds"] = time.perf_counter() - t0
  tables = [quality_tables(cfg, res), "", targets(cfg, res)]
  for model_name in cfg.models:
    for setting in cfg.settings:
      tables.append("\n" + frontier_table(cfg, res, model_name, setting))
  table = "\n".join(tables)
  print(table + f"\n\n(total {res['seconds']:.0f} s)")
  write_results(cfg.out, res, table, also=f" and {cfg.out}/frontier-*.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
