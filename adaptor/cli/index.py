"""`matryoshka-adaptor index build | search`: the command line of `adaptor.index` (planning: cli/plan.py)."""

from __future__ import annotations

import argparse
import time

from adaptor import quant
from adaptor.api import load
from adaptor.cli.common import argument_type, load_queries, write_run
from adaptor.data import InputError, check_output, load_embeddings
from adaptor.search import format_schedule, parse_schedule
from adaptor.index import VECTOR_DTYPES, MatryoshkaIndex
from adaptor.model import adaptor_fingerprint
from adaptor.plan import read_plan


def _parse_workers(text: str) -> str:
  if text != "auto" and not (text.isdigit() and int(text) >= 0):
    raise argparse.ArgumentTypeError(f"expected a count >= 0 or 'auto', got {text!r}")
  return text


def _cmd_build(args):
  check_output(args.out, name="--out", overwrite=args.overwrite)
  model = load(args.checkpoint) if args.checkpoint else None
  emb = load_embeddings(args.corpus, column=args.column, ids=args.corpus_ids,
                                name="--corpus")
  if model is not None and emb.vectors.shape[1] != model.d_in:
    raise InputError(f"--corpus {args.corpus}: adaptor {args.checkpoint} expects d={model.d_in}, "
                     f"got d={emb.vectors.shape[1]}")
  stores, schedule = list(args.stores or []), None
  if args.config:
    config = read_plan(args.config)
    d_out = model.d_out if model is not None else emb.vectors.shape[1]
    if config["d"] != d_out:
      raise InputError(f"--config {args.config}: planned for d={config['d']}, got an index of "
                       f"d={d_out}")
    found = None if model is None else adaptor_fingerprint(model)
    if config.get("adaptor_fingerprint") != found:
      raise InputError(f"--config {args.config}: planned with adaptor fingerprint "
                       f"{config.get('adaptor_fingerprint')}, got {found} (--checkpoint "
                       f"{args.checkpoint})")
    stores += [(st["precision"], st["dims"]) for st in config["stores"]]
    schedule = config["schedule"]
  t = time.perf_counter()
  from adaptor import interrupts
  with interrupts.deferred(done=f"the index had been saved to {args.out}"):
    index = MatryoshkaIndex.build(emb.vectors, ids=emb.ids, adaptor=model,
                                  precision=args.precision, stores=stores,
                                  calibration_rows=args.calibration_rows, schedule=schedule)
    interrupts.check(f"nothing written to {args.out}; rerun the command")
    index.save(args.out, overwrite=args.overwrite)
  print(f"saved {index!r} to {args.out} ({time.perf_counter() - t:.1f} s)"
        + (f"; default schedule {format_schedule(index.schedule)}" if schedule else ""))


def _cmd_search(args):
  if args.output:
    check_output(args.output, name="--output", overwrite=args.overwrite)
  workers = None if args.workers == "auto" else int(args.workers)
  index = MatryoshkaIndex.load(args.index, workers=workers)
  try:
    queries, query_ids = load_queries(args)
    t = time.perf_counter()
    scores, ids = index.search(queries, args.k, dim=args.dim, schedule=args.schedule,
                               precision=args.precision)
    took = time.perf_counter() - t
  finally:
    index.stop_workers()
  if args.output:
    write_run(args.output, query_ids, ids, scores)
    print(f"wrote {len(query_ids)} x {args.k} results to {args.output} ({took:.2f} s)")
  else:
    for qid, row in zip(query_ids, ids):
      print(qid + "\t" + " ".join(row))


def add_index_commands(subparsers) -> argparse.ArgumentParser:
  """Registers `index build|search` on a CLI's subparsers.

  Each leaf parser gets `handler=fn(args)`; handlers raise InputError (a
  ValueError) or OSError on bad input, which the CLI maps to exit status 2.

  Returns:
    the `index` parser.
  """
  p = subparsers.add_parser("index", help="build and search a Matryoshka search index")
  sub = p.add_subparsers(dest="index_command", required=True)

  b = sub.add_parser("build", help="adapt and store a corpus as an index")
  b.add_argument("--corpus", required=True, help="corpus embeddings (.npy, .npz, .parquet, HF)")
  b.add_argument("--corpus-ids", help="text file with one corpus id per line")
  b.add_argument("--column", help="embedding column/array name")
  b.add_argument("--checkpoint", help="adaptor checkpoint applied to documents and queries")
  b.add_argument("--precision", default="float32", choices=sorted(VECTOR_DTYPES))
  b.add_argument("--stores", type=argument_type(quant.parse_stores),
                 help="quantised stores to add, e.g. binary:768,int8:256")
  b.add_argument("--calibration-rows", type=int,
                 help="int8 calibration sample (evenly spaced rows; default: all)")
  b.add_argument("--config", help="plan.json from `matryoshka-adaptor plan`: adds its stores "
                 "and makes its schedule the index's default search")
  b.add_argument("--out", required=True, help="index directory (written atomically)")
  b.add_argument("--overwrite", action="store_true", help="replace an existing index")
  b.set_defaults(handler=_cmd_build)

  s = sub.add_parser("search", help="top-k documents per query (exact at a dim, or a funnel)")
  s.add_argument("--index", required=True, help="index directory")
  s.add_argument("--queries", required=True, help="raw query embeddings")
  s.add_argument("--query-ids", help="text file with one query id per line")
  s.add_argument("--column", help="embedding column/array name")
  s.add_argument("--k", type=int, default=10)
  how = s.add_mutually_exclusive_group()
  how.add_argument("--dim", type=int, help="prefix length for exact search (default: all)")
  how.add_argument("--schedule", type=argument_type(parse_schedule),
                   help="funnel of DIM:KEEP[:PRECISION] stages, e.g. 32:1000,768:10 or "
                   "256:400:binary,256:40:int8,768:10 (default: the index's planned schedule, "
                   "if it has one, else exact at all dims)")
  s.add_argument("--precision", choices=list(quant.PRECISIONS),
                 help="with --dim: exact search over the int8 or binary store")
  s.add_argument("--output", help="run TSV (query-id, corpus-id, rank, score); default: print")
  s.add_argument("--overwrite", action="store_true", help="replace an existing --output")
  s.add_argument("--workers", default="0", type=_parse_workers,
                 help="search in N worker processes, one per CPU ('auto': every CPU this "
                 "process may use); pays off for many queries on a large index (default 0: "
                 "search in this process)")
  s.set_defaults(handler=_cmd_search)
  return p
