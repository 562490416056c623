"""The trainer: determinism, resume, early stopping, supervised stage, input checks."""

import dataclasses

import jax
import numpy as np
import pytest

import adaptor
from conftest import interrupted_at_step

D = 16
RNG = np.random.default_rng(0)
# Clustered synthetic data, so neighbours and rankings carry structure.
CENTRES = RNG.normal(size=(10, D))
DOCS = (CENTRES[RNG.integers(0, 10, 200)] + 0.3 * RNG.normal(size=(200, D))).astype(np.float32)
QUERIES = (CENTRES[RNG.integers(0, 10, 30)] + 0.3 * RNG.normal(size=(30, D))).astype(np.float32)
SMALL = adaptor.TrainConfig(hidden=8, batch_size=16, neighbours=5, neighbours_per_anchor=2,
                            random_docs=16, steps=20, eval_every=5, patience=100,
                            query_batch=4, hard_negatives=3, negatives_from=10,
                            supervised_steps=10)


def _params(model):
  return jax.tree.map(np.asarray, jax.tree.leaves(model.module))


def _fit(**kw):
  return adaptor.fit(DOCS, queries=QUERIES, config=SMALL, dims=(4, 8, 16), quiet=True, **kw)


def test_same_seed_same_adaptor_and_different_seed_differs():
  a, b, c = _fit(seed=0), _fit(seed=0), _fit(seed=1)
  for x, y in zip(_params(a), _params(b)):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, y) for x, y in zip(_params(a), _params(c)))
  assert a.info["stages"]["unsupervised"]["steps"] == 20


def test_training_lowers_held_out_loss_below_the_pca_start():
  cfg = dataclasses.replace(SMALL, steps=100, eval_every=50, learning_rate=3e-3)
  model = adaptor.fit(DOCS, queries=QUERIES, config=cfg, dims=(4, 8, 16), quiet=True, seed=0)
  hist = model.info["stages"]["unsupervised"]["history"]
  assert hist[0]["step"] == 0  # The PCA start, before any update.
  assert hist[-1]["val"] < 0.9 * hist[0]["val"]


def test_interrupted_fit_resumes_to_identical_parameters(tmp_path, monkeypatch):
  reference = _fit(seed=3)
  # The 13th step call comes after the checkpoint at step 10.
  with interrupted_at_step(monkeypatch, 13), pytest.raises(KeyboardInterrupt):
    _fit(seed=3, checkpoint_dir=tmp_path / "resume")
  assert adaptor.checkpoint.TrainCheckpointer(tmp_path / "resume" / "unsupervised").latest() == 10
  resumed = _fit(seed=3, checkpoint_dir=tmp_path / "resume")
  for x, y in zip(_params(reference), _params(resumed)):
    np.testing.assert_array_equal(x, y)
  ref_stage = reference.info["stages"]["unsupervised"]
  res_stage = resumed.info["stages"]["unsupervised"]
  assert res_stage["history"] == ref_stage["history"]
  assert res_stage["kept_step"] == ref_stage["kept_step"]


def test_early_stopping_stops_at_the_patience_th_evaluation_without_a_new_best():
  cfg = dataclasses.replace(SMALL, steps=200, patience=2, learning_rate=0.5)
  model = adaptor.fit(DOCS, config=cfg, dims=(4, 16), quiet=True)
  stage = model.info["stages"]["unsupervised"]
  history = stage["history"]
  # Replay the recorded validation scores (lower is better without labels): the
  # stage must end at the first evaluation after which `patience` evaluations in
  # a row set no new best, and not one evaluation earlier or later.
  best, bad, stop = history[0]["val"], 0, None
  for entry in history[1:]:
    assert entry["step"] % cfg.eval_every == 0
    if entry["val"] < best:
      best, bad = entry["val"], 0
    else:
      bad += 1
    if bad >= cfg.patience:
      stop = entry["step"]
      break
  assert stop is not None and stop < 200, history
  assert history[-1]["step"] == stop == stage["steps"], history
  assert stage["best_val"] == np.float32(best)


def test_supervised_fit_runs_both_stages_and_tracks_ndcg():
  ids = [f"d{i}" for i in range(len(DOCS))]
  qids = [f"q{i}" for i in range(len(QUERIES))]
  # Relevant = the two documents closest to the query in the full space.
  s = QUERIES @ DOCS.T
  qrels = {q: {ids[j]: 1 for j in np.argsort(-s[i])[:2]} for i, q in enumerate(qids)}
  model = adaptor.fit(DOCS, queries=QUERIES, qrels=qrels, query_ids=qids, corpus_ids=ids,
                      config=SMALL, dims=(4, 16), quiet=True)
  stages = model.info["stages"]
  assert set(stages) == {"unsupervised", "supervised"}
  assert 0.0 <= stages["supervised"]["best_val"] <= 1.0
  assert stages["supervised"]["best_val"] >= stages["unsupervised"]["best_val"]


def test_fit_input_errors():
  with pytest.raises(adaptor.InputError, match="NaN"):
    bad = DOCS.copy()
    bad[3, 2] = np.nan
    adaptor.fit(bad, config=SMALL, quiet=True)
  with pytest.raises(adaptor.InputError, match="queries"):
    adaptor.fit(DOCS, queries=QUERIES[:, :8], config=SMALL, quiet=True)
  with pytest.raises(ValueError, match="strictly increasing"):
    adaptor.fit(DOCS, dims=(16, 8), config=SMALL, quiet=True)
  with pytest.raises(adaptor.InputError, match="needs queries, query_ids and corpus_ids"):
    adaptor.fit(DOCS, qrels={"q": {"d": 1}}, config=SMALL, quiet=True)
  with pytest.raises(ValueError, match="TrainConfig.batch_size must be an int >= 1"):
    adaptor.fit(DOCS, config=SMALL, batch_size=0, quiet=True)
