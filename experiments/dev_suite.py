"""The development suite: the unsupervised adaptor against one-line baselines on every collection.

For every collection under `--data` (a folder of BEIR-layout collections with
`embeddings/<model>/` and `qrels/test.tsv`) and every model it has, three
regimes are fitted and evaluated on the collection's test queries:

  corpus   the corpus embeddings alone;
  queries  the corpus plus every train-split query, unlabeled (a collection
           without a train split gives a fixed half of its test queries, and
           only the other half is evaluated);
  log50    the corpus plus 50 of those queries (a small query log).

Each regime reports nDCG@10 and Recall@100 at every dim for raw truncation,
PCA (uncentred, centred, and of documents plus the regime's queries) and the
adaptor, then the adaptor's worst and mean margin over the best baseline at
dims <= d/4, and its full-size nDCG@10 minus raw full size. Nothing here reads
test judgements before the adaptor is fitted: they only score it.

With `--supervised`, collections that have train qrels also get a supervised
adaptor, scored on all test queries and on those whose relevant documents are
never relevant to a train query.

Run (both collections and both models, about 30 minutes on 2 cores):
  python experiments/dev_suite.py --data ../shared/data --out results/dev_suite

Run locally in seconds (shipped SciFact/MiniLM data, few steps):
  python experiments/dev_suite.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import adaptor
from adaptor import evaluation
from adaptor.model import adaptor_fingerprint

REPO = Path(__file__).resolve().parents[1]
REGIMES = ("corpus", "queries", "log50")
LOG_QUERIES = 50


@dataclasses.dataclass
class Config:
  data: str = str(REPO.parent / "shared" / "data")
  collections: tuple[str, ...] = ()                # () = every collection found
  models: tuple[str, ...] = ()                     # () = every model a collection has
  regimes: tuple[str, ...] = REGIMES
  supervised: bool = False
  fit: dict = dataclasses.field(default_factory=dict)  # extra adaptor.fit keywords
  seed: int = 0
  out: str = "results/dev_suite"
  quiet: bool = True


def smoke_config() -> Config:
  return Config(data=str(REPO / "data"), collections=("scifact",), regimes=("corpus", "log50"),
                fit={"steps": 40, "eval_every": 20}, out="results/dev_suite-smoke")


def discover(root) -> dict[str, list[str]]:
  """{collection: [models]} for every folder of `root` with test qrels and embeddings."""
  root = Path(root)
  found = {}
  for coll in sorted(p for p in root.iterdir() if p.is_dir()):
    emb = coll / "embeddings"
    if (coll / "qrels" / "test.tsv").exists() and emb.is_dir():
      models = sorted(m.name for m in emb.iterdir() if (m / "corpus.npy").exists())
      if models:
        found[coll.name] = models
  return found


def query_splits(data, seed: int):
  """(train queries, their ids, test queries, their ids, test qrels): never overlapping.

  The train split's queries where there is one; otherwise a fixed half of the
  test queries, and only the other half is evaluated.
  """
  test_q, test_ids, test_qrels = data.split_queries("test")
  if "train" in data.qrels:
    train_q, train_ids, _ = data.split_queries("train")
    return train_q, train_ids, test_q, test_ids, test_qrels
  perm = np.random.default_rng(seed).permutation(len(test_ids))
  half = np.sort(perm[: len(perm) // 2]), np.sort(perm[len(perm) // 2:])
  keep = [test_ids[i] for i in half[1]]
  return (test_q[half[0]], [test_ids[i] for i in half[0]], test_q[half[1]], keep,
          {q: test_qrels[q] for q in keep})


def regime_queries(regime: str, train_q, seed: int):
  if regime == "corpus":
    return None
  if regime == "queries" or len(train_q) <= LOG_QUERIES:
    return train_q
  rows = np.sort(np.random.default_rng([seed, 50]).choice(len(train_q), LOG_QUERIES, replace=False))
  return train_q[rows]


class DocsQueriesPCA(evaluation.PCA):
  """Uncentred PCA of the documents and the regime's queries together."""

  def __init__(self, corpus, queries):
    both = corpus if queries is None else np.concatenate([corpus, queries])
    super().__init__(both, center=False)


def margins(table: dict, d: int, adaptor_name: str = "adaptor") -> dict:
  """Adaptor minus the best baseline per dim <= d/4, and adaptor minus raw at full size."""
  baselines = [k for k in table if k != adaptor_name and not k.startswith("adaptor")]
  small = [int(m) for m in table[adaptor_name] if int(m) <= d // 4]
  per_dim = {}
  for m in sorted(small):
    best = max(table[b][str(m)]["ndcg@10"] for b in baselines)
    per_dim[str(m)] = table[adaptor_name][str(m)]["ndcg@10"] - best
  return {"per_dim": per_dim, "worst": min(per_dim.values()),
          "mean": float(np.mean(list(per_dim.values()))),
          "full_minus_raw": table[adaptor_name][str(d)]["ndcg@10"]
                            - table["raw"][str(d)]["ndcg@10"]}


def run_collection(cfg: Config, root: Path, model_name: str) -> dict:
  data = adaptor.load_beir(root, model_name)
  corpus = np.asarray(data.corpus.vectors, np.float32)
  d = corpus.shape[1]
  dims = tuple(cfg.fit.get("dims") or adaptor.default_dims(d))
  train_q, train_ids, test_q, test_ids, test_qrels = query_splits(data, cfg.seed)
  train_q = np.asarray(train_q, np.float32)
  test_q = np.asarray(test_q, np.float32)
  out = {"d": d, "dims": list(dims), "n_docs": len(corpus), "n_train_queries": len(train_ids),
         "n_test": len(test_ids), "regimes": {}}
  shared = {"raw": evaluation.Raw(), "PCA uncentred": evaluation.PCA(corpus, center=False),
            "PCA centred": evaluation.PCA(corpus, center=True)}
  for regime in cfg.regimes:
    queries = regime_queries(regime, train_q, cfg.seed)
    t0 = time.perf_counter()
    model = adaptor.fit(corpus, queries=queries, seed=cfg.seed, quiet=cfg.quiet, **cfg.fit)
    fit_seconds = time.perf_counter() - t0
    methods = {**shared, "PCA docs+queries": DocsQueriesPCA(corpus, queries), "adaptor": model}
    table = evaluation.compare(methods, corpus, test_q, query_ids=test_ids,
                               corpus_ids=data.corpus.ids, qrels=test_qrels, dims=dims)
    out["regimes"][regime] = {
        "n_queries": 0 if queries is None else len(queries), "fit_seconds": fit_seconds,
        "adaptor_fingerprint": adaptor_fingerprint(model),
        "fit_info": {k: v for k, v in model.info.items() if k not in ("stages",)},
        "stages": {k: {"steps": v["steps"], "kept_step": v["kept_step"]}
                   for k, v in model.info.get("stages", {}).items()},
        "table": table, "margins": margins(table, d)}
  if cfg.supervised and "train" in data.qrels:
    out["supervised"] = run_supervised(cfg, data, corpus, dims, test_q, test_ids, test_qrels)
  return out


def run_supervised(cfg, data, corpus, dims, test_q, test_ids, test_qrels) -> dict:
  train_q, train_ids, train_qrels = data.split_queries("train")
  t0 = time.perf_counter()
  sup = adaptor.fit(corpus, queries=np.asarray(train_q, np.float32), qrels=train_qrels,
                    query_ids=train_ids, corpus_ids=data.corpus.ids, seed=cfg.seed,
                    quiet=cfg.quiet, **cfg.fit)
  fit_seconds = time.perf_counter() - t0
  seen = {doc for judged in train_qrels.values() for doc, g in judged.items() if g > 0}
  unseen = {q: j for q, j in test_qrels.items() if not any(g > 0 and x in seen for x, g in j.items())}
  keep = [i for i, q in enumerate(test_ids) if q in unseen]
  methods = {"raw": evaluation.Raw(), "PCA uncentred": evaluation.PCA(corpus, center=False),
             "adaptor (supervised)": sup}
  out = {"fit_seconds": fit_seconds, "n_unseen": len(keep),
         "table": evaluation.compare(methods, corpus, test_q, query_ids=test_ids,
                                     corpus_ids=data.corpus.ids, qrels=test_qrels, dims=dims)}
  if keep:
    out["table_unseen"] = evaluation.compare(
        methods, corpus, test_q[keep], query_ids=[test_ids[i] for i in keep],
        corpus_ids=data.corpus.ids, qrels=unseen, dims=dims)
  return out


def summarise(results: dict) -> str:
  """Markdown: one row per collection, model and regime with its margins."""
  lines = ["| collection | model | regime | queries | fit s | worst margin (dims <= d/4) | "
           "mean margin | full - raw |", "|---|---|---|---|---|---|---|---|"]
  for key, r in results.items():
    coll, model = key.split("/")
    for regime, g in r["regimes"].items():
      m = g["margins"]
      lines.append(f"| {coll} | {model} | {regime} | {g['n_queries']} | {g['fit_seconds']:.0f} | "
                   f"{m['worst']:+.4f} | {m['mean']:+.4f} | {m['full_minus_raw']:+.4f} |")
  return "\n".join(lines)


def totals(results: dict) -> dict:
  """Worst and mean margins over every collection, model and regime (mean split by regime)."""
  every = [g["margins"] for r in results.values() for g in r["regimes"].values()]
  by_regime = {}
  for r in results.values():
    for regime, g in r["regimes"].items():
      by_regime.setdefault(regime, []).extend(g["margins"]["per_dim"].values())
  return {"worst": min(m["worst"] for m in every),
          "worst_full_minus_raw": min(m["full_minus_raw"] for m in every),
          "mean_by_regime": {k: float(np.mean(v)) for k, v in by_regime.items()}}


def minilm_64_kept(results: dict) -> dict:
  """Share of raw full-size nDCG@10 the adaptor keeps at 64 dims, per MiniLM collection and regime."""
  kept = {}
  for key, r in results.items():
    if key.endswith("/all-MiniLM-L6-v2"):
      for regime, g in r["regimes"].items():
        t = g["table"]
        kept[f"{key}/{regime}"] = t["adaptor"]["64"]["ndcg@10"] / t["raw"][str(r["d"])]["ndcg@10"]
  return kept


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="seconds-long run on the shipped data")
  parser.add_argument("--data", help="folder of BEIR-layout collections")
  parser.add_argument("--collections", help="comma-separated collection folders (default: all)")
  parser.add_argument("--models", help="comma-separated model folders (default: all)")
  parser.add_argument("--regimes", help=f"comma-separated, of {','.join(REGIMES)}")
  parser.add_argument("--supervised", action="store_true",
                      help="also fit a supervised adaptor where a collection has train qrels")
  parser.add_argument("--fit", help="extra adaptor.fit keywords as JSON, e.g. '{\"steps\": 500}'")
  parser.add_argument("--seed", type=int)
  parser.add_argument("--out", help="folder for results.json and the plots")
  parser.add_argument("--progress", action="store_true", help="show the fits' progress bars")
  parser.add_argument("--report", metavar="RESULTS_JSON",
                      help="print the tables of an earlier run's results.json and exit")
  args = parser.parse_args(argv)
  if args.report:
    done = json.loads(Path(args.report).read_text())
    for key, r in done["results"].items():
      print(report_collection(key, r) + "\n")
    print(report_summary(done["results"], done["summary"]))
    return
  cfg = smoke_config() if args.smoke else Config()
  for name in ("data", "seed", "out"):
    if getattr(args, name) is not None:
      setattr(cfg, name, getattr(args, name))
  for name in ("collections", "models", "regimes"):
    if getattr(args, name):
      setattr(cfg, name, tuple(getattr(args, name).split(",")))
  if args.fit:
    cfg.fit = {**cfg.fit, **json.loads(args.fit)}
  cfg.supervised = cfg.supervised or args.supervised
  cfg.quiet = not args.progress
  if not os.path.isdir(cfg.data):
    sys.exit(f"dev_suite: the data folder {cfg.data} does not exist. It should hold BEIR-layout "
             "collections (as ../shared/data beside the repository does); pass --data DIR, or "
             "--smoke for the shipped SciFact subset")
  found = discover(cfg.data)
  if cfg.collections:
    missing = sorted(set(cfg.collections) - set(found))
    if missing:
      sys.exit(f"dev_suite: no collection {missing} under {cfg.data}; found {sorted(found)}")
    found = {c: found[c] for c in cfg.collections}
  if not found:
    sys.exit(f"dev_suite: {cfg.data} holds no collection with qrels/test.tsv and embeddings/<model>/")
  bad = sorted(set(cfg.regimes) - set(REGIMES))
  if bad:
    sys.exit(f"dev_suite: --regimes must be among {list(REGIMES)}, got {bad}")

  results, started = {}, time.perf_counter()
  for coll, models in found.items():
    for model_name in models:
      if cfg.models and model_name not in cfg.models:
        continue
      t0 = time.perf_counter()
      r = run_collection(cfg, Path(cfg.data) / coll, model_name)
      results[f"{coll}/{model_name}"] = r
      print(f"\n({time.perf_counter() - t0:.0f} s)\n{report_collection(f'{coll}/{model_name}', r)}")
      plot_collection(r, os.path.join(cfg.out, f"{coll}-{model_name}.png"),
                      title=f"{coll}, {model_name}")
      sys.stdout.flush()
  summary = {"totals": totals(results), "minilm_64_kept": minilm_64_kept(results),
             "seconds": time.perf_counter() - started}
  print(f"\n{report_summary(results, summary)}")
  evaluation.write_json({"config": dataclasses.asdict(cfg), "summary": summary,
                         "results": results}, os.path.join(cfg.out, "results.json"))
  tables = "\n\n".join([report_collection(k, r) for k, r in results.items()]
                        + [report_summary(results, summary)])
  Path(cfg.out, "tables.md").write_text(tables + "\n")
  print(f"\nwrote {cfg.out}/results.json, {cfg.out}/tables.md and one PNG per collection and model")


def report_collection(key: str, r: dict) -> str:
  """Markdown tables of one collection and model: every regime, and the supervised fit if any."""
  coll, model = key.split("/")
  out = [f"### {coll} / {model}: d={r['d']}, {r['n_docs']} documents, {r['n_test']} test "
         f"queries, {r['n_train_queries']} train queries"]
  for regime, g in r["regimes"].items():
    out += [f"\n#### {regime} ({g['n_queries']} unlabeled queries, fit {g['fit_seconds']:.0f} s)",
            "", evaluation.format_table(g["table"], "ndcg@10"), "",
            evaluation.format_table(g["table"], "recall@100")]
  if "supervised" in r:
    s = r["supervised"]
    out += [f"\n#### supervised (train qrels, fit {s['fit_seconds']:.0f} s)", "",
            evaluation.format_table(s["table"], "ndcg@10")]
    if "table_unseen" in s:
      out += [f"\nThe {s['n_unseen']} test queries whose relevant documents are never relevant "
              "to a train query:", "", evaluation.format_table(s["table_unseen"], "ndcg@10")]
  return "\n".join(out)


def report_summary(results: dict, summary: dict) -> str:
  t = summary["totals"]
  kept = summary["minilm_64_kept"]
  lines = ["### Summary", "", summarise(results), "",
           f"Worst margin at dims <= d/4: {t['worst']:+.4f}; worst full size minus raw: "
           f"{t['worst_full_minus_raw']:+.4f}; mean margin by regime: "
           + ", ".join(f"{k} {v:+.4f}" for k, v in t["mean_by_regime"].items()) + "."]
  if kept:
    lines.append(f"all-MiniLM-L6-v2 at 64 dims keeps {100 * np.mean(list(kept.values())):.1f}% of "
                 "raw full-size nDCG@10 on average (" + ", ".join(
                     f"{k.split('/')[0]}/{k.split('/')[-1]} {100 * v:.1f}%" for k, v in kept.items())
                 + ").")
  lines.append(f"Suite time: {summary['seconds'] / 60:.1f} min.")
  return "\n".join(lines)

def plot_collection(r: dict, path, *, title: str) -> None:
  """nDCG@10 against dims, one panel per regime, one line per method."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  regimes = list(r["regimes"])
  fig, axes = plt.subplots(1, len(regimes), figsize=(4.5 * len(regimes), 3.8), dpi=110,
                           squeeze=False, sharey=True)
  for ax, regime in zip(axes[0], regimes):
    evaluation.plot_lines(ax, r["regimes"][regime]["table"], "ndcg@10")
    ax.set_title(f"{title}: {regime}", fontsize=9)
  axes[0][0].legend(fontsize=7)
  evaluation.save_figure(fig, path)


if __name__ == "__main__":
  main()
