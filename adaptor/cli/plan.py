"""`matryoshka-adaptor plan`: the command line of the budget plan_lib (`adaptor.plan`)."""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from adaptor import plan as plan_lib
from adaptor.api import load
from adaptor.plan import CONVENTIONS, DEFAULT_QUALITY, Grid, plan_budget, write_plan
from adaptor.cli.common import add_input_args, dims, load_inputs
from adaptor.data import InputError, check_output
from adaptor.index import MatryoshkaIndex

EXAMPLES = """\
examples (SciFact data shipped in data/; plan on the train queries, report on test):
  # the best configuration within 48 bytes/vector, with an adaptor
  matryoshka-adaptor plan --beir data/scifact --model all-MiniLM-L6-v2 \\
      --checkpoint checkpoints/scifact-minilm --bytes-per-vector 48 --out plans/minilm-48

  # the fewest bytes keeping 98% of full-size float32 nDCG@10
  matryoshka-adaptor plan --beir data/scifact --model all-MiniLM-L6-v2 --quality 0.98 \\
      --out plans/minilm-98

  # build an index with the chosen stores; its default search is the planned funnel
  matryoshka-adaptor index build --corpus data/scifact/embeddings/all-MiniLM-L6-v2/corpus.npy \\
      --checkpoint checkpoints/scifact-minilm --config plans/minilm-48/plan.json --out indexes/minilm
"""


def _positive_ints(text: str) -> tuple[int, ...]:
  try:
    out = tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError:
    out = ()
  if not out or any(v < 1 for v in out):
    raise argparse.ArgumentTypeError(f"expected comma-separated positive ints like 4,10,40, "
                                     f"got {text!r}")
  return out


def _cmd_plan(args):
  check_output(args.out, name="--out", overwrite=args.overwrite,
               members=("plan.json", "frontier.png"))
  corpus, corpus_ids, queries, query_ids, qrels = load_inputs(args, args.split)
  if queries is None:
    raise InputError("plan needs validation queries: --beir DIR --model NAME, or --queries FILE")
  if query_ids is None:
    query_ids = [str(i) for i in range(queries.shape[0])]
  if args.max_queries is not None and args.max_queries < queries.shape[0]:
    if args.max_queries < 1:
      raise InputError(f"--max-queries must be >= 1, got {args.max_queries}")
    pick = np.unique(np.linspace(0, queries.shape[0] - 1, args.max_queries).round().astype(int))
    queries, query_ids = np.asarray(queries[pick]), [query_ids[i] for i in pick]
  model = load(args.checkpoint, d_in=corpus.shape[1]) if args.checkpoint else None
  t = time.perf_counter()
  index = MatryoshkaIndex.build(corpus, ids=corpus_ids, adaptor=model, dims=())
  grid = Grid(dims=args.dims, **({"shortlists": args.shortlists} if args.shortlists else {}))
  plan = plan_budget(index, queries, k=args.k, qrels=qrels, query_ids=query_ids,
                     bytes_per_vector=args.bytes_per_vector, quality=args.quality, grid=grid,
                     convention=args.convention, repeats=args.repeats)
  took = time.perf_counter() - t
  c = plan.chosen
  print(f"{plan.n_queries} validation queries (split {args.split if args.beir else 'given'}), "
        f"{plan.n_docs} documents, d={plan.d}; {len(plan.candidates)} configurations measured "
        f"in {took:.0f} s; full-size float32 {plan.metric} {plan.full_quality:.4f}\n")
  print(plan.format_table())
  print(f"\n* chosen ({plan.criterion}): {c.label}  {c.bytes(plan.convention):g} bytes/vector in "
        f"memory, {c.stored_bytes:g} stored, {plan.metric} {c.quality:.4f} "
        f"({100 * c.relative:.1f}% of full float32), {c.ms_per_query:.3f} ms/query")
  out = os.fspath(args.out)
  write_plan(plan, os.path.join(out, "plan.json"))
  plan.plot(os.path.join(out, "frontier.png"),
            title=f"{plan.metric} vs bytes/vector ({plan.n_queries} validation queries)")
  print(f"\nwrote {out}/plan.json and {out}/frontier.png; build with: matryoshka-adaptor index "
        f"build --corpus ... {'--checkpoint ' + args.checkpoint + ' ' if args.checkpoint else ''}"
        f"--config {out}/plan.json --out INDEX")


def add_plan_command(subparsers) -> argparse.ArgumentParser:
  """Registers `plan` (the budget plan_lib) on a CLI's subparsers; handler raises InputError on bad input."""
  p = subparsers.add_parser(
      "plan", help="budget plan_lib: Pareto frontier of bytes/vector vs quality vs query time",
      description=plan_lib.__doc__.split("\n\n")[0], epilog=EXAMPLES,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  add_input_args(p, with_beir=True)
  p.add_argument("--checkpoint", help="adaptor checkpoint applied to documents and queries")
  p.add_argument("--split", default="train",
                 help="qrels split whose queries validate the plan (BEIR input; default train, "
                 "so that test stays for reporting)")
  how = p.add_mutually_exclusive_group()
  how.add_argument("--bytes-per-vector", type=float,
                   help="choose the best quality within this many bytes/vector in memory")
  how.add_argument("--quality", type=float,
                   help=f"choose the fewest bytes keeping this share of full-size float32 quality "
                   f"(default {DEFAULT_QUALITY})")
  p.add_argument("--k", type=int, default=10, help="results per query (nDCG@k / recall@k)")
  p.add_argument("--dims", type=dims, help="grid prefix dims (default 32,64,... and d)")
  p.add_argument("--shortlists", type=_positive_ints,
                 help="first-stage keeps of two-stage funnels, as multiples of k (default 4,10,40)")
  p.add_argument("--convention", choices=list(CONVENTIONS), default="first-stage",
                 help="bytes in memory: what the first stage scans (default, as "
                 "sentence-transformers counts) or every store the funnel reads")
  p.add_argument("--max-queries", type=int, help="use at most this many validation queries")
  p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration")
  p.add_argument("--out", required=True, help="folder for plan.json and frontier.png")
  p.add_argument("--overwrite", action="store_true",
                 help="replace plan.json and frontier.png in --out (refused otherwise)")
  p.set_defaults(handler=_cmd_plan)
  return p
