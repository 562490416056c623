"""Search speed of two checkouts of this repo side by side: exact full-size search and a funnel.

For claims like "old commit against new, exact search and the default funnel
at 1M x 768 within 0.97-1.03x". One synthetic corpus (float32 [n_docs, d],
unit-norm rows whose variance decays along the vector: common.synthetic) and
its queries are written once to .npy files that every run memory-maps. Each
run is a fresh subprocess with PYTHONPATH set to one checkout (it checks that
`import adaptor` came from there); it builds `MatryoshkaIndex.build(corpus)`
and times `index.search_rows(queries, k, dim=d)` (exact) and
`index.search_rows(queries, k, schedule=...)` (funnel): one warm-up call, whose result rows all runs must
share, then the median of `repeats` calls. Runs go in pairs, old-new and
new-old alternately (the machine drifts over minutes and a run is slower right
after the other side's: common.paired_times); new/old is taken per pair.

Run (1M x 768, 1000 queries, 5 pairs; a 2.9 GiB corpus in a temp folder):
  python experiments/bench_commits.py --old /work/wt-old --new . --out results/bench_commits
or on temporary detached worktrees of two commits of this repo (removed at the end):
  python experiments/bench_commits.py --old-commit HEAD~1 --new-commit HEAD

Run locally in seconds (20k x 384, 200 queries, schedule 32:200,384:10, 2 pairs):
  python experiments/bench_commits.py --smoke --old-commit HEAD~1 --new .
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import median_time, synthetic

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Config:
  n_docs: int = 1_000_000
  d: int = 768
  queries: int = 1000
  k: int = 10
  schedule: str = "32:500,128:50,768:10"
  pairs: int = 5
  repeats: int = 3        # timed calls per measurement and run, after one warm-up
  seed: int = 0           # corpus: numpy stream (seed, 1); queries: (seed, 2)
  measure: tuple = ("exact", "funnel")   # which searches to time
  out: str = "results/bench_commits"


def smoke_config() -> Config:
  return Config(n_docs=20_000, d=384, queries=200, schedule="32:200,384:10", pairs=2,
                repeats=10, out="results/bench_commits-smoke")


def parse_schedule(text: str, d: int, k: int) -> list[tuple[int, int]]:
  """'32:500,128:50,768:10' -> [(32, 500), (128, 50), (768, 10)].

  Not the library's parser: it may move between the two checkouts.
  """
  stages = []
  for part in text.split(","):
    try:
      dim, keep = (int(v) for v in part.split(":"))
    except ValueError:
      raise SystemExit(f"--schedule must be dim:keep,dim:keep,..., got {text!r}") from None
    if not 1 <= dim <= d:
      raise SystemExit(f"--schedule dims must be in [1, {d}] (--d), got {dim} in {text!r}")
    stages.append((dim, keep))
  if stages[-1][1] < k:
    raise SystemExit(f"--schedule's last keep must be >= k={k}, got {stages[-1][1]}")
  return stages


def worker(checkout: str, payload: dict, out: Path) -> None:
  """One run: builds the index from the checkout on PYTHONPATH and times both searches."""
  cfg = Config(**payload["config"])
  import adaptor
  where = Path(adaptor.__file__).resolve()
  if not where.is_relative_to(Path(checkout).resolve()):
    raise SystemExit(f"worker: `import adaptor` gave {where}, expected a file under {checkout}")
  import jax
  corpus = np.asarray(np.load(payload["corpus"], mmap_mode="r"))
  queries = np.asarray(np.load(payload["queries"], mmap_mode="r"))
  t = time.perf_counter()
  index = adaptor.MatryoshkaIndex.build(corpus)
  res = {"adaptor_file": str(where), "backend": jax.default_backend(),
         "build_s": time.perf_counter() - t}
  schedule = parse_schedule(cfg.schedule, cfg.d, cfg.k)
  # search_rows: the search itself, without turning rows into id strings (27 ms at 1M).
  calls = {"exact": lambda: index.search_rows(queries, cfg.k, dim=cfg.d),
           "funnel": lambda: index.search_rows(queries, cfg.k, schedule=schedule)}
  for name in cfg.measure:
    fn = calls[name]
    _, ids = fn()   # warm-up: compiles
    np.save(out / f"{name}.npy", np.asarray(ids).astype(str))
    res[f"{name}_s"] = median_time(fn, cfg.repeats)
  (out / "result.json").write_text(json.dumps(res))


_running = None   # The worker subprocess now running; killed on Ctrl-C.


def _git(*args, cwd=REPO) -> str:
  p = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True)
  if p.returncode:
    raise SystemExit(f"git {' '.join(args)} in {cwd} failed: {p.stderr.strip()}")
  return p.stdout.strip()


def _checkout(path, name: str) -> tuple[Path, dict]:
  """The checkout's resolved path, and its path, HEAD and whether tracked files changed."""
  path = Path(path).resolve()
  if not (path / "adaptor" / "__init__.py").is_file():
    raise SystemExit(f"{name} must be a checkout of this repo (a folder holding adaptor/), "
                     f"got {path}")
  try:
    return path, {"path": str(path), "head": _git("rev-parse", "HEAD", cwd=path),
                  "dirty": bool(_git("status", "--porcelain", "--untracked-files=no", cwd=path))}
  except SystemExit:   # not a git checkout
    return path, {"path": str(path), "head": None, "dirty": None}


def _machine() -> dict:
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
              if line.startswith("model name")), None)
  return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(),
          "python": platform.python_version(), "numpy": np.__version__,
          "jax": importlib.metadata.version("jax"), "load_average": os.getloadavg()}


def _write_vectors(path: Path, n: int, d: int, seed: int, salt: int) -> None:
  """Unit-norm synthetic rows [n, d] float32, to a .npy, in chunks (the 1M corpus is 2.9 GiB)."""
  arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
  synthetic(n, d, seed, salt, out=arr)
  for s in range(0, n, 65536):
    arr[s:s + 65536] /= np.linalg.norm(arr[s:s + 65536], axis=1, keepdims=True)
  arr.flush()
  del arr


def _run_worker(cfg: Config, checkout: Path, data: Path, out: Path) -> dict:
  global _running
  out.mkdir()
  payload = json.dumps({"config": dataclasses.asdict(cfg), "corpus": str(data / "corpus.npy"),
                        "queries": str(data / "queries.npy")})
  # Only the checkout on PYTHONPATH: it comes before the venv's editable install of any checkout.
  env = dict(os.environ, PYTHONPATH=str(checkout))
  # Own session: a Ctrl-C reaches the driver only, which stops the worker itself.
  _running = subprocess.Popen(
      [sys.executable, __file__, "--worker", str(checkout), "--payload", payload,
       "--worker-out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True, start_new_session=True)
  log, _ = _running.communicate()
  rc, _running = _running.returncode, None
  if rc:
    raise SystemExit(f"run of {checkout} failed (exit {rc}); its output ends:\n{log[-4000:]}")
  return json.loads((out / "result.json").read_text())


def bench(cfg: Config, sides: dict, tmp: Path, say) -> dict:
  """Times both checkouts in alternating pairs; returns the per-measurement summary and runs."""
  t = time.perf_counter()
  _write_vectors(tmp / "corpus.npy", cfg.n_docs, cfg.d, cfg.seed, 1)
  _write_vectors(tmp / "queries.npy", cfg.queries, cfg.d, cfg.seed, 2)
  say(f"wrote {cfg.n_docs:,} x {cfg.d} corpus and {cfg.queries} queries "
      f"({time.perf_counter() - t:.1f} s)")
  runs = {"old": [], "new": []}
  total, t0 = 2 * cfg.pairs, time.perf_counter()
  for i in range(cfg.pairs):
    for side in ("old", "new") if i % 2 == 0 else ("new", "old"):
      r = _run_worker(cfg, sides[side], tmp, tmp / f"{side}-{i}")
      runs[side].append(r)
      done, el = len(runs["old"]) + len(runs["new"]), time.perf_counter() - t0
      times = ", ".join(f"{m} {r[f'{m}_s'] / cfg.queries * 1e3:.3f}" for m in cfg.measure)
      say(f"[{done}/{total}] pair {i} {side}: {times} ms/query; "
          f"elapsed {el:.0f} s, ETA {el / done * (total - done):.0f} s")
  summary = {}
  for m in cfg.measure:
    ratios = [n[f"{m}_s"] / o[f"{m}_s"] for o, n in zip(runs["old"], runs["new"])]
    ref = np.load(tmp / "old-0" / f"{m}.npy")
    # Query rows whose top-k ids differ from the first old run's, worst run.
    differ = max(int((np.load(tmp / f"{s}-{i}" / f"{m}.npy") != ref).any(1).sum())
                 for s in runs for i in range(cfg.pairs))
    summary[m] = {
        **{f"{s}_ms_per_query": float(np.median([r[f"{m}_s"] for r in runs[s]])) / cfg.queries * 1e3
           for s in runs},
        "new_over_old_median": float(np.median(ratios)), "new_over_old_min": min(ratios),
        "new_over_old_max": max(ratios), "ratios": ratios,
        "identical_results": differ == 0, "differing_query_rows": differ}
  return {"measurements": summary, "runs": runs}


def table(summary: dict) -> str:
  lines = ["| measurement | old ms/query (median) | new ms/query (median) | new/old median "
           "| new/old range | identical results |", "|---|---:|---:|---:|---:|---|"]
  for m, r in summary.items():
    lines.append(f"| {m} | {r['old_ms_per_query']:.4f} | {r['new_ms_per_query']:.4f} | "
                 f"{r['new_over_old_median']:.3f}x | {r['new_over_old_min']:.3f}-"
                 f"{r['new_over_old_max']:.3f}x | {'yes' if r['identical_results'] else 'no'} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  for side in ("old", "new"):
    g = p.add_mutually_exclusive_group()
    g.add_argument(f"--{side}", metavar="PATH", help=f"checkout of the {side} side")
    g.add_argument(f"--{side}-commit", metavar="REV", help="make a temporary worktree of REV")
  for name in ("n_docs", "d", "queries", "k", "pairs", "repeats", "seed"):
    p.add_argument("--" + name.replace("_", "-"), type=int)
  p.add_argument("--schedule", help="funnel stages dim:keep,... (default 32:500,128:50,768:10)")
  p.add_argument("--measure", help="comma-separated searches to time: exact,funnel (default both)")
  p.add_argument("--out", help="results folder (default: results/bench_commits)")
  p.add_argument("--smoke", action="store_true", help="tiny sizes; runs in seconds")
  p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
  p.add_argument("--overwrite", action="store_true", help="replace an existing results.json")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  p.add_argument("--payload", help=argparse.SUPPRESS)
  p.add_argument("--worker-out", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    worker(args.worker, json.loads(args.payload), Path(args.worker_out))
    return 0
  for side in ("old", "new"):
    if not (getattr(args, side) or getattr(args, f"{side}_commit")):
      p.error(f"one of --{side} PATH or --{side}-commit REV is required")

  cfg = smoke_config() if args.smoke else Config()
  for f in dataclasses.fields(cfg):
    if getattr(args, f.name, None) is not None:
      setattr(cfg, f.name, getattr(args, f.name))
  if isinstance(cfg.measure, str):
    cfg.measure = tuple(m.strip() for m in cfg.measure.split(",") if m.strip())
    if not cfg.measure or not set(cfg.measure) <= {"exact", "funnel"}:
      p.error(f"--measure: expected exact, funnel or exact,funnel, got {args.measure!r}")
  schedule = parse_schedule(cfg.schedule, cfg.d, cfg.k)   # fails early on a bad one
  out = Path(cfg.out)
  if (out / "results.json").exists() and not args.overwrite:
    raise SystemExit(f"{out}/results.json exists; pass --overwrite to replace it")
  say = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
  signal.signal(signal.SIGTERM, signal.default_int_handler)   # `kill` cleans up like Ctrl-C
  tmp = Path(tempfile.mkdtemp(prefix="bench_commits-"))
  made = []   # temporary worktrees
  try:
    sides, checkouts = {}, {}
    for side in ("old", "new"):
      path, rev = getattr(args, side), getattr(args, f"{side}_commit")
      if rev:
        path = tmp / f"wt-{side}"
        made.append(path)
        _git("worktree", "add", "--detach", "--quiet", str(path), rev)
      sides[side], checkouts[side] = _checkout(path, f"--{side}")
      checkouts[side]["rev"] = rev
    res = bench(cfg, sides, tmp, say)
  except KeyboardInterrupt:
    if _running is not None:
      _running.kill()
      _running.wait()
    print("interrupted: stopped the running worker and removed temporary files", file=sys.stderr)
    return 130
  finally:
    for path in made:
      subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)],
                     capture_output=True)
    shutil.rmtree(tmp, ignore_errors=True)
  for side in ("old", "new"):
    checkouts[side]["adaptor_file"] = res["runs"][side][0]["adaptor_file"]
  md = table(res["measurements"])
  print(md)
  out.mkdir(parents=True, exist_ok=True)
  res = {"config": dataclasses.asdict(cfg), "schedule": schedule, "machine": _machine(),
         "checkouts": checkouts, **res}
  for name, text in (("results.json", json.dumps(res, indent=2)), ("tables.md", md)):
    (out / f".{name}.tmp").write_text(text + "\n")
    os.replace(out / f".{name}.tmp", out / name)   # atomic: never a half-written file
  print(f"wrote {out}/results.json, {out}/tables.md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
