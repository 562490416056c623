"""Adaptor save/load round trips and refusals."""

import json

import numpy as np
import pytest
from flax import nnx

import adaptor
from adaptor.model import MatryoshkaAdaptor


def _adaptor(d_in=6, d_out=6, seed=0):
  module = MatryoshkaAdaptor(d_in, d_out=d_out, hidden=5, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  module.out_layer.kernel.set_value(rng.normal(size=(5, d_out)).astype(np.float32))
  module.base.kernel.set_value(rng.normal(size=(d_in, d_out)).astype(np.float32))
  return adaptor.Adaptor(module, train_config=adaptor.TrainConfig(hidden=5), info={"note": "x"})


X = np.random.default_rng(9).normal(size=(11, 6)).astype(np.float32)


@pytest.mark.parametrize("d_out", [6, 4])
def test_save_load_round_trip_is_exact(tmp_path, d_out):
  a = _adaptor(d_out=d_out)
  a.save(tmp_path / "ck")
  b = adaptor.load(tmp_path / "ck")
  assert b.config == a.config
  np.testing.assert_array_equal(a.apply(X, dim=3), b.apply(X, dim=3))
  assert b.info == {"note": "x"}
  assert b.train_config["hidden"] == 5
  cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
  assert cfg["adaptor"]["d_in"] == 6 and cfg["library_version"] == adaptor.__version__


def test_load_refuses_other_d_in_and_other_version(tmp_path):
  _adaptor().save(tmp_path / "ck")
  with pytest.raises(adaptor.CheckpointError, match="d_in=6, but the embeddings have d=8"):
    adaptor.load(tmp_path / "ck", d_in=8)
  cfg_path = tmp_path / "ck" / "config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg["library_version"] = "9.0.0"
  cfg_path.write_text(json.dumps(cfg))
  with pytest.raises(adaptor.CheckpointError, match="found library_version '9.0.0'"):
    adaptor.load(tmp_path / "ck")


def test_load_refuses_config_that_does_not_match_arrays(tmp_path):
  _adaptor().save(tmp_path / "ck")
  cfg_path = tmp_path / "ck" / "config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg["adaptor"]["hidden"] = 7
  cfg_path.write_text(json.dumps(cfg))
  with pytest.raises(adaptor.CheckpointError, match="expected shape"):
    adaptor.load(tmp_path / "ck")


def test_apply_rejects_bad_embeddings():
  a = _adaptor()
  bad = X.copy()
  bad[2] = np.inf
  with pytest.raises(adaptor.InputError, match="Inf"):
    a.apply(bad)
  with pytest.raises(adaptor.InputError, match="6"):
    a.apply(X[:, :5])
