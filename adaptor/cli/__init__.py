"""Command line: `matryoshka-adaptor fit | apply | eval | export | index | qdrant | plan | check`.

Bad input (a file, an array, a checkpoint) exits with status 2 and one line
that names the thing, what was expected and what was found.

Every argparse use of the package lives here, one module per command family:
core (fit, apply, eval, export), index (build, search), plan (either planner,
writing the plan.json that `index build --config` reads), qdrant, check, and
beam (`python -m adaptor.beam`); common holds what they share. The library modules
raise errors that name their Python arguments; `common.cli_message` words them
as flags.
"""

from __future__ import annotations

import argparse
import sys

from adaptor.cli.check import add_check_command
from adaptor.cli.common import EXAMPLES, cli_message
from adaptor.cli.core import add_core_commands
from adaptor.cli.index import add_index_commands
from adaptor.cli.plan import add_plan_command
from adaptor.cli.qdrant import add_qdrant_commands


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="matryoshka-adaptor",
      description="Make the embeddings of a frozen model truncatable (Matryoshka-Adaptor).",
      epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  add_core_commands(sub)
  add_index_commands(sub)
  add_qdrant_commands(sub)
  add_plan_command(sub)
  add_check_command(sub)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  from adaptor import interrupts

  try:
    with interrupts.handled():  # SIGINT/SIGTERM: one line and 130/143, no traceback.
      rc = args.handler(args)
  except interrupts.Interrupted as e:
    print(f"\nmatryoshka-adaptor {args.command}: interrupted by {e.signame}: {e.kept}",
          file=sys.stderr)
    return e.exit_code
  except KeyboardInterrupt:  # Outside the main thread, where no handler can be installed.
    print(f"\nmatryoshka-adaptor {args.command}: interrupted", file=sys.stderr)
    return 130
  except (ValueError, OSError) as e:  # InputError and CheckpointError are ValueErrors.
    print(f"matryoshka-adaptor {args.command}: error: {cli_message(e)}", file=sys.stderr)
    return 2
  return rc or 0

