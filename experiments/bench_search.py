"""Matryoshka search benchmark: exact search vs FAISS and numpy, funnel speed-up, quality, memory.

One run prints four tables and writes them all to <out>/results.json:

  1. Exact top-k throughput (queries/s) at several prefix dims on a synthetic
     n_docs x 768 float32 corpus: this library (MatryoshkaIndex, corpus stored
     once at full size) vs faiss.IndexFlatIP (given a contiguous, normalised
     copy of the prefix) vs numpy (blocked matmul + argpartition),
     single-threaded and with all threads; medians of `repeats` runs. With
     all threads the library is timed in one process (XLA spreads each
     matmul over the CPUs, nothing else) and with one pinned worker process
     per CPU (MatryoshkaIndex.start_workers, see adaptor/pool.py).
  2. Funnel search with the schedule planned on real data (table 3, mpnet)
     vs full-size exact search, on the same synthetic corpus: speed-up over
     FAISS and over this library's full-size search. Each funnel run
     alternates with a FAISS full-size run (`repeats` pairs, rounded up to
     even, half of them with FAISS first), and the speed-up over FAISS is
     the median of the per-pair ratios, so neither the machine's drift over
     minutes nor the order within a pair enters it (common.paired_times).
  3. Quality on SciFact (both models), with an adaptor fitted on the corpus and
     the train queries: nDCG@10 and recall@10 against full-size exact results
     for exact search at each dim and for the planned funnel, next to the time
     per query. The funnel is planned on the train queries (validation) and
     evaluated on the test queries.
  4. Peak RSS (VmHWM) of building, and of loading + searching, the synthetic
     index in float32 and float16, each measured in a fresh subprocess.

Timing runs in subprocesses so thread settings take effect before JAX, XLA,
OpenBLAS and FAISS start: single-threaded means the process is pinned to one
CPU (os.sched_setaffinity; XLA ignores its thread flags, see
common.use_one_cpu), OMP/OPENBLAS/MKL_NUM_THREADS=1 and
faiss.omp_set_num_threads(1).

Run (1M x 768 corpus, about 10 minutes on 2 cores; fits the two adaptors first
unless results/bench_search/adaptor-<model> already exist):
  python experiments/bench_search.py --out results/bench_search

Run locally in seconds (20k docs, 100 queries, shipped MiniLM data only):
  python experiments/bench_search.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import (median_time, paired_times, peak_rss_bytes, synthetic, use_one_cpu,
                    write_results)

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Config:
  data: str = str(REPO.parent / "shared" / "data" / "scifact")
  models: tuple[str, ...] = ("all-mpnet-base-v2", "all-MiniLM-L6-v2")
  plan_model: str = "all-mpnet-base-v2"  # whose planned funnel is timed at scale
  n_docs: int = 1_000_000
  d: int = 768
  n_queries: int = 1000
  k: int = 10
  dims: tuple[int, ...] = (64, 256, 768)
  repeats: int = 3
  threads: tuple[str, ...] = ("1", "all")
  # Planned with a margin on the train queries, so that the test queries
  # (unseen) still reach recall@10 >= 0.99 against full-size exact search.
  plan_target: float = 0.995
  parts: tuple[str, ...] = ("quality", "speed", "memory")
  # Funnels timed and measured besides the planned one: a binary first stage
  # (a store of packed sign bits, see adaptor/quant.py) rescored at full size.
  more_schedules: tuple[str, ...] = ("256:1000:binary,768:10",)
  platforms: tuple[str, ...] = ("cpu",)  # "gpu": one more speed run, JAX on the GPU
  fit_steps: int | None = None           # None: library defaults
  numpy_repeats: int = 1                 # the slowest baseline; one timed run per dim
  seed: int = 0
  out: str = "results/bench_search"


def smoke_config() -> Config:
  return Config(data=str(REPO / "data" / "scifact"), models=("all-MiniLM-L6-v2",),
                plan_model="all-MiniLM-L6-v2", n_docs=20_000, d=384, n_queries=100,
                dims=(64, 384), repeats=2, fit_steps=30, out="results/bench_search-smoke",
                more_schedules=("256:400:binary,384:10",))


# ---------------------------------------------------------------- helpers


def _synthetic(cfg: Config, n: int, salt: int) -> np.ndarray:
  return synthetic(n, cfg.d, cfg.seed, salt)


def _run_worker(cfg: Config, role: str, extra: dict, threads: str, platform: str = "cpu") -> dict:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = {"cpu": "cpu", "gpu": "cuda"}[platform]
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "out.json"
    payload = json.dumps({"config": dataclasses.asdict(cfg), "extra": extra, "threads": threads})
    subprocess.run([sys.executable, __file__, "--worker", role, "--payload", payload,
                    "--worker-out", str(out)], env=env, check=True)
    return json.loads(out.read_text())


def _parse_schedule(text: str) -> list[tuple]:
  """'256:1000:binary,768:10' -> Stages (the CLI's parser)."""
  from adaptor.search import parse_schedule
  return parse_schedule(text)


def _schedule_text(schedule) -> str:
  """The text of a schedule, as the CLI writes it: '256:1000:binary,768:10'."""
  from adaptor.search import format_schedule
  return format_schedule(schedule)


def _with_stores(index, schedule) -> list[tuple]:
  """The schedule as tuples, after adding the quantised stores its stages read."""
  for stage in schedule:
    if len(stage) == 3 and stage[2] != "float32":
      index.add_store(stage[2], stage[0])
  return [tuple(st) for st in schedule]


def _machine() -> dict:
  """What the numbers were measured on."""
  import platform
  info = {"cpus": os.cpu_count(), "platform": platform.platform()}
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        info["cpu"] = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  try:
    info["load_average"] = os.getloadavg()
  except OSError:
    pass
  return info


# ---------------------------------------------------------------- workers


def worker_speed(cfg: Config, extra: dict, threads: str) -> dict:
  """Tables 1 and 2 under one thread setting."""
  import faiss
  from adaptor.index import MatryoshkaIndex
  from adaptor.metrics import topk_overlap
  if threads == "1":
    faiss.omp_set_num_threads(1)
  k, reps = cfg.k, cfg.repeats
  index = MatryoshkaIndex.build(_synthetic(cfg, cfg.n_docs, 1), dims=(), precision="float32")
  queries = _synthetic(cfg, cfg.n_queries, 2)
  out = {"exact": {}, "funnel": {}}
  exact_rows = {}
  faiss_full = None   # (index, queries): full-size FAISS, timed again beside each funnel.
  import jax
  on_cpu = jax.default_backend() == "cpu"
  for dim in cfg.dims:
    index.prefix_inv_norms(dim)
    index.search_rows(queries, k, dim=dim, adapted=True)   # compile
    ours = median_time(lambda: index.search_rows(queries, k, dim=dim, adapted=True), reps)
    _, rows = index.search_rows(queries, k, dim=dim, adapted=True)
    exact_rows[dim] = rows
    if not on_cpu:  # FAISS and numpy run on the CPU: the CPU runs time them.
      out["exact"][str(dim)] = {"ours_qps": cfg.n_queries / ours, "ours_s": ours}
      print(f"[{jax.default_backend()}] exact dim {dim}: ours {ours:.3f}s", flush=True)
      continue
    # FAISS and numpy get a contiguous, normalised copy of the prefix (what they need).
    prefix = np.ascontiguousarray(index.vectors[:, :dim]) * index.prefix_inv_norms(dim)[:, None]
    q = queries[:, :dim] / np.linalg.norm(queries[:, :dim], axis=1, keepdims=True)
    q = np.ascontiguousarray(q, np.float32)
    flat = faiss.IndexFlatIP(dim)
    flat.add(prefix)
    flat.search(q[:10], k)
    t_faiss = median_time(lambda: flat.search(q, k), reps)
    _, faiss_rows = flat.search(q, k)

    def numpy_search():
      best_s = np.full((len(q), k), -np.inf, np.float32)
      best_i = np.zeros((len(q), k), np.int64)
      for s in range(0, prefix.shape[0], 65536):
        sc = q @ prefix[s:s + 65536].T
        part = np.argpartition(-sc, k, axis=1)[:, :k]
        cs = np.concatenate([best_s, np.take_along_axis(sc, part, 1)], 1)
        ci = np.concatenate([best_i, part + s], 1)
        top = np.argpartition(-cs, k, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cs, top, 1), np.take_along_axis(ci, top, 1)
      return best_s, best_i
    t_numpy = median_time(numpy_search, cfg.numpy_repeats)
    del prefix
    if dim == cfg.d:
      faiss_full = (flat, q)
    del flat
    out["exact"][str(dim)] = {
        "ours_qps": cfg.n_queries / ours, "faiss_qps": cfg.n_queries / t_faiss,
        "numpy_qps": cfg.n_queries / t_numpy, "ours_s": ours, "faiss_s": t_faiss,
        "numpy_s": t_numpy, "ours_over_faiss_time": ours / t_faiss,
        "agreement_with_faiss": topk_overlap(rows, faiss_rows)}
    print(f"[threads={threads}] exact dim {dim}: ours {ours:.2f}s faiss {t_faiss:.2f}s "
          f"numpy {t_numpy:.2f}s", flush=True)
  full = out["exact"][str(cfg.d)]
  out["funnels"] = []
  funnel_rows = []
  for schedule in [extra["schedule"]] + [_parse_schedule(t) for t in cfg.more_schedules]:
    schedule = _with_stores(index, schedule)
    rows, t, t_faiss, ratio = _timed(
        lambda: index.search_rows(queries, k, schedule=schedule, adapted=True), faiss_full, k, reps)
    funnel_rows.append(rows)
    out["funnels"].append({
        "schedule": [list(s) for s in schedule], "s": t, "qps": cfg.n_queries / t,
        "faiss_full_s_paired": t_faiss, "speedup_vs_faiss_full": ratio,
        "speedup_vs_ours_full": full["ours_s"] / t,
        "synthetic_recall_vs_full": topk_overlap(rows, exact_rows[cfg.d])})
    print(f"[threads={threads}] funnel {_schedule_text(schedule)}: {t:.2f}s"
          + (f" (faiss full beside it {t_faiss:.2f}s, {ratio:.2f}x)" if ratio else ""), flush=True)
  if threads == "all" and on_cpu:
    _time_workers(cfg, index, queries, out, exact_rows, funnel_rows, faiss_full)
  return out


def _timed(run, faiss_full, k: int, reps: int):
  """(rows, median s of run, median s of full-size FAISS beside it, median per-pair speed-up).

  The first call compiles (in every worker, with workers) and gives the rows.
  Without FAISS (a GPU run, or exact search) only run's time is measured.
  """
  rows = run()[1]
  if faiss_full is None:
    return rows, median_time(run, reps), None, None
  flat, q = faiss_full
  return (rows, *paired_times(run, lambda: flat.search(q, k), reps))


def _time_workers(cfg: Config, index, queries, out: dict, exact_rows: dict, funnel_rows: list,
                  faiss_full):
  """Adds the library's times with one pinned worker process per CPU (adaptor/pool.py)."""
  k, reps = cfg.k, cfg.repeats
  t = time.perf_counter()
  index.start_workers()
  out["workers"] = index.workers
  out["workers_start_s"] = time.perf_counter() - t
  try:
    for dim in cfg.dims:
      r = out["exact"][str(dim)]
      rows, took, _, _ = _timed(lambda: index.search_rows(queries, k, adapted=True, dim=dim),
                                None, k, reps)
      r.update({"workers_qps": cfg.n_queries / took, "workers_s": took,
                "workers_same_as_one_process": bool(np.array_equal(rows, exact_rows[dim]))})
      if "faiss_s" in r:
        r["workers_over_faiss_time"] = took / r["faiss_s"]
      print(f"[{index.workers} workers] exact dim {dim}: {took:.2f}s", flush=True)
    full = out["exact"][str(cfg.d)]
    for f, ref in zip(out["funnels"], funnel_rows):
      schedule = [tuple(s) for s in f["schedule"]]
      rows, took, t_faiss, ratio = _timed(
          lambda: index.search_rows(queries, k, adapted=True, schedule=schedule), faiss_full, k, reps)
      f.update({"workers_qps": cfg.n_queries / took, "workers_s": took,
                "workers_same_as_one_process": bool(np.array_equal(rows, ref)),
                "workers_faiss_full_s_paired": t_faiss, "workers_speedup_vs_faiss_full": ratio,
                "workers_speedup_vs_ours_full": full["workers_s"] / took})
      print(f"[{index.workers} workers] funnel {_schedule_text(f['schedule'])}: {took:.2f}s"
            + (f" (faiss full beside it {t_faiss:.2f}s, {ratio:.2f}x)" if ratio else ""), flush=True)
  finally:
    index.stop_workers()


def worker_memory(cfg: Config, extra: dict, threads: str) -> dict:
  """Table 4: one phase ("build" or "search") at one precision, in a fresh process."""
  from adaptor.index import MatryoshkaIndex
  path, precision = extra["path"], extra["precision"]
  if extra["phase"] == "build":
    corpus = _synthetic(cfg, cfg.n_docs, 1)
    index = MatryoshkaIndex.build(corpus, precision=precision)
    del corpus
    index.save(path)
  elif extra["phase"] == "search":
    index = MatryoshkaIndex.load(path)
    # One query batch (256): batches run one after another, so more queries
    # take longer but need no more memory.
    queries = _synthetic(cfg, min(cfg.n_queries, 256), 2)
    index.search_rows(queries, cfg.k, adapted=True)
    index.search_rows(queries, cfg.k, schedule=[tuple(s) for s in extra["schedule"]],
                      adapted=True)
  else:  # "search, workers": PSS, since every worker maps the same shared arrays.
    from common import PeakPss
    index = MatryoshkaIndex.load(path, workers=None)
    queries = _synthetic(cfg, min(cfg.n_queries, 256 * index.workers), 2)
    with PeakPss([os.getpid(), *index.worker_pids]) as pss:
      index.search_rows(queries, cfg.k, adapted=True)
      index.search_rows(queries, cfg.k, schedule=[tuple(s) for s in extra["schedule"]],
                        adapted=True)
    out = {"peak_rss": pss.peak, "measure": f"peak summed PSS of this process and its "
           f"{index.workers} workers", "index_bytes": index.nbytes,
           "vector_bytes": index.vectors.nbytes}
    index.stop_workers()
    return out
  return {"peak_rss": peak_rss_bytes(), "measure": "VmHWM", "index_bytes": index.nbytes,
          "vector_bytes": index.vectors.nbytes}


# ---------------------------------------------------------------- quality


def quality(cfg: Config) -> dict:
  """Table 3 (in this process, all threads), plus the plan that tables 2 and 4 time."""
  import adaptor
  from adaptor.index import MatryoshkaIndex
  from adaptor.metrics import topk_overlap
  from adaptor.plan import plan_schedule
  out = {}
  for model in cfg.models:
    data = adaptor.load_beir(cfg.data, model)
    train_q, _, _ = data.split_queries("train")
    test_q, test_ids, qrels = data.split_queries("test")
    ckpt = Path(cfg.out) / f"adaptor-{model}"
    if (ckpt / "COMPLETE").is_file():
      fitted = adaptor.load(ckpt)
      print(f"{model}: reusing the adaptor in {ckpt}", flush=True)
    else:
      t = time.perf_counter()
      extra = {} if cfg.fit_steps is None else {"steps": cfg.fit_steps}
      fitted = adaptor.fit(data.corpus.vectors, queries=train_q, seed=0, quiet=True, **extra)
      fitted.save(ckpt)
      print(f"{model}: fitted an adaptor in {time.perf_counter() - t:.0f} s -> {ckpt}", flush=True)
    index = MatryoshkaIndex.build(data.corpus.vectors, ids=data.corpus.ids, adaptor=fitted)
    q = index.prepare_queries(test_q)
    d = index.d
    t = time.perf_counter()
    plan = plan_schedule(index, train_q, k=cfg.k, target_recall=cfg.plan_target,
                         corpus_size=cfg.n_docs)
    plan_s = time.perf_counter() - t
    _, full = index.search_rows(q, cfg.k, adapted=True)
    rows = {}

    def measure(name, **how):
      index.search_rows(q, cfg.k, adapted=True, **how)
      t = median_time(lambda: index.search_rows(q, cfg.k, adapted=True, **how), cfg.repeats)
      scores, found = index.search_rows(q, cfg.k, adapted=True, **how)
      metrics = adaptor.evaluate_topk(found, scores, test_ids, data.corpus.ids, qrels,
                                      k_values=(cfg.k,))
      rows[name] = {"ndcg@10": metrics[f"ndcg@{cfg.k}"], "recall@10_vs_full": topk_overlap(found, full),
                    "ms_per_query": 1000 * t / len(q)}

    for dim in fitted.dims:
      measure(f"exact {dim}", dim=dim)
    measure("funnel " + _schedule_text(plan.schedule), schedule=plan.schedule)
    if model == cfg.plan_model:
      for text in cfg.more_schedules:
        measure("funnel " + text, schedule=_with_stores(index, _parse_schedule(text)))
    out[model] = {"rows": rows, "plan": plan.to_dict(), "plan_seconds": plan_s,
                  "n_docs": index.n, "n_test_queries": len(q), "d": d}
    print(f"{model}: planned {_schedule_text(plan.schedule)} (validation recall "
          f"{plan.recall:.4f}, est. {plan.speedup:.1f}x at {cfg.n_docs} docs, "
          f"{len(plan.candidates)} tried, "
          f"{plan_s:.0f} s)", flush=True)
  return out


# ---------------------------------------------------------------- main


def _fmt(value, spec: str, suffix: str = "") -> str:
  return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _tables(cfg: Config, res: dict) -> str:
  m = res.get("machine", {})
  lines = [f"Machine: {m.get('cpu', '?')}, {m.get('cpus', '?')} CPUs"
           + (f", load average {m['load_average'][0]:.1f} at the start" if "load_average" in m else "")]
  speed = res.get("speed", {})
  if speed:
    lines += ["", f"## 1. Exact top-{cfg.k} search, {cfg.n_docs:,} x {cfg.d} float32, "
              f"{cfg.n_queries} queries (queries/s, median of {cfg.repeats})", "",
              "| threads | dim | this library, one process | this library, one worker per CPU "
              "| faiss IndexFlatIP | numpy | library time / faiss time (best library column) "
              "| top-10 agreement with faiss |", "|---|---|---|---|---|---|---|---|"]
    for threads, sp in speed.items():
      for dim, r in sp["exact"].items():
        best = min(v for v in (r.get("ours_over_faiss_time"), r.get("workers_over_faiss_time"))
                   if v is not None) if "faiss_s" in r else None
        lines.append(f"| {threads} | {dim} | {r['ours_qps']:.1f} | "
                     f"{_fmt(r.get('workers_qps'), '.1f')} | "
                     f"{_fmt(r.get('faiss_qps'), '.1f')} | {_fmt(r.get('numpy_qps'), '.1f')} | "
                     f"{_fmt(best, '.2f')} | {_fmt(r.get('agreement_with_faiss'), '.4f')} |")
    real = res.get("quality", {}).get(cfg.plan_model, {}).get("rows", {})
    lines += ["", "## 2. Funnels vs full-size exact search on the same corpus "
              f"(the first planned on SciFact/{cfg.plan_model})", "",
              "| threads | library runs in | schedule | queries/s "
              "| speed-up vs faiss full (median of interleaved pairs) "
              "| speed-up vs library full | recall@10 vs full (SciFact test, real) "
              "| recall@10 vs full (synthetic) |", "|---|---|---|---|---|---|---|---|"]
    for threads, sp in speed.items():
      for f in sp["funnels"]:
        stages = _schedule_text(f["schedule"])
        real_recall = real.get("funnel " + stages, {}).get("recall@10_vs_full")
        runs = [("one process", "")]
        if "workers_qps" in f:
          runs.append((f"{sp['workers']} workers", "workers_"))
        for where, key in runs:
          lines.append(f"| {threads} | {where} | {stages} | {f[key + 'qps']:.1f} | "
                       f"{_fmt(f[key + 'speedup_vs_faiss_full'], '.1f', 'x')} | "
                       f"{f[key + 'speedup_vs_ours_full']:.1f}x | {_fmt(real_recall, '.4f')} | "
                       f"{f['synthetic_recall_vs_full']:.4f} |")
  for model, q in res.get("quality", {}).items():
    plan = q["plan"]
    lines += ["", f"## 3. SciFact / {model}: adapted embeddings, {q['n_docs']} docs, "
              f"{q['n_test_queries']} test queries (funnel planned on train queries: validation "
              f"recall {plan['recall']:.4f}, est. {plan['speedup']:.1f}x at {cfg.n_docs:,} docs)", "",
              "| search | nDCG@10 | recall@10 vs full exact | ms / query |", "|---|---|---|---|"]
    for name, r in q["rows"].items():
      lines.append(f"| {name} | {r['ndcg@10']:.4f} | {r['recall@10_vs_full']:.4f} | "
                   f"{r['ms_per_query']:.3f} |")
  if res.get("memory"):
    lines += ["", f"## 4. Peak memory, {cfg.n_docs:,} x {cfg.d} index, fresh process per row "
              "(VmHWM; with workers, the peak of the summed PSS of the process and its workers, "
              "which map the same shared arrays)",
              "", "| precision | phase | peak memory (GiB) | index size (GiB) | peak / index size |",
              "|---|---|---|---|---|"]
    for precision, phases in res["memory"].items():
      for phase, mem in phases.items():
        lines.append(f"| {precision} | {phase} | {mem['peak_rss'] / 2**30:.2f} | "
                     f"{mem['index_bytes'] / 2**30:.2f} | "
                     f"{mem['peak_rss'] / mem['index_bytes']:.2f} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes; runs in seconds")
  parser.add_argument("--out", help="results folder (default: results/bench_search)")
  parser.add_argument("--n-docs", type=int, help="synthetic corpus size")
  parser.add_argument("--parts", help="comma-separated subset of quality,speed,memory "
                      "(default: all three)")
  parser.add_argument("--schedule", help="funnel to time without the quality part, "
                      "e.g. 16:500,128:50,768:10")
  parser.add_argument("--gpu", action="store_true",
                      help="one more speed run with JAX on the GPU (FAISS stays on the CPU)")
  parser.add_argument("--repeats", type=int, help="timed repeats per measurement")
  parser.add_argument("--threads", help="CPU thread settings to time, in order: 1,all (default)")
  parser.add_argument("--dims", help="exact-search dims to time, e.g. 64,256,768 (the full d "
                      "is always needed: the funnels are compared with it)")
  parser.add_argument("--also", action="append", help="another funnel to time and measure, e.g. "
                      "256:1000:binary,768:10 (repeatable; replaces the default extra funnels)")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--payload", help=argparse.SUPPRESS)
  parser.add_argument("--worker-out", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  sys.path.insert(0, str(REPO))

  if args.worker:
    p = json.loads(args.payload)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in p["config"].items()}
    cfg = Config(**fields)
    fn = {"speed": worker_speed, "memory": worker_memory}[args.worker]
    if p["threads"] == "1":
      use_one_cpu()   # Before JAX, XLA and FAISS start.
    result = fn(cfg, p["extra"], p["threads"])
    Path(args.worker_out).write_text(json.dumps(result))
    return 0

  cfg = smoke_config() if args.smoke else Config()
  if args.out:
    cfg.out = args.out
  if args.n_docs:
    cfg.n_docs = args.n_docs
  if args.parts:
    cfg.parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = set(cfg.parts) - {"quality", "speed", "memory"}
    if unknown:
      parser.error(f"--parts takes quality, speed and memory, got {sorted(unknown)}")
  if args.gpu:  # First: the GPU run is the shortest.
    cfg.platforms = ("gpu", "cpu")
  if args.dims:
    cfg.dims = tuple(sorted({int(v) for v in args.dims.split(",") if v.strip()} | {cfg.d}))
  if args.also:
    cfg.more_schedules = tuple(args.also)
  if args.threads:
    cfg.threads = tuple(t.strip() for t in args.threads.split(",") if t.strip())
    if set(cfg.threads) - {"1", "all"}:
      parser.error(f"--threads takes 1 and all, got {args.threads!r}")
  if args.repeats:
    cfg.repeats = args.repeats
  if "speed" in cfg.parts:  # Its workers compare with FAISS: say so now, not in a traceback.
    try:
      import faiss  # noqa: F401
    except ImportError as e:
      print(f"bench_search.py: the speed part needs FAISS ({e}); install the bench extra: "
            "pip install -e '.[bench]'", file=sys.stderr)
      return 2
  t0 = time.perf_counter()
  res = {"config": dataclasses.asdict(cfg), "machine": _machine()}
  if "quality" in cfg.parts:
    res["quality"] = quality(cfg)
    schedule = res["quality"][cfg.plan_model]["plan"]["schedule"]
  elif args.schedule:
    schedule = _parse_schedule(args.schedule)
  else:
    parser.error("without the quality part, give the funnel to time with --schedule")
  if "speed" in cfg.parts:
    res["speed"] = {}
    for platform in cfg.platforms:
      for th in (cfg.threads if platform == "cpu" else ("all",)):
        label = ("1" if th == "1" else f"all ({os.cpu_count()})") + (
            "" if platform == "cpu" else ", JAX on GPU")
        res["speed"][label] = _run_worker(cfg, "speed", {"schedule": schedule}, th, platform)
  if "memory" in cfg.parts:
    res["memory"] = {}
    with tempfile.TemporaryDirectory(dir=cfg.out if os.path.isdir(cfg.out) else None) as tmp:
      for precision in ("float32", "float16"):
        path = os.path.join(tmp, f"index-{precision}")
        extra = {"path": path, "precision": precision, "schedule": schedule}
        res["memory"][precision] = {
            phase: _run_worker(cfg, "memory", {**extra, "phase": phase}, "all")
            for phase in ("build", "search", "search, workers")}
  res["seconds"] = time.perf_counter() - t0
  table = _tables(cfg, res)
  print("\n" + table + f"\n\n(total {res['seconds']:.0f} s)")
  write_results(cfg.out, res, table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
