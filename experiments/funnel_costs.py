"""Measured cost of each funnel stage, and how well `search.schedule_cost` predicts it.

The recall-target planner (`plan.plan_schedule`) ranks candidate funnels by the estimate of
`search.schedule_cost`, so its constants should follow what the stages really
cost. This script times, on a synthetic n_docs x 768 float32 index, one thread:

  1. first stages alone, (m1, K1) for m1 in 16, 32, 64, 128 and K1 in 10 ... 2000
     (an exact blocked top-K1 over the whole corpus at the m1-prefix);
  2. re-rank stages, (m, keep) over P scattered candidates, for P in 100 ... 2000
     and m in 64, 128, 256, 768;
  3. whole funnels, next to full-size exact search, with the estimated and the
     measured speed-up over it,

and prints the tables with the model's estimate beside each measurement (both
in ms per query; the model's constants are this script's least-squares fit,
printed at the end, from its run on one pinned CPU of a 2-core AMD EPYC), so
a machine that differs from the model shows as ratios far from 1. The planner
only ranks estimates, so a uniform ratio does not matter.

Run (1M docs, one thread, ~8 minutes, ~4 GB of memory):
  python experiments/funnel_costs.py --out results/funnel_costs
Run locally in a minute (100k docs):
  python experiments/funnel_costs.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from common import median_time, synthetic, use_one_cpu, write_results

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Config:
  n_docs: int = 1_000_000
  d: int = 768
  n_queries: int = 1000
  first_dims: tuple[int, ...] = (16, 32, 64, 128)
  first_keeps: tuple[int, ...] = (10, 100, 200, 500, 1000, 2000)
  rerank_inputs: tuple[int, ...] = (100, 200, 500, 1000, 2000)
  rerank_dims: tuple[int, ...] = (64, 128, 256, 768)
  funnels: tuple[str, ...] = (
      "16:1000,64:100,768:10", "16:500,128:50,768:10", "16:200,768:10", "32:1000,768:10",
      "32:500,128:50,768:10", "32:200,768:10", "64:300,768:10", "64:100,768:10",
      "128:100,768:10")
  repeats: int = 3
  seed: int = 0
  out: str = "results/funnel_costs"


def smoke_config() -> Config:
  return Config(n_docs=100_000, n_queries=200, first_dims=(16, 64), first_keeps=(10, 200),
                rerank_inputs=(200,), rerank_dims=(64, 768),
                funnels=("16:200,768:10", "64:100,768:10"), repeats=1,
                out="results/funnel_costs-smoke")


def _parse(text: str) -> list[tuple[int, int]]:
  from adaptor.quant import parse_schedule  # the CLI's DIM:KEEP,... parser
  return parse_schedule(text)


def measure(cfg: Config) -> dict:
  import jax
  import jax.numpy as jnp

  from adaptor import topk
  from adaptor.index import MatryoshkaIndex
  from adaptor.truncation import aligned_empty, truncate

  vectors = synthetic(cfg.n_docs, cfg.d, cfg.seed, 1,
                      out=aligned_empty((cfg.n_docs, cfg.d), np.float32))
  vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
  index = MatryoshkaIndex(vectors, [str(i) for i in range(cfg.n_docs)])
  queries = synthetic(cfg.n_queries, cfg.d, cfg.seed, 2)
  n_q = cfg.n_queries

  def per_query_ms(fn) -> float:
    fn()  # compile
    return 1000 * median_time(fn, cfg.repeats) / n_q

  res = {"first": [], "rerank": [], "funnels": []}
  full = per_query_ms(lambda: index.search_rows(queries, 10, adapted=True))
  res["full_ms"] = full
  print(f"full-size exact search: {full:.3f} ms/query", flush=True)
  for m in cfg.first_dims:
    for keep in cfg.first_keeps:
      ms = per_query_ms(lambda: index.search_rows(queries, keep, schedule=((m, keep),),
                                                  adapted=True))
      res["first"].append({"dim": m, "keep": keep, "ms": ms})
      print(f"first stage {m}:{keep}: {ms:.3f} ms/query", flush=True)

  corpus = topk.to_device(index.vectors)
  rng = np.random.default_rng(cfg.seed)
  for m in cfg.rerank_dims:
    scale = jnp.asarray(index.prefix_inv_norms(m))
    q = jnp.asarray(truncate(jnp.asarray(queries), m))
    for prev in cfg.rerank_inputs:
      cand = jnp.asarray(np.sort(rng.choice(cfg.n_docs, (n_q, prev)), axis=1).astype(np.int32))
      for keep in sorted({10, min(100, prev // 2)}):
        fn = jax.jit(lambda q, c, x, s, keep=keep, m=m: topk.rerank(
            topk.float_scorer(m), q, (x, s), c, keep, presorted=True))
        ms = per_query_ms(lambda: jax.block_until_ready(fn(q, cand, corpus, scale)))
        res["rerank"].append({"inputs": prev, "dim": m, "keep": keep, "ms": ms})
        print(f"re-rank {prev} -> {m}:{keep}: {ms:.3f} ms/query", flush=True)

  for text in cfg.funnels:
    schedule = _parse(text)
    if schedule[-1][0] != cfg.d or schedule[0][1] > cfg.n_docs:
      continue
    ms = per_query_ms(lambda: index.search_rows(queries, 10, schedule=schedule, adapted=True))
    res["funnels"].append({"schedule": text, "ms": ms})
    print(f"funnel {text}: {ms:.3f} ms/query", flush=True)
  return res


def fit(cfg: Config, res: dict) -> dict:
  """Least-squares constants of the cost model (search._SCAN_MS, _SELECT_MS, _RERANK_MS).

  First stages and full-size exact search (a first stage at d dims keeping
  10) fit scan + selection; re-rank stages fit the re-rank constants.
  """
  n = cfg.n_docs / 1e6
  rows = [(r["dim"], r["keep"], r["ms"]) for r in res["first"]] + [(cfg.d, 10, res["full_ms"])]
  a = np.array([[n, n * min(m, 256), n * max(m - 256, 0), k / 1000, k / 1000 * m]
                for m, k, _ in rows])
  scan = np.linalg.lstsq(a, np.array([ms for *_, ms in rows]), rcond=None)[0]
  b = np.array([[r["inputs"] / 1000, r["inputs"] / 1000 * r["dim"], r["keep"] / 1000]
                for r in res["rerank"]])
  rerank = np.linalg.lstsq(b, np.array([r["ms"] for r in res["rerank"]]), rcond=None)[0]
  return {"_SCAN_MS": [round(float(v), 5) for v in scan[:3]],
          "_SELECT_MS": [round(float(v), 5) for v in scan[3:]],
          "_RERANK_MS": [round(float(v), 6) for v in rerank]}


def _tables(cfg: Config, res: dict) -> str:
  import adaptor.search as search_lib
  n, d = cfg.n_docs, cfg.d
  exact = search_lib.schedule_cost(((d, 10),), n)
  lines = [f"Funnel stage costs, {n:,} x {d} float32, {cfg.n_queries} queries, one thread "
           f"(ms/query, medians of {cfg.repeats}), next to the model of search.schedule_cost; "
           f"full-size exact search: measured {res['full_ms']:.2f}, model {exact:.2f}.", "",
           "#### First stages", "", "| dim | keep | measured | model | model / measured |",
           "|---|---|---|---|---|"]
  for r in res["first"]:
    est = search_lib.first_stage_cost(n, r["dim"], r["keep"])
    lines.append(f"| {r['dim']} | {r['keep']} | {r['ms']:.3f} | {est:.3f} | {est / r['ms']:.2f} |")
  lines += ["", "#### Re-rank stages", "", "| candidates | dim | keep | measured | model | "
            "model / measured |", "|---|---|---|---|---|---|"]
  for r in res["rerank"]:
    est = search_lib.rerank_cost(r["inputs"], r["dim"], r["keep"])
    lines.append(f"| {r['inputs']} | {r['dim']} | {r['keep']} | {r['ms']:.3f} | {est:.3f} | "
                 f"{est / r['ms']:.2f} |")
  lines += ["", "#### Whole funnels", "", "| schedule | measured | model | speed-up over full "
            "(measured) | speed-up (model) |", "|---|---|---|---|---|"]
  for r in res["funnels"]:
    est = search_lib.schedule_cost(_parse(r["schedule"]), n)
    lines.append(f"| {r['schedule']} | {r['ms']:.3f} | {est:.3f} | {res['full_ms'] / r['ms']:.1f}x"
                 f" | {exact / est:.1f}x |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="100k docs; runs in about a minute")
  parser.add_argument("--out", help="results folder (default: results/funnel_costs)")
  parser.add_argument("--n-docs", type=int, help="synthetic corpus size")
  parser.add_argument("--all-threads", action="store_true",
                      help="let XLA use every core (default: this process is pinned to one CPU)")
  args = parser.parse_args(argv)
  if not args.all_threads:
    use_one_cpu()  # Before JAX starts.
  sys.path.insert(0, str(REPO))
  cfg = smoke_config() if args.smoke else Config()
  if args.out:
    cfg.out = args.out
  if args.n_docs:
    cfg.n_docs = args.n_docs
  t0 = time.perf_counter()
  res = {"config": dataclasses.asdict(cfg), "measured": measure(cfg)}
  res["fitted"] = fit(cfg, res["measured"])
  res["seconds"] = time.perf_counter() - t0
  table = _tables(cfg, res["measured"]) + "\n\nLeast-squares constants for this machine: " + ", ".join(
      f"{name} = {tuple(v)}" for name, v in res["fitted"].items())
  print("\n" + table + f"\n\n(total {res['seconds']:.0f} s)")
  write_results(cfg.out, res, table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
