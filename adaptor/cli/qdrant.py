"""`matryoshka-adaptor qdrant upload | search`: the command line of `adaptor.qdrant`."""

from __future__ import annotations

import argparse
import time

from adaptor import qdrant
from adaptor.api import load
from adaptor.cli.common import write_run
from adaptor.data import InputError, load_embeddings
from adaptor.qdrant import (DEFAULT_BATCH, QUANTIZATIONS, create_collection, search, upload,
                            vector_name)

def _parse_dims(text: str) -> tuple[int, ...]:
  try:
    dims = tuple(int(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated ints like 32,128,768, got "
                                     f"{text!r}") from None
  return dims


def _parse_quantization(text: str) -> dict[int, str]:
  out = {}
  for part in text.split(","):
    m, _, q = part.strip().partition(":")
    if not m.isdigit() or q not in QUANTIZATIONS:
      raise argparse.ArgumentTypeError(f"expected DIM:KIND items, kind one of {list(QUANTIZATIONS)}, "
                                       f"like 32:binary,128:int8; got {text!r}")
    out[int(m)] = q
  return out


def _where(args) -> dict:
  return {"path": args.path, "url": args.url, "api_key": args.api_key}


def _cmd_upload(args):
  where = _where(args)
  if args.shards:
    if args.vectors or args.checkpoint:
      raise InputError("give --shards (apply output) or --vectors [--checkpoint], not both")
    from adaptor.stream import read_shards
    vectors, ids = read_shards(args.shards)
  elif args.vectors:
    emb = load_embeddings(args.vectors, column=args.column, ids=args.ids, name="--vectors")
    vectors, ids = emb.vectors, emb.ids
    if args.checkpoint:
      vectors = load(args.checkpoint, d_in=vectors.shape[1]).apply(vectors)
  else:
    raise InputError("give --vectors FILE (adapted, or raw with --checkpoint) or --shards DIR")
  dims = args.dims or (vectors.shape[1],)
  created = create_collection(args.collection, dims, quantization=args.quantization,
                              hnsw_dims=args.hnsw_dims, overwrite=args.overwrite, **where)
  stats = upload(args.collection, vectors, ids=ids, batch_size=args.batch_size, quiet=args.quiet,
                 **where)
  print(f"{'created' if created else 'kept'} collection {args.collection} (prefixes "
        f"{[vector_name(m) for m in sorted(set(dims))]}); {stats['points']} points: "
        f"{stats['uploaded']} uploaded, {stats['skipped']} already there "
        f"({stats['seconds']:.1f} s)")


def _cmd_search(args):
  emb = load_embeddings(args.queries, column=args.column, ids=args.query_ids, name="--queries")
  query_ids = emb.ids or [str(i) for i in range(emb.vectors.shape[0])]
  model = load(args.checkpoint, d_in=emb.vectors.shape[1]) if args.checkpoint else None
  t = time.perf_counter()
  scores, ids = search(args.collection, emb.vectors, args.schedule, k=args.k, adaptor=model,
                       exact=args.exact, hnsw_ef=args.hnsw_ef, **_where(args))
  took = time.perf_counter() - t
  if args.output:
    write_run(args.output, query_ids, ids, scores)
    print(f"wrote {len(query_ids)} x {ids.shape[1]} results to {args.output} ({took:.2f} s)")
  else:
    for qid, row in zip(query_ids, ids):
      print(qid + "\t" + " ".join(str(v) for v in row))


def add_qdrant_commands(subparsers) -> argparse.ArgumentParser:
  """Registers `qdrant upload|search` on a CLI's subparsers (handlers as in index.py)."""
  p = subparsers.add_parser("qdrant", help="upload to and funnel-search a Qdrant collection",
                            description=qdrant.__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="qdrant_command", required=True)

  def where_args(q):
    w = q.add_mutually_exclusive_group(required=True)
    w.add_argument("--path", help="embedded local mode: a folder (':memory:' for RAM)")
    w.add_argument("--url", help="a Qdrant server, e.g. http://localhost:6333")
    q.add_argument("--api-key", help="server API key (default: $QDRANT_API_KEY)")
    q.add_argument("--collection", required=True)
    q.add_argument("--column", help="embedding column/array name")

  u = sub.add_parser(
      "upload", help="create the collection (one named vector per prefix) and upload; resumable",
      epilog="example:\n  matryoshka-adaptor qdrant upload --path qdrant-data --collection scifact "
      "\\\n      --vectors corpus.npy --ids corpus_ids.txt --checkpoint checkpoints/scifact-minilm "
      "--dims 32,128,384",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  where_args(u)
  u.add_argument("--vectors", help="document vectors: adapted, or raw with --checkpoint")
  u.add_argument("--ids", help="text file with one document id per line")
  u.add_argument("--checkpoint", help="adaptor applied to --vectors first")
  u.add_argument("--shards", help="an `apply --output DIR` directory (vectors and ids)")
  u.add_argument("--dims", type=_parse_dims, help="prefix sizes, one named vector each, e.g. "
                 "32,128,768 (default: the full size only)")
  u.add_argument("--quantization", type=_parse_quantization, default={},
                 help="per prefix, e.g. 32:binary,128:int8 (servers only)")
  u.add_argument("--hnsw-dims", type=_parse_dims,
                 help="prefixes that get an HNSW graph (default all), e.g. 32")
  u.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
  u.add_argument("--overwrite", action="store_true",
                 help="delete and recreate an existing collection (start over; without it, a "
                 "collection with the same prefixes is resumed: existing points are kept)")
  u.add_argument("--quiet", action="store_true")
  u.set_defaults(handler=_cmd_upload)

  s = sub.add_parser("search", help="funnel search, e.g. --schedule 32:500,128:50,768:10")
  where_args(s)
  s.add_argument("--queries", required=True, help="query embeddings (raw with --checkpoint)")
  s.add_argument("--query-ids", help="text file with one query id per line")
  s.add_argument("--checkpoint", help="adaptor applied to the queries first")
  s.add_argument("--schedule", required=True, help="DIM:KEEP stages, e.g. 32:500,128:50,768:10")
  s.add_argument("--k", type=int, help="results per query (default: the schedule's last keep)")
  s.add_argument("--exact", action="store_true", help="exact first stage (servers)")
  s.add_argument("--hnsw-ef", type=int, help="first stage HNSW beam width (servers)")
  s.add_argument("--output", help="run TSV (query-id, corpus-id, rank, score); default: print")
  s.set_defaults(handler=_cmd_search)
  return p
