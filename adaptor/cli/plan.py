"""`matryoshka-adaptor plan`: the command line of the planners (`adaptor.plan`)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from adaptor.api import load
from adaptor.cli.common import (add_input_args, dims, load_inputs, load_query_files,
                                positive_ints)
from adaptor.data import InputError, check_output, load_beir
from adaptor.index import MatryoshkaIndex
from adaptor.plan import (CONVENTIONS, DEFAULT_QUALITY, Grid, plan_budget, plan_schedule,
                          write_plan)
from adaptor.search import format_schedule

DESCRIPTION = f"""\
Plans an index's search on validation queries and writes OUT/plan.json, which
`matryoshka-adaptor index build --config OUT/plan.json` reads: the quantised stores to
build and the index's default schedule. One mode:

  --recall R            the cheapest float funnel whose top k agrees with full-size exact
                        search on a share R of the results (recall@k against full-size
                        exact results), cheapest by the cost model at --corpus-size docs
  --bytes-per-vector B  the best quality within B bytes/vector in memory, over single-stage
                        and funnel searches of binary, int8 and float prefixes
  --quality Q           the fewest bytes/vector keeping a share Q of full-size float32
                        quality (nDCG@k with qrels, else recall@k); the default, Q={DEFAULT_QUALITY}

The budget modes (--bytes-per-vector, --quality) also write OUT/frontier.png. The corpus
comes from --index (a saved index, with its adaptor) or from --beir/--corpus (with
--checkpoint, adapted first); validation queries from --beir (the --split queries, with
their qrels) or --queries."""

EXAMPLES = """\
examples (SciFact data shipped in data/; plan on the train queries, report on test):
  # the best configuration within 48 bytes/vector, with an adaptor
  matryoshka-adaptor plan --beir data/scifact --model all-MiniLM-L6-v2 \\
      --checkpoint checkpoints/scifact-minilm --bytes-per-vector 48 --out plans/minilm-48

  # the fewest bytes keeping 98% of full-size float32 nDCG@10
  matryoshka-adaptor plan --beir data/scifact --model all-MiniLM-L6-v2 --quality 0.98 \\
      --out plans/minilm-98

  # the cheapest float funnel agreeing with full-size exact search on 99% of the top 10,
  # costed for a million documents, for a saved index
  matryoshka-adaptor plan --index indexes/minilm --beir data/scifact --model all-MiniLM-L6-v2 \\
      --recall 0.99 --corpus-size 1000000 --out plans/minilm-r99

  # build an index with the chosen stores; its default search is the planned funnel
  matryoshka-adaptor index build --corpus data/scifact/embeddings/all-MiniLM-L6-v2/corpus.npy \\
      --checkpoint checkpoints/scifact-minilm --config plans/minilm-48/plan.json --out indexes/minilm
"""

# Options of one mode only, refused in the other: (flag, attribute, budget modes only).
_MODE_OPTIONS = (("--corpus-size", "corpus_size", False), ("--shortlists", "shortlists", True),
                 ("--convention", "convention", True), ("--repeats", "repeats", True))


def _positive_int(text: str) -> int:
  if not text.strip().isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
  return int(text)


def _share(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = float("nan")
  if not 0 < value <= 1:
    raise argparse.ArgumentTypeError(f"expected a share in (0, 1] like 0.99, got {text!r}")
  return value


def _check_mode_options(args) -> str:
  """The mode's name; InputError for an option of the other mode."""
  recall = args.recall is not None
  mode = (f"--recall {args.recall:g}" if recall else
          f"--bytes-per-vector {args.bytes_per_vector:g}" if args.bytes_per_vector is not None
          else f"--quality {args.quality if args.quality is not None else DEFAULT_QUALITY:g}")
  wrong = [flag for flag, attr, budget_only in _MODE_OPTIONS
           if getattr(args, attr) is not None and budget_only == recall]
  if wrong:
    expected = ("the budget modes (--bytes-per-vector, --quality)" if recall else "--recall")
    raise InputError(f"{', '.join(wrong)}: expected only with {expected}, got with {mode}")
  return mode


def _index_and_queries(args):
  """(index, queries [n_q, d_in], query ids, qrels or None, where the queries came from)."""
  if args.index:
    given = [flag for flag, value in (("--corpus", args.corpus), ("--corpus-ids", args.corpus_ids),
                                      ("--checkpoint", args.checkpoint)) if value]
    if given:
      raise InputError(f"--index {args.index}: expected the corpus and its adaptor from the "
                       f"saved index alone, got also {', '.join(given)}")
    index = MatryoshkaIndex.load(args.index)
    if args.beir:
      if not args.model:
        raise InputError("--beir needs --model (a folder under <beir>/embeddings/)")
      queries, query_ids, qrels = load_beir(args.beir, args.model).split_queries(args.split)
      where = f"split {args.split}"
    else:
      queries, query_ids, qrels = load_query_files(args, index.ids)
      where = "given"
  else:
    corpus, corpus_ids, queries, query_ids, qrels = load_inputs(args, args.split)
    where = f"split {args.split}" if args.beir else "given"
    index = None
  if queries is None:
    raise InputError("plan needs validation queries: --beir DIR --model NAME, or --queries FILE")
  if index is None:
    model = load(args.checkpoint, d_in=corpus.shape[1]) if args.checkpoint else None
    index = MatryoshkaIndex.build(corpus, ids=corpus_ids, adaptor=model)
  return index, queries, query_ids, qrels, where


def _cmd_plan(args):
  mode = _check_mode_options(args)
  out = Path(args.out)
  check_output(out, name="--out", overwrite=args.overwrite, members=("plan.json", "frontier.png"))
  index, queries, query_ids, qrels, where = _index_and_queries(args)
  if query_ids is None:
    query_ids = [str(i) for i in range(queries.shape[0])]
  if args.max_queries is not None and args.max_queries < queries.shape[0]:
    if args.max_queries < 1:
      raise InputError(f"--max-queries must be >= 1, got {args.max_queries}")
    pick = np.unique(np.linspace(0, queries.shape[0] - 1, args.max_queries).round().astype(int))
    queries, query_ids = np.asarray(queries[pick]), [query_ids[i] for i in pick]
  t = time.perf_counter()
  if args.recall is not None:
    plan = plan_schedule(index, queries, k=args.k, target_recall=args.recall,
                         first_dims=args.dims, corpus_size=args.corpus_size)
  else:
    grid = Grid(dims=args.dims, **({"shortlists": args.shortlists} if args.shortlists else {}))
    plan = plan_budget(index, queries, k=args.k, qrels=qrels, query_ids=query_ids,
                       bytes_per_vector=args.bytes_per_vector, quality=args.quality, grid=grid,
                       convention=args.convention or "first-stage",
                       repeats=3 if args.repeats is None else args.repeats)
  took = time.perf_counter() - t
  print(f"{plan.n_queries} validation queries ({where}), {plan.n_docs} documents, d={plan.d}; ",
        end="")
  if args.recall is not None:
    print(f"{len(plan.candidates)} funnels measured in {took:.0f} s, cheapest first\n")
    print(plan.format_table())
    reached = "" if len(plan.schedule) > 1 else " (no cheaper funnel reached the target)"
    print(f"\n* chosen ({mode}): {format_schedule(plan.schedule)}{reached}  recall@{plan.k} vs "
          f"full exact {plan.recall:.4f}, est. {plan.cost:.3g} ms/query on the reference CPU at "
          f"{plan.corpus_size} documents ({plan.speedup:.1f}x cheaper than full-size exact)")
  else:
    print(f"{len(plan.candidates)} configurations measured in {took:.0f} s; full-size float32 "
          f"{plan.metric} {plan.full_quality:.4f}\n")
    print(plan.format_table())
    c = plan.chosen
    print(f"\n* chosen ({mode}): {c.label}  {c.bytes(plan.convention):g} bytes/vector in "
          f"memory, {c.stored_bytes:g} stored, {plan.metric} {c.quality:.4f} "
          f"({100 * c.relative:.1f}% of full float32), {c.ms_per_query:.3f} ms/query")
  write_plan(plan, out / "plan.json")
  written = [out / "plan.json"]
  if args.recall is None:
    plan.plot(out / "frontier.png",
              title=f"{plan.metric} vs bytes/vector ({plan.n_queries} validation queries)")
    written.append(out / "frontier.png")
  elif (out / "frontier.png").exists():   # From an earlier budget plan (--overwrite): not this one's.
    os.remove(out / "frontier.png")
  checkpoint = ("--checkpoint " + args.checkpoint + " " if args.checkpoint else
                "--checkpoint CK " if index.adaptor is not None else "")
  print(f"\nwrote {' and '.join(map(str, written))}; build with: matryoshka-adaptor index build "
        f"--corpus ... {checkpoint}--config {out / 'plan.json'} --out INDEX")


def add_plan_command(subparsers) -> argparse.ArgumentParser:
  """Registers `plan` (both planners) on a CLI's subparsers; handler raises InputError on bad input."""
  p = subparsers.add_parser(
      "plan", help="plan an index's search: cheapest funnel at a recall target, or stores and "
      "funnel for a memory or quality budget (plan.json for `index build --config`)",
      description=DESCRIPTION, epilog=EXAMPLES,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--index", help="a saved index to plan for (instead of --corpus or --beir's "
                 "corpus; it holds its adaptor)")
  add_input_args(p, with_beir=True)
  p.add_argument("--checkpoint", help="adaptor checkpoint applied to documents and queries")
  p.add_argument("--split", default="train",
                 help="qrels split whose queries validate the plan (BEIR input; default train, "
                 "so that test stays for reporting)")
  how = p.add_mutually_exclusive_group()
  how.add_argument("--recall", type=_share,
                   help="choose the cheapest float funnel reaching this recall@k against "
                   "full-size exact search, e.g. 0.99")
  how.add_argument("--bytes-per-vector", type=float,
                   help="choose the best quality within this many bytes/vector in memory")
  how.add_argument("--quality", type=float,
                   help=f"choose the fewest bytes keeping this share of full-size float32 quality "
                   f"(default {DEFAULT_QUALITY})")
  p.add_argument("--k", type=int, default=10, help="results per query (nDCG@k / recall@k)")
  p.add_argument("--dims", type=dims, help="prefix dims to consider (budget grid default "
                 "32,64,... and d; --recall default: the index's stored prefix dims)")
  p.add_argument("--corpus-size", type=_positive_int,
                 help="--recall: estimate costs for this many documents (default: the corpus's)")
  p.add_argument("--shortlists", type=positive_ints,
                 help="budget: first-stage keeps of two-stage funnels, as multiples of k "
                 "(default 4,10,40)")
  p.add_argument("--convention", choices=list(CONVENTIONS),
                 help="budget: bytes in memory: what the first stage scans (first-stage, the "
                 "default, as sentence-transformers counts) or every store the funnel reads")
  p.add_argument("--max-queries", type=int, help="use at most this many validation queries")
  p.add_argument("--repeats", type=int, help="budget: timed runs per configuration (default 3)")
  p.add_argument("--out", required=True, help="folder for plan.json (and frontier.png)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace plan.json and frontier.png in --out (refused otherwise)")
  p.set_defaults(handler=_cmd_plan)
  return p
