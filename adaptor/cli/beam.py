"""`python -m adaptor.beam`: the command line of the Beam pipeline (`adaptor.beam.run_pipeline`).

Run as `python -m adaptor.beam` (or `python -m adaptor.cli.beam`); needs the `beam` extra.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from adaptor.beam import BATCH_SIZE, DTYPES, ROWS_PER_SPLIT, run_pipeline
from adaptor.checkpoint import CheckpointError
from adaptor.data import InputError

_EPILOG = """\
examples:
  python -m adaptor.beam --checkpoint checkpoints/scifact --inputs 'shards/*.npy' \\
      --output out/ --dim 64 --dtype float16
  python -m adaptor.beam --checkpoint gs://b/ckpt --inputs 'gs://b/emb/*.parquet' \\
      --ids-column id --output gs://b/out --dim 64 \\
      --runner=DataflowRunner --project=P --region=us-central1 \\
      --temp_location=gs://b/tmp --setup_file=./setup.py

Arguments this command does not know are passed to Beam's PipelineOptions.
"""


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m adaptor.beam`: runs `run_pipeline`; returns the exit status."""
  parser = argparse.ArgumentParser(
      prog="python -m adaptor.beam", epilog=_EPILOG,
      # No abbreviations: an unknown Beam option must never be taken for a prefix of ours.
      allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Apply a fitted adaptor to embedding files with an Apache Beam pipeline.")
  parser.add_argument("--checkpoint", required=True, help="adaptor checkpoint directory")
  parser.add_argument("--inputs", required=True, action="append",
                      help="glob of .npy/.parquet files (repeatable)")
  parser.add_argument("--output", required=True, help="output folder")
  parser.add_argument("--dim", type=int, default=None, help="output dims (default d_out)")
  parser.add_argument("--dtype", default="float32", choices=DTYPES)
  parser.add_argument("--column", default="embedding", help="Parquet vector column")
  parser.add_argument("--ids-column", default=None, help="Parquet ids column")
  parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="rows per device call")
  parser.add_argument("--rows-per-split", type=int, default=ROWS_PER_SPLIT,
                      help="rows per .npy read and per intermediate part")
  args, beam_args = parser.parse_known_args(argv)
  try:
    summary = run_pipeline(
        checkpoint=args.checkpoint, inputs=args.inputs, output=args.output, dim=args.dim,
        dtype=args.dtype, pipeline_args=beam_args, column=args.column,
        ids_column=args.ids_column, batch_size=args.batch_size,
        rows_per_split=args.rows_per_split)
  except (InputError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
