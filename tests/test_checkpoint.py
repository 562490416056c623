"""Tests for adaptor.checkpoint: round trips, refusals, and crash safety."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import adaptor
from adaptor import checkpoint
from adaptor.checkpoint import CheckpointError, TrainCheckpointer


class _Tiny(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.inp = nnx.Linear(3, 4, rngs=rngs)
    self.out = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.inp(x)))


def _model(seed=0):
  return _Tiny(nnx.Rngs(seed))


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def saved(tmp_path):
  """A checkpoint of a seed-0 model at tmp_path/ckpt; returns (path, model)."""
  model = _model(0)
  path = tmp_path / "ckpt"
  checkpoint.save(path, nnx.state(model), {"dims": [2, 4], "name": "tiny"})
  return path, model


# ---------------------------------------------------------------- round trips


def test_round_trip_without_target_gives_nested_numpy_dict(saved):
  path, model = saved
  state, config = checkpoint.load(path)
  expected = nnx.to_pure_dict(nnx.state(model))
  assert set(state) == {"inp", "out"}
  for layer in ("inp", "out"):
    for name in ("kernel", "bias"):
      assert isinstance(state[layer][name], np.ndarray)
      np.testing.assert_array_equal(state[layer][name], np.asarray(expected[layer][name]))
  assert config == {
      "format_version": 1,
      "library_version": adaptor.__version__,
      "dims": [2, 4],
      "name": "tiny",
  }


def test_config_json_is_pretty_and_self_describing(saved):
  path, _ = saved
  text = (path / "config.json").read_text()
  assert "\n  " in text
  assert json.loads(text)["format_version"] == 1
  assert checkpoint.read_config(path)["name"] == "tiny"
  assert sorted(os.listdir(path)) == ["COMPLETE", "config.json", "params"]


def test_restore_into_eval_shape_target_and_merge_gives_same_outputs(saved):
  path, model = saved
  abstract = nnx.eval_shape(lambda: _model(1))
  graphdef, abstract_state = nnx.split(abstract)
  state, _ = checkpoint.load(path, target=abstract_state)
  assert isinstance(state, nnx.State)
  _assert_trees_equal(state, nnx.state(model))
  x = jnp.arange(6.0).reshape(2, 3)
  np.testing.assert_array_equal(nnx.merge(graphdef, state)(x), model(x))

  other = _model(7)  # Different weights, overwritten in place by nnx.update.
  nnx.update(other, state)
  np.testing.assert_array_equal(other(x), model(x))


def test_restore_into_concrete_pure_dict_target(saved):
  path, model = saved
  target = jax.tree.map(np.zeros_like, nnx.to_pure_dict(nnx.state(model)))
  state, _ = checkpoint.load(path, target=target)
  assert isinstance(state["inp"]["kernel"], np.ndarray)  # numpy target leaves stay numpy.
  _assert_trees_equal(state, jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model))))


def test_overwrite_replaces_old_checkpoint(saved):
  path, _ = saved
  new = _model(3)
  checkpoint.save(path, nnx.state(new), {"name": "second"})
  state, config = checkpoint.load(path, target=nnx.state(_model(0)))
  _assert_trees_equal(state, nnx.state(new))
  assert config["name"] == "second"
  assert sorted(os.listdir(path.parent)) == ["ckpt"]  # No temp or old directory left.


def test_overwrite_false_refuses_existing(saved):
  path, _ = saved
  with pytest.raises(CheckpointError, match=f"{path}.*overwrite=False"):
    checkpoint.save(path, nnx.state(_model(3)), {}, overwrite=False)
  assert checkpoint.read_config(path)["name"] == "tiny"


def test_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
  (tmp_path / "notes.txt").write_text("precious")
  with pytest.raises(CheckpointError, match="refusing to replace"):
    checkpoint.save(tmp_path, {"w": np.ones(2)}, {})
  assert (tmp_path / "notes.txt").read_text() == "precious"


# ---------------------------------------------------------------- refusals


def test_missing_directory(tmp_path):
  path = tmp_path / "nope"
  with pytest.raises(CheckpointError, match=f"{path}: expected a checkpoint directory"):
    checkpoint.load(path)
  with pytest.raises(CheckpointError, match=str(path)):
    checkpoint.read_config(path)


def test_missing_config(saved):
  path, _ = saved
  (path / "config.json").unlink()
  with pytest.raises(CheckpointError, match=f"{path / 'config.json'}: expected a JSON config"):
    checkpoint.load(path)


def test_corrupt_json(saved):
  path, _ = saved
  (path / "config.json").write_text("{not json")
  with pytest.raises(CheckpointError, match=f"{path / 'config.json'}: expected valid JSON"):
    checkpoint.read_config(path)


def test_wrong_format_version(saved):
  path, _ = saved
  config = json.loads((path / "config.json").read_text())
  config["format_version"] = 2
  (path / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match="expected format_version 1, found 2"):
    checkpoint.load(path)


def test_missing_complete_marker(saved):
  path, _ = saved
  (path / "COMPLETE").unlink()
  with pytest.raises(CheckpointError, match=f"{path}: expected a complete checkpoint"):
    checkpoint.load(path)


def test_missing_params(saved):
  path, _ = saved
  shutil.rmtree(path / "params")
  with pytest.raises(CheckpointError, match=f"{path / 'params'}: expected an orbax"):
    checkpoint.load(path)


def test_shape_mismatch_names_leaf_and_both_shapes(saved):
  path, _ = saved
  target = nnx.state(nnx.eval_shape(lambda: _model(0)))
  target["inp"]["kernel"].set_value(jax.ShapeDtypeStruct((3, 5), jnp.float32))
  pattern = r"params: leaf 'inp/kernel' expected shape \(3, 5\).*found shape \(3, 4\)"
  with pytest.raises(CheckpointError, match=pattern):
    checkpoint.load(path, target=target)


def test_dtype_and_structure_mismatch(saved):
  path, model = saved
  pure = nnx.to_pure_dict(nnx.state(model))
  bad_dtype = jax.tree.map(lambda x: np.zeros(x.shape, np.float16), pure)
  with pytest.raises(CheckpointError, match="dtype float16"):
    checkpoint.load(path, target=bad_dtype)
  del pure["out"]
  with pytest.raises(CheckpointError, match=r"not in target \['out/bias', 'out/kernel'\]"):
    checkpoint.load(path, target=pure)


def test_typed_prng_key_is_refused_before_writing(tmp_path):
  with pytest.raises(TypeError, match="'rng' is a typed PRNG key.*key_data"):
    checkpoint.save(tmp_path / "ckpt", {"w": np.ones(2), "rng": jax.random.key(0)}, {})
  assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- crash safety


def test_crash_during_params_write_keeps_old_checkpoint(saved, monkeypatch):
  path, model = saved

  def half_write(params_path, nested):
    os.makedirs(params_path)
    (params_path / "partial").write_bytes(b"\0" * 10)
    raise RuntimeError("simulated crash")

  monkeypatch.setattr(checkpoint, "_write_params", half_write)
  with pytest.raises(RuntimeError, match="simulated crash"):
    checkpoint.save(path, nnx.state(_model(5)), {"name": "new"})
  monkeypatch.undo()
  state, config = checkpoint.load(path, target=nnx.state(model))
  _assert_trees_equal(state, nnx.state(model))
  assert config["name"] == "tiny"
  assert sorted(os.listdir(path.parent)) == ["ckpt"]


def test_hard_crash_leaves_only_a_temp_dir_that_load_refuses(saved, monkeypatch):
  path, model = saved
  # A killed process runs no cleanup: the temp dir stays, without a marker.
  monkeypatch.setattr(checkpoint, "remove_tree", lambda p: None)

  def killed(_):
    raise OSError("killed")

  # Dies after params and config are written, before the COMPLETE marker.
  monkeypatch.setattr(checkpoint, "fsync_tree", killed)
  with pytest.raises(OSError, match="killed"):
    checkpoint.save(path, nnx.state(_model(5)), {"name": "new"})
  monkeypatch.undo()
  (leftover,) = [p for p in path.parent.iterdir() if p.name.startswith("ckpt.tmp-")]
  assert (leftover / "params").is_dir() and (leftover / "config.json").is_file()
  with pytest.raises(CheckpointError, match="expected a complete checkpoint"):
    checkpoint.load(leftover)
  _assert_trees_equal(checkpoint.load(path, target=nnx.state(model))[0], nnx.state(model))
  shutil.rmtree(path)  # With the live one gone, the error points at what is left.
  with pytest.raises(CheckpointError, match=f"interrupted save left.*{leftover.name}"):
    checkpoint.load(path)


def test_failed_rename_into_place_restores_old_checkpoint(saved, monkeypatch):
  path, model = saved
  real_replace = os.replace
  calls = []

  def flaky_replace(src, dst):
    calls.append((src, dst))
    if len(calls) == 2:  # Old moved aside; now moving the new one in fails.
      raise OSError("simulated crash")
    return real_replace(src, dst)

  monkeypatch.setattr(checkpoint.os, "replace", flaky_replace)
  with pytest.raises(OSError, match="simulated crash"):
    checkpoint.save(path, nnx.state(_model(5)), {"name": "new"})
  monkeypatch.undo()
  assert ".old-" in str(calls[0][1])
  state, config = checkpoint.load(path, target=nnx.state(model))
  _assert_trees_equal(state, nnx.state(model))
  assert config["name"] == "tiny"
  assert sorted(os.listdir(path.parent)) == ["ckpt"]


# ---------------------------------------------------------------- training


def _train_state(seed):
  params = nnx.to_pure_dict(nnx.state(_model(seed)))
  opt_state = optax.adam(1e-3).init(params)
  # One real update so that count and the moments are not their initial values.
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = optax.adam(1e-3).update(grads, opt_state, params)
  return {
      "params": params,
      "opt_state": opt_state,
      "key": jax.random.key_data(jax.random.key(seed)),
      "best_loss": jnp.float32(0.25 + seed),
      "bad_epochs": jnp.int32(seed),
      "epoch": seed,  # A Python int comes back as a Python int.
  }


def test_train_checkpointer_round_trip_with_optax_state(tmp_path):
  ckpt = TrainCheckpointer(tmp_path / "run")
  assert ckpt.latest() is None
  state = _train_state(1)
  ckpt.save(12, state, {"lr": 1e-3, "history": [0.5, 0.4]})
  target = jax.eval_shape(lambda: _train_state(0))
  target["epoch"] = 0
  step, restored, meta = ckpt.restore(target)
  assert step == 12
  assert meta == {"lr": 1e-3, "history": [0.5, 0.4]}
  _assert_trees_equal(restored, state)
  assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
  assert restored["opt_state"][0].count.dtype == jnp.int32
  assert int(restored["opt_state"][0].count) == 1
  assert type(restored["epoch"]) is int and restored["epoch"] == 1


def test_train_checkpointer_keeps_latest_and_ignores_leftovers(tmp_path):
  run = tmp_path / "run"
  ckpt = TrainCheckpointer(run, keep=1)
  ckpt.save(1, _train_state(1), {})
  ckpt.save(2, _train_state(2), {})
  assert [p.name for p in run.iterdir()] == ["step_000000002"]
  # A crashed later save: its temp dir has arrays but no marker.
  shutil.copytree(run / "step_000000002", run / "step_000000003.tmp-dead")
  (run / "step_000000003.tmp-dead" / "COMPLETE").unlink()
  assert ckpt.latest() == 2
  step, restored, _ = ckpt.restore(jax.eval_shape(lambda: _train_state(0)) | {"epoch": 0})
  assert step == 2
  _assert_trees_equal(restored, _train_state(2))
  assert [p.name for p in run.iterdir()] == ["step_000000002"]  # The leftover is cleaned up.


def test_train_checkpointer_keep_two_and_empty_restore(tmp_path):
  ckpt = TrainCheckpointer(tmp_path / "run", keep=2)
  with pytest.raises(CheckpointError, match="expected at least one complete step"):
    ckpt.restore()
  for step in (5, 10, 15):
    ckpt.save(step, {"w": np.full(2, step)}, {"step": step})
  kept = sorted(p.name for p in (tmp_path / "run").iterdir())
  assert kept == ["step_000000010", "step_000000015"]
  step, state, meta = ckpt.restore()
  assert (step, meta) == (15, {"step": 15})
  np.testing.assert_array_equal(state["w"], [15, 15])
  with pytest.raises(ValueError, match="keep must be an int >= 1, got 0"):
    TrainCheckpointer(tmp_path, keep=0)
