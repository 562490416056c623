"""The library's error for bad input, and argument checks that name the argument, the expected and the actual value."""

from __future__ import annotations

import numpy as np


class InputError(ValueError):
  """Bad user input: a file, array, id list, argument or qrels that cannot be used."""


def check_dim(dim, full: int, *, name: str = "dim") -> int:
  """Validates a prefix length against the full vector size and returns it as int."""
  if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {type(dim).__name__} ({dim!r})")
  if not 1 <= int(dim) <= full:
    raise InputError(f"{name} must be in [1, {full}] (the vector size), got {dim}")
  return int(dim)


def check_k(k, n: int, *, name: str = "k", what: str = "the corpus size") -> int:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
    raise InputError(f"{name} must be an int in [1, {n}] ({what}), got {k!r}")
  return int(k)


def check_positive(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise InputError(f"{name} must be a positive int, got {value!r}")
  return int(value)

