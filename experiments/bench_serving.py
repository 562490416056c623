"""Serving benchmark: query adaptation latency (numpy, ONNX, Adaptor.apply) and Qdrant local mode.

One run prints three tables and writes them to <out>/results.json and <out>/tables.md:

  1. Single-query latency of a 768 -> 768 adaptor truncated to 64 dims (the
     linear one an unsupervised fit gives, hidden=0, and the supervised
     default shape with a 512-wide MLP), one query [1, 768] float32 per call,
     the process pinned to one CPU (common.use_one_cpu; onnxruntime with one
     intra- and inter-op thread): median and 90th percentile of `calls`
     timed calls after `warmup` untimed ones, for
       (a) numpy: adaptor/portable.py on a safetensors export cut to 64 dims;
       (b) ONNX: onnxruntime on an ONNX export cut to 64 dims;
       (c) Adaptor.apply(x, dim=64) (validation, jitted XLA call, copy back).
     Weights are seeded random (speed does not depend on them); each row also
     gives the largest difference from (c) over 1000 queries. Target: <= 50 us
     for (a) and (b).
  2. Qdrant local-mode upload rate (points/s) of 768-d adapted vectors as
     three named vectors (m32, m128, m768), `batch` points per request: on
     disk (QdrantClient(path=...), which commits each point in its own SQLite
     transaction) and in memory. Local mode is not Qdrant's server: these
     numbers say what tests and small prototypes cost, nothing about a server.
  3. The funnel 32:500,128:50,384:10 through Qdrant local mode (in memory) on
     the shipped SciFact data (PCA-initialised adaptor, 300 test queries)
     against the library's own funnel: recall@10 of Qdrant's top 10 against
     the library's, nDCG@10 of both, and seconds per query (local mode
     re-scores each prefetch by filtering every point in Python).

Run (about 3 minutes on the 2-core CPU machine):
  python experiments/bench_serving.py --out results/bench_serving

Run locally in seconds (fewer calls, points and queries):
  python experiments/bench_serving.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import use_one_cpu, write_results

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Config:
  d_in: int = 768
  dim: int = 64
  hiddens: tuple[int, ...] = (0, 512)   # 0: the unsupervised (linear) shape
  calls: int = 5000
  warmup: int = 500
  agreement_rows: int = 1000
  upload_disk: int = 1000               # points uploaded on disk (local mode: ~60/s here)
  upload_memory: int = 20_000
  upload_dims: tuple[int, ...] = (32, 128, 768)
  batch: int = 256
  schedule: str = "32:500,128:50,384:10"
  scifact_queries: int | None = None    # None: all 300 test queries
  seed: int = 0
  out: str = "results/bench_serving"


def smoke_config() -> Config:
  return Config(calls=300, warmup=50, agreement_rows=100, upload_disk=64, upload_memory=1000,
                scifact_queries=10, out="results/bench_serving-smoke")


def _adaptor(cfg: Config, hidden: int):
  import adaptor
  from flax import nnx
  from adaptor.model import MatryoshkaAdaptor
  module = MatryoshkaAdaptor(cfg.d_in, hidden=hidden, rngs=nnx.Rngs(cfg.seed))
  rng = np.random.default_rng([cfg.seed, hidden])
  module.base.kernel.set_value(
      (rng.standard_normal((cfg.d_in, cfg.d_in)) / np.sqrt(cfg.d_in)).astype(np.float32))
  if hidden:
    module.out_layer.kernel.set_value(
        (rng.standard_normal((hidden, cfg.d_in)) * 0.05).astype(np.float32))
  return adaptor.Adaptor(module)


def _latencies(fn, x: np.ndarray, cfg: Config) -> tuple[float, float]:
  """(median, p90) microseconds of fn(one query row), each call timed on its own."""
  for i in range(cfg.warmup):
    fn(x[i % len(x)][None])
  times = np.empty(cfg.calls)
  for i in range(cfg.calls):
    q = x[i % len(x)][None]
    t = time.perf_counter_ns()
    fn(q)
    times[i] = time.perf_counter_ns() - t
  return float(np.median(times) / 1e3), float(np.percentile(times, 90) / 1e3)


def latency(cfg: Config, work: Path) -> list[dict]:
  import onnxruntime as ort
  from adaptor.portable import PortableAdaptor

  x = np.random.default_rng([cfg.seed, 1]).standard_normal((cfg.agreement_rows, cfg.d_in),
                                                           dtype=np.float32)
  rows = []
  for hidden in cfg.hiddens:
    model = _adaptor(cfg, hidden)
    st, ox = work / f"a{hidden}.safetensors", work / f"a{hidden}.onnx"
    model.export(st, dim=cfg.dim, overwrite=True)
    model.export(ox, format="onnx", dim=cfg.dim, overwrite=True)
    portable = PortableAdaptor.load(st)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(ox), opts, providers=["CPUExecutionProvider"])
    ref = model.apply(x, dim=cfg.dim)
    methods = {
        "numpy (portable.py)": lambda q: portable.apply(q),
        "ONNX (onnxruntime)": lambda q: session.run(None, {"embeddings": q})[0],
        "Adaptor.apply": lambda q: model.apply(q, dim=cfg.dim),
    }
    for name, fn in methods.items():
      diff = float(np.abs(np.concatenate([fn(x[i:i + 100]) for i in range(0, len(x), 100)])
                          - ref).max())
      med, p90 = _latencies(fn, x, cfg)
      rows.append({"method": name, "hidden": hidden, "median_us": med, "p90_us": p90,
                   "max_abs_diff_vs_apply": diff})
      print(f"  {name:22s} hidden={hidden:3d}: median {med:8.1f} us, p90 {p90:8.1f} us, "
            f"max |diff| {diff:.2e}", flush=True)
  return rows


def upload_rates(cfg: Config, work: Path) -> list[dict]:
  from qdrant_client import QdrantClient
  from adaptor import qdrant

  rows = []
  for where, n in (("disk", cfg.upload_disk), ("memory", cfg.upload_memory)):
    x = np.random.default_rng([cfg.seed, 2]).standard_normal((n, cfg.upload_dims[-1]),
                                                             dtype=np.float32)
    path = work / "qdrant"
    shutil.rmtree(path, ignore_errors=True)
    client = QdrantClient(path=str(path)) if where == "disk" else QdrantClient(location=":memory:")
    try:
      qdrant.create_collection("bench", cfg.upload_dims, client=client)
      t = time.perf_counter()
      stats = qdrant.upload("bench", x, batch_size=cfg.batch, client=client)
      seconds = time.perf_counter() - t
    finally:
      client.close()
    assert stats["uploaded"] == n
    rows.append({"storage": where, "points": n, "seconds": seconds, "points_per_s": n / seconds})
    print(f"  upload ({where}): {n} points in {seconds:.1f} s = {n / seconds:.0f} points/s",
          flush=True)
  return rows


def scifact_funnel(cfg: Config) -> dict:
  from flax import nnx
  from qdrant_client import QdrantClient
  import adaptor
  from adaptor import qdrant
  from adaptor.model import MatryoshkaAdaptor, init_reorder_from_pca

  data = adaptor.load_beir(REPO / "data" / "scifact", "all-MiniLM-L6-v2")
  queries, query_ids, qrels = data.split_queries("test")
  if cfg.scifact_queries is not None:
    queries, query_ids = queries[:cfg.scifact_queries], query_ids[:cfg.scifact_queries]
  qrels = {q: qrels[q] for q in query_ids}
  module = MatryoshkaAdaptor(384, hidden=0, rngs=nnx.Rngs(cfg.seed))
  init_reorder_from_pca(module, data.corpus.vectors)
  index = adaptor.MatryoshkaIndex.build(data.corpus.vectors, ids=data.corpus.ids,
                                        adaptor=adaptor.Adaptor(module))
  stages = qdrant.parse_schedule(cfg.schedule, (32, 128, 384))
  adapted = index.prepare_queries(queries)
  ref_scores, ref_ids = index.search(adapted, 10, schedule=stages, adapted=True)
  client = QdrantClient(location=":memory:")
  try:
    qdrant.create_collection("scifact", (32, 128, 384), client=client)
    qdrant.upload("scifact", index.vectors, ids=index.ids, batch_size=1024, client=client)
    t = time.perf_counter()
    scores, ids = qdrant.search("scifact", adapted, cfg.schedule, client=client)
    per_query = (time.perf_counter() - t) / len(query_ids)
  finally:
    client.close()
  run = lambda ids, scores: {q: {str(d): float(s) for d, s in zip(r, sr)}
                             for q, r, sr in zip(query_ids, ids, scores)}
  res = {
      "schedule": cfg.schedule, "queries": len(query_ids), "documents": index.n,
      "recall10_vs_library": float(np.mean([len(set(a) & set(b)) / 10
                                            for a, b in zip(ids, ref_ids)])),
      "ndcg10_qdrant": adaptor.evaluate(run(ids, scores), qrels, k_values=(10,))["ndcg@10"],
      "ndcg10_library": adaptor.evaluate(run(ref_ids, ref_scores), qrels, k_values=(10,))["ndcg@10"],
      "seconds_per_query": per_query,
  }
  print(f"  funnel {cfg.schedule}: recall@10 vs library {res['recall10_vs_library']:.4f}, "
        f"nDCG@10 {res['ndcg10_qdrant']:.4f} (library {res['ndcg10_library']:.4f}), "
        f"{per_query:.3f} s/query", flush=True)
  return res


def tables(res: dict) -> str:
  lines = [f"Single-query latency, {res['config']['d_in']} -> {res['config']['dim']} dims, one CPU "
           f"({res['config']['calls']} calls; us):", "",
           "| method | hidden | median | p90 | max abs diff vs Adaptor.apply |", "|---|---|---|---|---|"]
  for r in res["latency"]:
    lines.append(f"| {r['method']} | {r['hidden']} | {r['median_us']:.1f} | {r['p90_us']:.1f} | "
                 f"{r['max_abs_diff_vs_apply']:.1e} |")
  lines += ["", f"Qdrant local-mode upload, named vectors {list(res['config']['upload_dims'])}, "
            f"{res['config']['batch']} points per request:", "",
            "| storage | points | seconds | points/s |", "|---|---|---|---|"]
  for r in res["upload"]:
    lines.append(f"| {r['storage']} | {r['points']} | {r['seconds']:.1f} | {r['points_per_s']:.0f} |")
  f = res["funnel"]
  lines += ["", f"Funnel {f['schedule']} on SciFact ({f['queries']} test queries, {f['documents']} "
            "docs), Qdrant local mode (in memory) vs the library:", "",
            "| recall@10 vs library | nDCG@10 Qdrant | nDCG@10 library | s/query (Qdrant local) |",
            "|---|---|---|---|",
            f"| {f['recall10_vs_library']:.4f} | {f['ndcg10_qdrant']:.4f} | "
            f"{f['ndcg10_library']:.4f} | {f['seconds_per_query']:.3f} |"]
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes; runs in seconds")
  parser.add_argument("--out", help="results folder (default: the config's)")
  args = parser.parse_args(argv)
  cpu = use_one_cpu()   # Before JAX, XLA and onnxruntime start.
  cfg = smoke_config() if args.smoke else Config()
  if args.out:
    cfg = dataclasses.replace(cfg, out=args.out)
  sys.path.insert(0, str(REPO))
  import jax
  import adaptor
  print(f"pinned to CPU {cpu}; jax {jax.__version__}, matryoshka-adaptor {adaptor.__version__}",
        flush=True)
  work = Path(tempfile.mkdtemp(prefix="bench_serving-"))
  try:
    res = {"config": dataclasses.asdict(cfg), "cpu": cpu}
    print("latency:", flush=True)
    res["latency"] = latency(cfg, work)
    print("Qdrant upload:", flush=True)
    res["upload"] = upload_rates(cfg, work)
    print("SciFact funnel:", flush=True)
    res["funnel"] = scifact_funnel(cfg)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  table = tables(res)
  print("\n" + table + "\n")
  write_results(cfg.out, res, table)


if __name__ == "__main__":
  main()
