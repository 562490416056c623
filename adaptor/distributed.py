"""Device and multi-host plumbing of a fit: the mesh, placement, and agreement between processes.

A fit trains data parallel over a one-axis `Mesh` ("data"). With several
processes (after `jax.distributed.initialize()`), every host holds its own copy
of the inputs and of the replicated state; the functions here place host arrays
on the mesh without communication, hand back one process's copy, and make the
hosts agree where they could otherwise drift apart: the inputs (checked), the
initial parameters and validation scores (process 0's, broadcast), and the
training checkpoint (read by process 0 alone and sent to the others).
With one process every agreement step is a no-op.
"""

from __future__ import annotations

import hashlib
import json

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from adaptor.data import InputError



def mesh(devices) -> Mesh:
  """A one-axis ("data") mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices or not all(isinstance(d, jax.Device) for d in devices):
    raise ValueError(f"devices must be a non-empty sequence of jax.Device, got {devices!r}")
  if len(set(devices)) != len(devices):
    raise ValueError(f"devices must not repeat a device, got {devices}")
  return Mesh(np.asarray(devices), ("data",))


def put(tree, sharding):
  """Device arrays with `sharding` holding `tree`'s values (host or device arrays).

  Each process supplies its own devices' shards from its own copy, so this needs
  no communication, also when `sharding` spans several hosts.
  """
  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(one, tree)


def local(tree):
  """This process's copy of each replicated array, on its first device of the mesh.

  Validation and the returned adaptor run on one device: host-side code
  (`apply_adaptor`, `exact_search`) then never sees an array that spans hosts.
  """
  return jax.tree.map(lambda x: x.addressable_data(0), tree)


def from_process_0(tree):
  """Process 0's values of a pytree of host arrays (same shapes on every process)."""
  if jax.process_count() == 1:
    return tree
  return multihost_utils.broadcast_one_to_all(tree)


def check_same_inputs(arrays: dict) -> None:
  """Raises InputError unless every process holds the same `arrays` (a dict of host arrays)."""
  if jax.process_count() == 1:
    return
  digest = hashlib.sha256()
  for name in sorted(arrays):
    digest.update(name.encode())
    digest.update(np.ascontiguousarray(arrays[name]).tobytes())
  mine = np.frombuffer(digest.digest(), np.uint32)
  every = np.asarray(multihost_utils.process_allgather(mine))  # [processes, 8]
  differ = [i for i in range(every.shape[0]) if not np.array_equal(every[i], every[0])]
  if differ:
    raise InputError(
        f"fit inputs differ between processes: processes {differ} hold other data than process 0 "
        f"(compared: {sorted(arrays)}); every host must pass the same corpus, queries, qrels, "
        "ids and config")


def restore(checkpoints, state):
  """`(step, state, meta)` of the latest training checkpoint, or None when there is none.

  With several processes only process 0 reads checkpoints (it alone writes
  them), and sends what it found to the others, so hosts need not share a file
  system and cannot resume from different steps.
  """
  if jax.process_count() == 1:
    if checkpoints is None or checkpoints.latest() is None:
      return None
    return checkpoints.restore(state)
  host_state = jax.tree.map(np.asarray, state)
  found = None
  if jax.process_index() == 0 and checkpoints is not None and checkpoints.latest() is not None:
    found = checkpoints.restore(host_state)
  # Step and meta go as JSON bytes, whose length the others learn first (a
  # broadcast needs the same shape everywhere); then the arrays.
  text = np.frombuffer(json.dumps(None if found is None else [found[0], found[2]]).encode(),
                       np.uint8)
  size = int(from_process_0(np.int32(text.size)))
  text = text if jax.process_index() == 0 else np.zeros(size, np.uint8)
  header = json.loads(bytes(np.asarray(from_process_0(text), np.uint8)).decode())
  if header is None:
    return None
  arrays = from_process_0(found[1] if found is not None else host_state)
  return header[0], jax.tree.map(lambda x, like: put(x, like.sharding), arrays, state), header[1]


def agreed_score(score) -> float:
  """Process 0's validation score, as a float.

  Every process must take the same early-stopping decisions, even where a
  host-side metric (nDCG on each host's copy) could differ in its last bits.
  """
  if jax.process_count() == 1:
    return float(score)
  # Sent as the float64's two 32-bit halves: jax (without x64) would round a float64.
  bits = np.frombuffer(np.float64(score).tobytes(), np.uint32)
  return float(np.asarray(from_process_0(bits), np.uint32).view(np.float64)[0])
