"""Fit time and peak memory against corpus size, corpus only, from a memory-mapped .npy.

Each size is fitted in a fresh child process (`adaptor.fit(np.load(path, mmap_mode="r"))`,
library defaults, seed 0), which reports its wall time and its peak resident set size
(VmHWM, file-backed pages of the mapped corpus included). The corpora are synthetic
unit vectors whose variance decays along the vector (`common.synthetic`), written once
as float32 .npy files under `--workdir` and reused.

Run (1.4k to 1M documents x 768, about 25 minutes on 2 cores, 3.1 GB of disk):
  python experiments/fit_scale.py --out results/fit_scale

Run locally in seconds:
  python experiments/fit_scale.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import common

HERE = Path(__file__).resolve().parent


@dataclasses.dataclass
class Config:
  sizes: tuple[int, ...] = (1_400, 10_000, 100_000, 1_000_000)
  d: int = 768
  workdir: str = "results/fit_scale/corpora"
  out: str = "results/fit_scale"
  seed: int = 0


def smoke_config() -> Config:
  return Config(sizes=(1_000, 3_000), d=64, workdir="results/fit_scale-smoke/corpora",
                out="results/fit_scale-smoke")


def corpus_file(cfg: Config, n: int) -> Path:
  """The path of an [n, d] float32 corpus, written in chunks on first use (never whole in memory)."""
  path = Path(cfg.workdir) / f"synthetic-{n}x{cfg.d}.npy"
  if path.exists():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp.npy")
  out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, cfg.d))
  for start in range(0, n, 65536):
    part = common.synthetic(min(65536, n - start), cfg.d, cfg.seed, start)
    out[start:start + len(part)] = part / np.linalg.norm(part, axis=1, keepdims=True)
  out.flush()
  del out
  os.replace(tmp, path)
  return path


def child(path: str, seed: int) -> None:
  """Fits on the memory-mapped corpus at `path` and prints one JSON line."""
  import adaptor
  t0 = time.perf_counter()
  model = adaptor.fit(np.load(path, mmap_mode="r"), seed=seed, quiet=True)
  seconds = time.perf_counter() - t0
  stage = model.info["stages"]["unsupervised"]
  print(json.dumps({"seconds": seconds, "peak_rss": common.peak_rss_bytes(),
                    "steps": stage["steps"], "n_fit_rows": model.info["n_docs"],
                    "start": model.info.get("start", {}).get("chosen")}))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--sizes", help="comma-separated corpus sizes")
  parser.add_argument("--out")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  cfg = smoke_config() if args.smoke else Config()
  if args.child:
    child(args.child, cfg.seed)
    return
  if args.sizes:
    cfg.sizes = tuple(int(x) for x in args.sizes.split(","))
  if args.out:
    cfg.out = args.out
  rows = []
  for n in cfg.sizes:
    path = corpus_file(cfg, n)
    run = subprocess.run([sys.executable, str(HERE / "fit_scale.py"), "--child", str(path)]
                         + (["--smoke"] if args.smoke else []),
                         capture_output=True, text=True, check=False)
    if run.returncode != 0:
      sys.exit(f"fit_scale: the fit on {path} failed (exit {run.returncode}):\n{run.stderr[-2000:]}")
    r = json.loads(run.stdout.strip().splitlines()[-1])
    r.update({"n": n, "d": cfg.d, "file_bytes": path.stat().st_size})
    r["rss_over_file"] = r["peak_rss"] / r["file_bytes"]
    rows.append(r)
    print(f"n={n}: {r['seconds']:.1f} s, {r['steps']} steps, peak RSS "
          f"{r['peak_rss'] / 2**30:.2f} GiB ({r['rss_over_file']:.2f}x the file)", flush=True)
  table = ["| documents | d | fit s | steps | rows fitted | peak RSS GiB | RSS / file size |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    table.append(f"| {r['n']:,} | {r['d']} | {r['seconds']:.1f} | {r['steps']} | {r['n_fit_rows']:,} "
                 f"| {r['peak_rss'] / 2**30:.2f} | {r['rss_over_file']:.2f} |")
  print("\n" + "\n".join(table))
  common.write_results(cfg.out, {"config": dataclasses.asdict(cfg), "rows": rows}, "\n".join(table))


if __name__ == "__main__":
  main()
