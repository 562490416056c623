"""Data-parallel fitting: 4 devices, and 2 processes x 2 devices, vs 1 device.

XLA reads `--xla_force_host_platform_device_count` when jax starts, so each
check runs this file as a script in a fresh process with 4 (or 2 per process)
CPU devices; the test functions compare what those processes wrote. The batch
sizes (18 anchors, 87 candidates, 6 judged queries) do not divide by 4, so the
split is uneven (XLA pads the last device's share), the general case.

The fits train dims (4, 8) of a 16-d output, not the full 16: at the PCA start
the full-size prefix already reproduces the frozen cosines exactly, so its
loss term's gradient is rounding noise, which Adam (scale-free) turns into
full-size steps; any change of summation order (device count, hardware, XLA
version) then moves the trajectory by ~1e-3. Without that term the runs agree
to ~1e-6, which is what shows that the batches and gradients are the same.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

D = 16
TOL = {"rtol": 1e-4, "atol": 1e-5}


def _inputs():
  """Clustered synthetic data with qrels, as in test_train, so neighbours carry structure."""
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(10, D))
  docs = (centres[rng.integers(0, 10, 200)] + 0.3 * rng.normal(size=(200, D))).astype(np.float32)
  queries = (centres[rng.integers(0, 10, 40)] + 0.3 * rng.normal(size=(40, D))).astype(np.float32)
  ids = [f"d{i}" for i in range(len(docs))]
  qids = [f"q{i}" for i in range(len(queries))]
  s = queries @ docs.T
  qrels = {q: {ids[j]: 1 for j in np.argsort(-s[i])[:2]} for i, q in enumerate(qids)}
  return dict(corpus=docs, queries=queries, qrels=qrels, query_ids=qids, corpus_ids=ids)


def _fit(devices, *, labels=True, **kw):
  """A supervised fit (two stages), or without `labels` an unsupervised one (validated by loss)."""
  import adaptor
  config = adaptor.TrainConfig(
      hidden=8, batch_size=18, neighbours=5, neighbours_per_anchor=2, random_docs=15, steps=12,
      eval_every=4, patience=100, query_batch=6, hard_negatives=3, negatives_from=10,
      supervised_steps=8, learning_rate=3e-3)
  inputs = _inputs()
  if not labels:
    inputs = {k: inputs[k] for k in ("corpus", "queries")}
  return adaptor.fit(**inputs, config=config, dims=(4, 8), quiet=True, seed=0, devices=devices,
                     **kw)


def _record(model, gradients=()):
  import jax
  return {"params": [np.asarray(x).tolist() for x in jax.tree.leaves(model.module)],
          "stages": model.info["stages"], "devices": model.info["devices"],
          "processes": model.info["processes"], "gradients": list(gradients)}


def _spy_on_steps(train):
  """Records each stage's first gradient, and the first step's program and arguments.

  Adam normalises its updates, so parameters would hide a gradient off by a
  constant factor (a missing or doubled all-reduce); its first moment after one
  step, `(1 - b1) * gradient`, does not.
  """
  import jax
  seen = {"gradients": [], "first": None}
  real_make_step = train._make_step

  def make_step(*args):
    step = real_make_step(*args)
    calls = []

    def wrapped(*a):
      if seen["first"] is None:  # Shapes and shardings, before the call donates the state.
        seen["first"] = (step, jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=x.sharding if x.committed else None), a))
      out = step(*a)
      if not calls:
        mu = out[1][0].mu
        seen["gradients"].append([(np.asarray(x) / 0.1).tolist() for x in jax.tree.leaves(mu)])
      calls.append(1)
      return out
    return wrapped

  train._make_step = make_step
  return seen


def _worker_devices(out):
  """4 CPU devices in one process: fits on 4 and on 1 of them; the 4-device step's program."""
  import jax

  from adaptor import train
  assert jax.device_count() == 4, jax.devices()
  seen = _spy_on_steps(train)
  result = {"4": _record(_fit(jax.devices()), seen["gradients"])}
  step, abstract = seen["first"]
  params = abstract[0]
  hlo = step.lower(*abstract).compile().as_text()
  result["sharding"] = {
      "params_devices": sorted({len(x.sharding.device_set) for x in jax.tree.leaves(params)}),
      "params_replicated": all(x.sharding.is_fully_replicated for x in jax.tree.leaves(params)),
      "num_partitions_4": "num_partitions=4" in hlo,
      "all_reduce": "all-reduce" in hlo,
  }
  # The unlabelled fit is the reference for the 2-process one.
  for name, devices, labels in [("1", jax.devices()[:1], True),
                                ("unlabelled 1", jax.devices()[:1], False)]:
    seen["gradients"] = []
    result[name] = _record(_fit(devices, labels=labels), seen["gradients"])
  with open(out, "w") as f:
    json.dump(result, f)


def _worker_multihost(out, process_id, port):
  """One of 2 processes with 2 CPU devices each: a fit, then a rerun that resumes its checkpoint."""
  import faulthandler

  import jax
  # A hang prints where it is stuck, before the test's own timeout.
  faulthandler.dump_traceback_later(240, exit=True)
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  assert jax.device_count() == 4 and jax.local_device_count() == 2
  from adaptor import train
  seen = _spy_on_steps(train)
  ckpt = os.path.join(os.path.dirname(out), f"train-{process_id}")
  # Unsupervised (one stage, one compile), as `matryoshka-adaptor fit` runs by default.
  # A completed fit removes its resume state; keep it here, as a fit killed right
  # after its last step checkpoint would, so that the rerun has something to restore.
  remove = train.remove_resume_state
  train.remove_resume_state = lambda directory: None
  first = _record(_fit(None, labels=False, checkpoint_dir=ckpt), seen["gradients"])
  train.remove_resume_state = remove
  wrote = os.path.isdir(ckpt)
  again = _fit(None, labels=False, checkpoint_dir=ckpt)  # Restores the completed stage.
  result = {"first": first, "again": _record(again, seen["gradients"]),
            "wrote_checkpoints": wrote, "removed": not os.path.isdir(ckpt)}
  with open(out, "w") as f:
    json.dump(result, f)
  jax.distributed.shutdown()


def _env(devices):
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
  out = tmp_path_factory.mktemp("devices") / "result.json"
  subprocess.run([sys.executable, __file__, "devices", str(out)], env=_env(4), check=True,
                 timeout=300)
  return json.loads(out.read_text())


def _assert_same_fit(a, b, stages=("unsupervised", "supervised")):
  for x, y in zip(a["params"], b["params"], strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)
  for ga, gb in zip(a["gradients"], b["gradients"]):
    for x, y in zip(ga, gb, strict=True):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)
  assert tuple(a["stages"]) == tuple(b["stages"]) == stages
  for name in a["stages"]:
    sa, sb = a["stages"][name], b["stages"][name]
    assert (sa["steps"], sa["kept_step"]) == (sb["steps"], sb["kept_step"])
    for ha, hb in zip(sa["history"], sb["history"], strict=True):
      assert ha["step"] == hb["step"]
      np.testing.assert_allclose(ha["val"], hb["val"], **TOL)
      if ha["loss"] is not None:
        np.testing.assert_allclose(ha["loss"], hb["loss"], **TOL)


def test_four_devices_follow_the_one_device_fit(single_process):
  r = single_process
  assert (r["4"]["devices"], r["1"]["devices"]) == (4, 1)
  assert len(r["4"]["gradients"]) == len(r["1"]["gradients"]) == 2
  _assert_same_fit(r["4"], r["1"])


def test_four_device_step_is_sharded(single_process):
  # Replicated state on all 4 devices, and an all-reduce: the batch's rows (and
  # so the gradient's terms) were split across devices and summed by XLA.
  assert single_process["sharding"] == {"params_devices": [4], "params_replicated": True,
                                        "num_partitions_4": True, "all_reduce": True}


def test_two_processes_follow_the_one_device_fit(single_process, tmp_path):
  port = _free_port()
  outs = [tmp_path / f"process{i}.json" for i in range(2)]
  procs = [subprocess.Popen([sys.executable, __file__, "multihost", str(out), str(i), str(port)],
                            env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i, out in enumerate(outs)]
  try:
    logs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-4000:]
  r0, r1 = (json.loads(out.read_text()) for out in outs)
  assert (r0["first"]["devices"], r0["first"]["processes"]) == (4, 2)
  assert r0["first"] == r1["first"]
  assert len(r0["first"]["gradients"]) == 1
  _assert_same_fit(r0["first"], single_process["unlabelled 1"], ("unsupervised",))
  # The rerun restored process 0's checkpoint on both processes and trained nothing.
  assert r0["again"] == r1["again"] == r0["first"]
  # Only process 0 writes checkpoints, and removes them once a fit completes.
  assert r0["wrote_checkpoints"] and not r1["wrote_checkpoints"]
  assert r0["removed"]


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if sys.argv[1] == "devices":
    _worker_devices(sys.argv[2])
  else:
    _worker_multihost(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
