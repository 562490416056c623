"""Ctrl-C and SIGTERM: finish the current step, keep what is done, say how to resume.

A KeyboardInterrupt raised at an arbitrary bytecode can land inside jax's
tracing or XLA's compilation, and a process that then exits while XLA's
threads still run can crash (exit 139) instead of stopping. So long jobs run
inside `deferred()`: there SIGINT and SIGTERM are only recorded, and the job
calls `check()` where stopping is safe (after a training step, between
output batches); `check` raises `Interrupted`, which says what was kept.
Outside `deferred()` blocks, the handler installed by `handled()` raises
`Interrupted` at once, as Python does for SIGINT, and for SIGTERM too.

    with interrupts.handled():                     # the CLI, around a command
      with interrupts.deferred(done="saved to X"):
        for step in ...:
          ...
          interrupts.check(lambda: save_and_describe())

The CLI turns `Interrupted` into one line on stderr and exit status 128 +
the signal number: 130 for SIGINT, 143 for SIGTERM. Signal handlers can
only be installed from the main thread; elsewhere these are no-ops and
signals behave as Python's defaults.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"depth": 0, "pending": None, "installed": False}


class Interrupted(KeyboardInterrupt):
  """A job stopped by SIGINT or SIGTERM at a safe point.

  Attributes:
    signum: the signal number.
    kept: what the job kept and how to resume, e.g. "resume state at step 40
      kept in out.train; rerun the same command to resume".
  """

  def __init__(self, signum: int, kept: str):
    super().__init__(f"interrupted by {signal.Signals(signum).name}; {kept}")
    self.signum = signum
    self.kept = kept

  @property
  def exit_code(self) -> int:
    return 128 + self.signum

  @property
  def signame(self) -> str:
    return signal.Signals(self.signum).name


def _handler(signum, frame):
  if _state["depth"] > 0:
    if _state["pending"] is None:
      _state["pending"] = signum
    return
  raise Interrupted(signum, "nothing was written by the interrupted step")


def _main_thread() -> bool:
  return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def handled():
  """Installs the SIGINT/SIGTERM handler for the duration of the block (main thread only)."""
  if _state["installed"] or not _main_thread():
    yield
    return
  old = {s: signal.signal(s, _handler) for s in _SIGNALS}
  _state["installed"] = True
  try:
    yield
  finally:
    for s, h in old.items():
      signal.signal(s, h)
    _state.update(installed=False, pending=None)


def pending() -> int | None:
  """The signal received inside a `deferred()` block and not yet acted on, or None."""
  return _state["pending"]


def check(kept: str | Callable[[], str]) -> None:
  """Raises `Interrupted` if a signal is pending; call where stopping is safe.

  Args:
    kept: what was kept and how to resume, or a function that saves what
      is to be kept and returns that text (called only when interrupted).
  """
  signum = _state["pending"]
  if signum is None:
    return
  _state["pending"] = None
  raise Interrupted(signum, kept() if callable(kept) else kept)


@contextlib.contextmanager
def deferred(*, done: str = "the interrupted command had finished"):
  """Within the block, SIGINT and SIGTERM wait for the next `check()`.

  A signal that no `check()` acted on is raised as `Interrupted` when the
  block ends normally, with `done` as what was kept.
  """
  with handled():
    _state["depth"] += 1
    try:
      yield
    finally:
      _state["depth"] -= 1
    if _state["depth"] == 0:
      check(done)


def training_kept(checkpoints, step: int, stage: str) -> str:
  """What an interrupted training stage kept: its resume state (a TrainCheckpointer) or nothing."""
  if checkpoints is None:
    return (f"stopped at step {step} of the {stage} stage; nothing kept (no checkpoint_dir, "
            "so a rerun starts over)")
  return (f"resume state at step {step} of the {stage} stage kept in "
          f"{checkpoints.directory.parent}; rerun the same command to resume")
