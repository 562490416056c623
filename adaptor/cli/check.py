"""`matryoshka-adaptor check FILE`: the command line of `adaptor.doctor`."""

from __future__ import annotations

import argparse

from adaptor.cli.common import cli_message
from adaptor.doctor import describe

EXAMPLES = """\
examples:
  matryoshka-adaptor check data/scifact/embeddings/all-MiniLM-L6-v2/corpus.npy \\
      --ids data/scifact/embeddings/all-MiniLM-L6-v2/corpus_ids.txt
  matryoshka-adaptor check corpus.parquet --column embedding
  matryoshka-adaptor check checkpoints/scifact-minilm
"""

def run_check(args: argparse.Namespace) -> int:
  """Prints a short report on `args.path`; returns 0 if it is usable, else 2."""
  summary, problems = describe(args.path, column=args.column, ids=args.ids)
  if not problems:
    print(f"{args.path}: OK, {summary}")
    return 0
  noun = "problem" if len(problems) == 1 else "problems"
  print(f"{args.path}: {len(problems)} {noun} ({summary})")
  for p in problems:
    print(f"  - {cli_message(p)}")
  return 2


def add_check_command(subparsers) -> argparse.ArgumentParser:
  """Registers `check FILE [--column C] [--ids IDS]`; its handler is `args.handler`.

  The handler (`run_check`) returns the exit code: 0 when FILE is usable, 2
  when it lists problems.
  """
  p = subparsers.add_parser(
      "check", help="list every problem of an embeddings file, checkpoint, index or apply output",
      description="Reads an embeddings file (.npy, .npz, .parquet, saved dataset), an "
                  "adaptor checkpoint directory, a search index or a streamed apply output "
                  "directory and lists every problem found; exits 0 if there are none, 2 "
                  "otherwise.",
      epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("path", metavar="FILE",
                 help="embeddings file/dataset, checkpoint, index or apply-output directory")
  p.add_argument("--column", help="embedding column/array name (npz, parquet, HF datasets)")
  p.add_argument("--ids", help="text file with one id per row, checked against FILE")
  p.set_defaults(handler=run_check)
  return p
