"""Apply benchmark: in-memory vs streaming vs Beam throughput, and the streaming apply's memory.

One run prints two tables and writes them to <out>/results.json and <out>/tables.md:

  1. Throughput (vectors/s, median of `repeats` runs, compiled beforehand) of a
     768 -> 768 adaptor with the supervised default shape (reorder stage + a
     512-wide residual MLP; random weights: speed does not depend on them),
     truncated to 64 dims with float16 output, on float32 input:
       (a) in memory: `Adaptor.apply` on an array already in RAM;
       (b) streaming: `stream.apply_files` from .npy shards on disk (in the page
           cache: they were just written) to float16 .npy shards, every shard
           and the manifest fsynced;
       (c) Beam: `adaptor.beam.run_pipeline` with the DirectRunner on fewer rows
           (one run), or a "skipped: ..." row if it cannot be imported or fails.
     (a) and (b) run in one process, all threads, and must give identical vectors.
  2. Peak RSS (VmHWM) of the streaming apply over 1,000,000 and 2,000,000 x 768
     float32 rows (2.9 and 5.7 GiB of .npy shards, generated chunk by chunk),
     each in a fresh process: it must stay flat as the input doubles.

Run (about 5 minutes on the 2-core CPU machine; writes 5.7 GiB of input shards
to a temporary folder, deleted at the end):
  python experiments/bench_apply.py --out results/bench_apply

Run locally in seconds (a few thousand rows):
  python experiments/bench_apply.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import peak_rss_bytes, write_results

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30


@dataclasses.dataclass
class Config:
  d_in: int = 768
  hidden: int = 512             # the supervised default; unsupervised fits use 0
  dim: int = 64
  dtype: str = "float16"
  file_rows: int = 100_000      # rows per input .npy shard
  throughput_files: int = 2     # (a) and (b) run on the first files: 200,000 rows
  beam_rows: int = 20_000       # (c) the DirectRunner is much slower
  beam_args: tuple[str, ...] = ("--runner=DirectRunner", "--direct_num_workers=1")
  rss_rows: tuple[int, ...] = (1_000_000, 2_000_000)
  batch_size: int = 8192
  repeats: int = 3
  seed: int = 0
  out: str = "results/bench_apply"
  workdir: str | None = None    # where the input shards go (default: a temporary folder)


def smoke_config() -> Config:
  return Config(file_rows=5_000, throughput_files=2, beam_rows=2_000, rss_rows=(10_000, 20_000),
                repeats=2, out="results/bench_apply-smoke")


# ---------------------------------------------------------------- helpers


def _rss_bytes() -> int:
  for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
      return int(line.split()[1]) * 1024
  return 0


def _write_shards(folder: Path, n_rows: int, cfg: Config, *, prefix: str, salt: int) -> list[str]:
  """Writes n_rows x d_in float32 rows as .npy shards of cfg.file_rows rows, in bounded memory."""
  folder.mkdir(parents=True, exist_ok=True)
  paths = []
  for i, start in enumerate(range(0, n_rows, cfg.file_rows)):
    rows = min(cfg.file_rows, n_rows - start)
    path = folder / f"{prefix}-{i:05d}.npy"
    rng = np.random.default_rng([cfg.seed, salt, i])
    with open(path, "wb") as f:
      np.lib.format.write_array_header_1_0(
          f, {"descr": "<f4", "fortran_order": False, "shape": (rows, cfg.d_in)})
      for s in range(0, rows, 65536):
        rng.standard_normal((min(65536, rows - s), cfg.d_in), dtype=np.float32).tofile(f)
    paths.append(str(path))
  return paths


def _model(cfg: Config):
  import adaptor
  from flax import nnx
  from adaptor.model import MatryoshkaAdaptor
  return adaptor.Adaptor(MatryoshkaAdaptor(cfg.d_in, hidden=cfg.hidden, rngs=nnx.Rngs(cfg.seed)))


def _run_worker(cfg: Config, role: str, extra: dict) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "out.json"
    payload = json.dumps({"config": dataclasses.asdict(cfg), "extra": extra})
    subprocess.run([sys.executable, __file__, "--worker", role, "--payload", payload,
                    "--worker-out", str(out)], check=True)
    return json.loads(out.read_text())


# ---------------------------------------------------------------- measurements


def throughput(cfg: Config, files: list[str], beam_files: list[str], ckpt: str, tmp: Path) -> dict:
  """Table 1, in this process."""
  import adaptor
  from adaptor import stream

  model = adaptor.load(ckpt)
  dtype = np.dtype(cfg.dtype)
  x = np.concatenate([np.load(f) for f in files])
  n = len(x)
  res = {"rows": n}

  # Warm-up: compiles the one batch program both (a) and (b) run.
  model.apply(x[:cfg.batch_size], dim=cfg.dim, dtype=dtype, batch_size=cfg.batch_size)

  def median_seconds(fn):
    times = []
    for _ in range(cfg.repeats):
      t = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t)
    return float(np.median(times)), [round(t, 3) for t in times]

  t, runs = median_seconds(lambda: model.apply(x, dim=cfg.dim, dtype=dtype,
                                               batch_size=cfg.batch_size))
  res["in_memory"] = {"seconds": t, "runs": runs, "vectors_per_s": n / t}
  print(f"(a) in memory: {n / t:,.0f} vectors/s ({runs})", flush=True)
  out = tmp / "stream-out"
  t, runs = median_seconds(lambda: stream.apply_files(
      model, files, out, dim=cfg.dim, dtype=dtype, batch_size=cfg.batch_size, overwrite=True,
      quiet=True))
  res["streaming"] = {"seconds": t, "runs": runs, "vectors_per_s": n / t}
  print(f"(b) streaming: {n / t:,.0f} vectors/s ({runs})", flush=True)
  got, _ = stream.read_shards(out)
  want = model.apply(x, dim=cfg.dim, dtype=dtype, batch_size=cfg.batch_size)
  res["streaming"]["identical_to_in_memory"] = bool(np.array_equal(got, want))
  x = got = want = None  # Free the memory before Beam runs.
  res["beam"] = beam_throughput(cfg, beam_files, ckpt, tmp)
  return res


def beam_throughput(cfg: Config, files: list[str], ckpt: str, tmp: Path) -> dict:
  try:
    from adaptor import beam
  except Exception as e:  # noqa: BLE001  (any import failure: report it, do not stop)
    return {"skipped": f"adaptor.beam could not be imported: {type(e).__name__}: {e}"}
  try:
    t = time.perf_counter()
    beam.run_pipeline(checkpoint=ckpt, inputs=files, output=str(tmp / "beam-out"), dim=cfg.dim,
                      dtype=cfg.dtype, pipeline_args=list(cfg.beam_args))
    seconds = time.perf_counter() - t
  except Exception as e:  # noqa: BLE001
    return {"skipped": f"run_pipeline failed: {type(e).__name__}: {e}"}
  print(f"(c) Beam: {cfg.beam_rows / seconds:,.0f} vectors/s", flush=True)
  return {"rows": cfg.beam_rows, "seconds": seconds, "vectors_per_s": cfg.beam_rows / seconds,
          "pipeline_args": list(cfg.beam_args)}


def worker_rss(cfg: Config, extra: dict) -> dict:
  """Table 2: one streaming apply over `extra["files"]`, in a fresh process."""
  import adaptor
  from adaptor import stream

  model = adaptor.load(extra["ckpt"])
  # Compile and touch everything once on one batch, so that the baseline RSS
  # includes what any run needs; then stream the whole input.
  warm = Path(extra["warm_out"])
  warm.mkdir(parents=True, exist_ok=True)
  np.save(warm / "in.npy", np.load(extra["files"][0], mmap_mode="r")[:cfg.batch_size])
  stream.apply_files(model, str(warm / "in.npy"), warm / "out", dim=cfg.dim, dtype=cfg.dtype,
                     batch_size=cfg.batch_size, quiet=True, overwrite=True)
  baseline = _rss_bytes()
  t = time.perf_counter()
  m = stream.apply_files(model, extra["files"], extra["out"], dim=cfg.dim, dtype=cfg.dtype,
                         batch_size=cfg.batch_size, quiet=True, overwrite=True)
  seconds = time.perf_counter() - t
  return {"rows": m["rows"], "seconds": seconds, "vectors_per_s": m["rows"] / seconds,
          "rss_before": baseline, "peak_rss": peak_rss_bytes(),
          "input_bytes": sum(os.path.getsize(f) for f in extra["files"])}


# ---------------------------------------------------------------- report


def _tables(cfg: Config, res: dict) -> str:
  tp = res["throughput"]
  base = tp["in_memory"]["vectors_per_s"]
  lines = [
      f"### 1. Apply throughput: {cfg.d_in} -> {cfg.d_in} adaptor (reorder + MLP {cfg.hidden}), "
      f"{cfg.dim} dims, {cfg.dtype} output, float32 input (median of {cfg.repeats})",
      "",
      "| method | rows | vectors/s | share of in-memory |",
      "|---|---|---|---|",
      f"| (a) in memory, `Adaptor.apply` | {tp['rows']:,} | {base:,.0f} | 100% |",
      f"| (b) streaming, `apply_files` .npy shards -> {cfg.dtype} .npy shards | {tp['rows']:,} | "
      f"{tp['streaming']['vectors_per_s']:,.0f} | "
      f"{tp['streaming']['vectors_per_s'] / base:.0%} |",
  ]
  b = tp["beam"]
  if "skipped" in b:
    lines.append(f"| (c) Beam `run_pipeline`, DirectRunner | - | skipped: {b['skipped']} | - |")
  else:
    lines.append(f"| (c) Beam `run_pipeline`, {' '.join(b['pipeline_args'])} | {b['rows']:,} | "
                 f"{b['vectors_per_s']:,.0f} | {b['vectors_per_s'] / base:.0%} |")
  lines += [
      "",
      f"Streaming output identical to in-memory apply: "
      f"{tp['streaming']['identical_to_in_memory']}",
      "",
      "### 2. Peak RSS of the streaming apply (fresh process per row)",
      "",
      "| input rows | input .npy size (GiB) | RSS before streaming (GiB) | peak RSS (GiB) | "
      "seconds | vectors/s |",
      "|---|---|---|---|---|---|",
  ]
  for r in res["rss"]:
    lines.append(f"| {r['rows']:,} | {r['input_bytes'] / GiB:.2f} | {r['rss_before'] / GiB:.2f} | "
                 f"{r['peak_rss'] / GiB:.2f} | {r['seconds']:.1f} | {r['vectors_per_s']:,.0f} |")
  first, last = res["rss"][0], res["rss"][-1]
  lines += ["", f"Peak RSS ratio ({last['rows']:,} vs {first['rows']:,} rows): "
            f"{last['peak_rss'] / first['peak_rss']:.2f} (input size ratio "
            f"{last['input_bytes'] / first['input_bytes']:.2f})"]
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes; runs in seconds")
  parser.add_argument("--out", help="results folder (default: results/bench_apply)")
  parser.add_argument("--workdir", help="folder for the input shards (default: a temp folder)")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--payload", help=argparse.SUPPRESS)
  parser.add_argument("--worker-out", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  sys.path.insert(0, str(REPO))

  if args.worker:
    p = json.loads(args.payload)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in p["config"].items()}
    result = {"rss": worker_rss}[args.worker](Config(**fields), p["extra"])
    Path(args.worker_out).write_text(json.dumps(result))
    return 0

  cfg = smoke_config() if args.smoke else Config()
  if args.out:
    cfg.out = args.out
  if args.workdir:
    cfg.workdir = args.workdir

  t0 = time.perf_counter()
  res = {"config": dataclasses.asdict(cfg)}
  tmp = Path(tempfile.mkdtemp(prefix="bench_apply-", dir=cfg.workdir))
  try:
    ckpt = str(tmp / "adaptor")
    _model(cfg).save(ckpt)
    t = time.perf_counter()
    files = _write_shards(tmp / "input", max(cfg.rss_rows), cfg, prefix="emb", salt=1)
    beam_files = _write_shards(tmp / "beam-input", cfg.beam_rows, cfg, prefix="beam", salt=2)
    print(f"wrote {max(cfg.rss_rows):,} x {cfg.d_in} input rows in {len(files)} shards "
          f"({time.perf_counter() - t:.0f} s)", flush=True)
    res["throughput"] = throughput(cfg, files[:cfg.throughput_files], beam_files, ckpt, tmp)
    res["rss"] = []
    for rows in cfg.rss_rows:
      k = -(-rows // cfg.file_rows)
      r = _run_worker(cfg, "rss", {"ckpt": ckpt, "files": files[:k], "out": str(tmp / "rss-out"),
                                   "warm_out": str(tmp / "rss-warm")})
      print(f"streaming {r['rows']:,} rows: peak RSS {r['peak_rss'] / GiB:.2f} GiB, "
            f"{r['vectors_per_s']:,.0f} vectors/s", flush=True)
      res["rss"].append(r)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  res["seconds"] = time.perf_counter() - t0
  table = _tables(cfg, res)
  print("\n" + table + f"\n\n(total {res['seconds']:.0f} s)")
  write_results(cfg.out, res, table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
