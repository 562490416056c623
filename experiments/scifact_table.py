"""Raw truncation vs PCA vs Matryoshka-Adaptor (unsupervised and supervised) on SciFact.

Fits on the train split only (corpus embeddings and train-query embeddings; the
supervised adaptor also on the train qrels), evaluates nDCG@10 and Recall@100 on
the 300 test queries, and again on the test queries none of whose relevant
documents are judged for any train query (where a supervised adaptor cannot
gain by memorising which documents tend to be relevant).

Run (both models, about 10 minutes on 2 cores):
  python experiments/scifact_table.py --data ../shared/data/scifact --out results/scifact

Ablations (the paper's architecture and losses; MiniLM, about 15 minutes):
  python experiments/scifact_table.py --data ../shared/data/scifact --models all-MiniLM-L6-v2 \
      --ablations --out results/scifact-ablations

Run locally in about two minutes (shipped MiniLM data, few steps):
  python experiments/scifact_table.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import numpy as np

import adaptor
from adaptor import evaluation

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Config:
  data: str = str(REPO.parent / "shared" / "data" / "scifact")
  models: tuple[str, ...] = ("all-MiniLM-L6-v2", "all-mpnet-base-v2")
  dims: tuple[int, ...] = (16, 32, 64, 128, 256)  # plus the full size
  steps: int | None = None                         # None: library defaults
  supervised_steps: int | None = None
  seed: int = 0
  out: str = "results/scifact"
  quiet: bool = False
  ablations: bool = False  # also fit the paper's variants (slower): no reorder stage; paper losses


def smoke_config() -> Config:
  return Config(data=str(REPO / "data" / "scifact"), models=("all-MiniLM-L6-v2",),
                dims=(16, 32, 64), steps=30, supervised_steps=30, out="results/scifact-smoke",
                quiet=True)


def unseen_subset(test_qrels, train_qrels):
  """Test queries none of whose relevant documents is relevant to some train query."""
  seen = {d for judged in train_qrels.values() for d, g in judged.items() if g > 0}
  return {q: j for q, j in test_qrels.items()
          if not any(g > 0 and d in seen for d, g in j.items())}


def run_model(cfg: Config, model_name: str) -> dict:
  data = adaptor.load_beir(cfg.data, model_name)
  corpus = np.asarray(data.corpus.vectors, np.float32)
  d = corpus.shape[1]
  dims = tuple(m for m in cfg.dims if m < d) + (d,)
  train_q, train_ids, train_qrels = data.split_queries("train")
  test_q, test_ids, test_qrels = data.split_queries("test")
  overrides = {k: v for k, v in {"steps": cfg.steps,
                                 "supervised_steps": cfg.supervised_steps}.items() if v is not None}

  t0 = time.time()
  unsup = adaptor.fit(corpus, queries=train_q, seed=cfg.seed, quiet=cfg.quiet, **overrides)
  unsup_seconds = time.time() - t0
  t0 = time.time()
  sup = adaptor.fit(corpus, queries=train_q, qrels=train_qrels, query_ids=train_ids,
                    corpus_ids=data.corpus.ids, seed=cfg.seed, quiet=cfg.quiet, **overrides)
  sup_seconds = time.time() - t0

  methods = {
      "raw truncation": evaluation.Raw(),
      "PCA (uncentred)": evaluation.PCA(corpus, center=False),
      "PCA (centred)": evaluation.PCA(corpus, center=True),
      "adaptor (unsupervised)": unsup,
      "adaptor (supervised)": sup,
  }
  if cfg.ablations:
    # The paper's architecture, e + f(e) with an MLP and no reorder stage, with our
    # objective, and with the paper's own losses (pairwise, top-k, reconstruction).
    plain = dict(reorder=False, hidden=512, seed=cfg.seed, quiet=cfg.quiet, **overrides)
    methods["ablation: e + f(e), rank loss"] = adaptor.fit(corpus, queries=train_q, **plain)
    paper = adaptor.LossWeights(pairwise=1.0, topk=1.0, reconstruction=1.0, rank=0.0)
    methods["ablation: e + f(e), paper losses"] = adaptor.fit(
        corpus, queries=train_q, weights=paper, neighbours=10, **plain)
  results = evaluation.compare(methods, corpus, test_q, query_ids=test_ids,
                               corpus_ids=data.corpus.ids, qrels=test_qrels, dims=dims)
  unseen = unseen_subset(test_qrels, train_qrels)
  keep = [i for i, q in enumerate(test_ids) if q in unseen]
  unseen_results = evaluation.compare(
      {k: methods[k] for k in ("raw truncation", "PCA (uncentred)", "adaptor (unsupervised)",
                               "adaptor (supervised)")},
      corpus, test_q[keep], query_ids=[test_ids[i] for i in keep], corpus_ids=data.corpus.ids,
      qrels=unseen, dims=dims)
  return {"d": d, "dims": list(dims), "n_test": len(test_ids), "n_unseen": len(keep),
          "fit_seconds": {"unsupervised": unsup_seconds, "supervised": sup_seconds},
          "stages": {"unsupervised": _stage_summary(unsup), "supervised": _stage_summary(sup)},
          "test": results, "test_unseen": unseen_results}


def _stage_summary(model):
  return {k: {"steps": v["steps"], "best_val": v["best_val"]} for k, v in model.info["stages"].items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="seconds-long run on the shipped data")
  parser.add_argument("--data", help="BEIR-layout SciFact folder")
  parser.add_argument("--models", help="comma-separated model folders")
  parser.add_argument("--steps", type=int)
  parser.add_argument("--supervised-steps", type=int)
  parser.add_argument("--seed", type=int)
  parser.add_argument("--out", help="folder for results.json and plots")
  parser.add_argument("--quiet", action="store_true")
  parser.add_argument("--ablations", action="store_true",
                      help="also fit the paper's variants (no reorder stage; paper losses)")
  args = parser.parse_args()
  cfg = smoke_config() if args.smoke else Config()
  for field in ("data", "steps", "supervised_steps", "seed", "out"):
    if getattr(args, field) is not None:
      setattr(cfg, field, getattr(args, field))
  if args.models:
    cfg.models = tuple(args.models.split(","))
  cfg.quiet = cfg.quiet or args.quiet
  cfg.ablations = cfg.ablations or args.ablations
  if not os.path.isdir(cfg.data):
    parser.error(f"--data {cfg.data} is not a folder (the SciFact data in BEIR layout)")

  report = {"config": dataclasses.asdict(cfg), "models": {}}
  for model_name in cfg.models:
    r = run_model(cfg, model_name)
    report["models"][model_name] = r
    full = r["test"]["raw truncation"][str(r["d"])]["ndcg@10"]
    print(f"\n## {model_name} (d={r['d']}), {r['n_test']} test queries; "
          f"unsupervised fit {r['fit_seconds']['unsupervised']:.0f} s, "
          f"supervised fit {r['fit_seconds']['supervised']:.0f} s\n")
    print(evaluation.format_table(r["test"], "ndcg@10", reference=full))
    print(f"\nRecall@100:\n\n{evaluation.format_table(r['test'], 'recall@100')}")
    print(f"\nnDCG@10 on the {r['n_unseen']} test queries whose relevant documents are "
          f"never relevant for a train query:\n")
    print(evaluation.format_table(r["test_unseen"], "ndcg@10"))
    evaluation.plot(r["test"], os.path.join(cfg.out, f"{model_name}-ndcg10.png"),
                    title=f"SciFact test, {model_name}")
  evaluation.write_json(report, os.path.join(cfg.out, "results.json"))
  print(f"\nwrote {cfg.out}/results.json and plots")


if __name__ == "__main__":
  main()
