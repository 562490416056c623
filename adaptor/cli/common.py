"""What the command families of `adaptor.cli` share: argument types, input loading, messages."""

from __future__ import annotations

import argparse

import numpy as np

EXAMPLES = """\
examples (on the SciFact data shipped in data/):
  # fit an unsupervised adaptor on corpus embeddings (+ unlabeled train queries)
  matryoshka-adaptor fit --beir data/scifact --model all-MiniLM-L6-v2 --out checkpoints/scifact-minilm

  # fit a supervised adaptor on the train qrels
  matryoshka-adaptor fit --beir data/scifact --model all-MiniLM-L6-v2 --supervised \\
      --out checkpoints/scifact-minilm-sup

  # compare raw truncation, PCA and the adaptor on the test queries (table + JSON + PNG)
  matryoshka-adaptor eval --beir data/scifact --model all-MiniLM-L6-v2 \\
      --checkpoint checkpoints/scifact-minilm --out results/scifact-minilm

  # adapt any embeddings file to 64 dims (float16)
  matryoshka-adaptor apply --checkpoint checkpoints/scifact-minilm \\
      --input data/scifact/embeddings/all-MiniLM-L6-v2/corpus.npy --dim 64 --dtype float16 \\
      --output corpus-64.npy

  # stream a directory of .npy shards (ids in <stem>.ids.txt) far larger than memory into
  # float16 Parquet shards + manifest.json; rerun the same command to resume after a crash
  matryoshka-adaptor apply --checkpoint checkpoints/scifact-minilm \\
      --input 'embeddings/*.npy' --dim 64 --dtype float16 --format parquet --output corpus-64/
"""

# Library messages name the Python argument; on the command line the flag is what the user
# types. Each pair is (library wording, CLI wording), applied to every error the CLI prints.
FLAG_WORDING = (
    ("overwrite=True", "--overwrite"),
    ("bytes_per_vector must", "--bytes-per-vector must"),
    ("quality must be reachable", "--quality must be reachable"),
    ("column= and ids= apply", "--column and --ids apply"),
)


def cli_message(error: BaseException | str) -> str:
  """The text of a library error (or problem) as the CLI prints it: argument names as flags."""
  text = str(error)
  for library, cli in FLAG_WORDING:
    text = text.replace(library, cli)
  return text


def argument_type(parse):
  """An argparse `type=` from a parser that raises ValueError (argparse shows its message)."""
  def parse_arg(text: str):
    try:
      return parse(text)
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e)) from None
  parse_arg.__name__ = parse.__name__
  return parse_arg


def _ints(text: str, *, example: str, positive: bool) -> tuple[int, ...]:
  try:
    out = tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError:
    out = ()
  if not out or (positive and any(v < 1 for v in out)):
    raise argparse.ArgumentTypeError(f"expected comma-separated {'positive ' if positive else ''}"
                                     f"ints like {example}, got {text!r}")
  return out


def dims(text: str) -> tuple[int, ...]:
  """ "16,32,64" -> (16, 32, 64): the argparse type of --dims."""
  return _ints(text, example="16,32,64", positive=False)


def positive_ints(text: str) -> tuple[int, ...]:
  """ "4,10,40" -> (4, 10, 40), every value >= 1: an argparse type."""
  return _ints(text, example="4,10,40", positive=True)


def add_input_args(p: argparse.ArgumentParser, *, with_beir: bool) -> None:
  """--beir/--model (optionally) and --corpus/--queries/--qrels with their ids and column."""
  if with_beir:
    p.add_argument("--beir", help="BEIR-layout folder with embeddings/<model>/ and qrels/")
    p.add_argument("--model", help="embedding model folder under <beir>/embeddings/")
  p.add_argument("--corpus", help="corpus embeddings: .npy, .npz, .parquet or a saved HF dataset")
  p.add_argument("--column", help="embedding column/array name (npz, parquet, HF datasets)")
  p.add_argument("--corpus-ids", help="text file with one corpus id per line")
  p.add_argument("--queries", help="query embeddings (same formats as --corpus)")
  p.add_argument("--query-ids", help="text file with one query id per line")
  p.add_argument("--qrels", help="BEIR qrels TSV (query-id, corpus-id, score)")


def load_inputs(args, split):
  """Corpus, queries and qrels from --beir/--model or from individual files."""
  from adaptor.data import InputError, load_beir, load_embeddings

  if getattr(args, "beir", None):
    if not args.model:
      raise InputError("--beir needs --model (a folder under <beir>/embeddings/)")
    data = load_beir(args.beir, args.model)
    queries, query_ids, qrels = data.split_queries(split)
    return data.corpus.vectors, data.corpus.ids, queries, query_ids, qrels
  if not args.corpus:
    raise InputError("give --beir ROOT --model NAME, or --corpus FILE")
  corpus = load_embeddings(args.corpus, column=args.column, ids=args.corpus_ids, name="--corpus")
  queries, query_ids, qrels = load_query_files(args, corpus.ids)
  return corpus.vectors, corpus.ids, queries, query_ids, qrels


def load_query_files(args, doc_ids):
  """--queries (with --query-ids and --column) and --qrels judging them against `doc_ids`.

  Returns:
    (queries [n, d], their ids or None, qrels or None), only the judged
    queries when --qrels is given; (None, None, None) without --queries.
  """
  from adaptor.data import InputError, check_qrels, load_embeddings, load_qrels

  queries = query_ids = qrels = None
  if args.queries:
    q = load_embeddings(args.queries, column=args.column, ids=args.query_ids, name="--queries")
    queries, query_ids = q.vectors, q.ids
  if args.qrels:
    qrels = load_qrels(args.qrels)
    if doc_ids is None or query_ids is None:
      raise InputError("--qrels needs --queries with --query-ids and --corpus-ids")
    check_qrels(qrels, query_ids=query_ids, doc_ids=doc_ids, name=args.qrels)
    judged = [i for i, q in enumerate(query_ids) if q in qrels]
    queries, query_ids = np.asarray(queries[judged]), [query_ids[i] for i in judged]
  return queries, query_ids, qrels


def load_queries(args):
  """--queries (with --query-ids and --column) -> (vectors [n, d], ids; row numbers without)."""
  from adaptor.data import load_embeddings

  emb = load_embeddings(args.queries, column=args.column, ids=args.query_ids, name="--queries")
  ids = emb.ids or [str(i) for i in range(emb.vectors.shape[0])]
  return emb.vectors, ids


def write_run(path, query_ids, ids, scores) -> None:
  """Writes a TREC-style run TSV (query-id, doc-id, rank, score) atomically."""
  from adaptor.data import atomic_file

  with atomic_file(path) as f:
    f.write("query-id\tcorpus-id\trank\tscore\n")
    for qid, row_ids, row_scores in zip(query_ids, ids, scores):
      for rank, (doc, s) in enumerate(zip(row_ids, row_scores), 1):
        f.write(f"{qid}\t{doc}\t{rank}\t{s:.6f}\n")
