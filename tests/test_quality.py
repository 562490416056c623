"""The fit's safeguards against losing to closed-form baselines, and the dev suite's split hygiene."""

import dataclasses
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import adaptor
from adaptor import losses, train
from adaptor.model import pca_basis
from conftest import REPO

sys.path.insert(0, str(REPO / "experiments"))
import dev_suite  # noqa: E402

D = 12
RNG = np.random.default_rng(7)
CENTRES = RNG.normal(size=(6, D)) + 2.0  # A shared offset: centring then matters.
DOCS = (CENTRES[RNG.integers(0, 6, 150)] + 0.4 * RNG.normal(size=(150, D))).astype(np.float32)
QUERIES = (CENTRES[RNG.integers(0, 6, 20)] + 0.4 * RNG.normal(size=(20, D))).astype(np.float32)
SMALL = adaptor.TrainConfig(batch_size=16, neighbours=5, neighbours_per_anchor=2, random_docs=16,
                            steps=0, eval_every=5, patience=100)


def test_orthogonality_penalty_equals_the_frobenius_gap_with_basis_probes():
  kernel = RNG.normal(size=(D, 8)).astype(np.float32)
  gap = np.linalg.norm(kernel.T @ kernel - np.eye(8)) ** 2
  got = losses.orthogonality_penalty(jnp.asarray(kernel), jnp.eye(8))
  np.testing.assert_allclose(float(got), gap / 8 / 8, rtol=1e-5)
  q, _ = np.linalg.qr(RNG.normal(size=(D, 8)))
  probes = jnp.asarray(RNG.normal(size=(5, 8)), jnp.float32)
  assert float(losses.orthogonality_penalty(jnp.asarray(q, jnp.float32), probes)) < 1e-10


def test_query_share_and_steps_grow_with_the_data():
  assert train.auto_query_fraction(0) == 0.0
  assert train.auto_query_fraction(50) == pytest.approx(0.2)
  assert train.auto_query_fraction(10_000) == 0.8
  cfg = adaptor.TrainConfig(batch_size=64, epochs=25.0)
  assert train.auto_steps(100, cfg) == 500
  assert train.auto_steps(6_400, cfg) == 2500
  assert train.auto_steps(10**6, cfg) == 3000


@pytest.mark.parametrize("start,center,rows", [("pca-docs", False, "docs"),
                                                ("pca-centred", True, "docs"),
                                                ("pca-docs-queries", False, "both")])
def test_each_start_is_the_pca_it_names(start, center, rows):
  model = adaptor.fit(DOCS, queries=QUERIES, config=SMALL, start=start, dims=(4, 12), quiet=True)
  x = DOCS if rows == "docs" else np.concatenate([DOCS, QUERIES])
  comps, mean = pca_basis(x, center=center)
  expected = (QUERIES - mean) @ comps[:, :4]
  expected /= np.linalg.norm(expected, axis=1, keepdims=True)
  np.testing.assert_allclose(model.apply(QUERIES, dim=4), expected, atol=2e-5)
  assert model.info["start"]["chosen"] == start


def test_auto_start_is_the_candidate_with_the_best_held_out_score():
  model = adaptor.fit(DOCS, queries=QUERIES, config=SMALL, dims=(4, 12), quiet=True)
  val = model.info["start"]["val"]
  assert set(val) == {"pca-docs", "pca-centred", "pca-docs-queries"}
  assert model.info["start"]["chosen"] == min(val, key=val.get)
  # With steps=0 the adaptor is that start, and its step-0 score is the chosen one's.
  assert model.info["stages"]["unsupervised"]["history"][0]["val"] == pytest.approx(
      val[model.info["start"]["chosen"]], rel=1e-6)


def test_without_queries_the_docs_queries_start_falls_back_to_the_docs():
  model = adaptor.fit(DOCS, config=SMALL, start="pca-docs-queries", dims=(4, 12), quiet=True)
  assert model.info["start"]["chosen"] == "pca-docs"


def test_bad_start_is_refused_by_name():
  with pytest.raises(ValueError, match="start must be one of"):
    adaptor.fit(DOCS, config=SMALL, start="pca", quiet=True)


def _collection(root, test_qrels):
  """A tiny BEIR-layout collection: 150 documents, 20 train and 10 test queries."""
  emb = root / "embeddings" / "toy"
  emb.mkdir(parents=True)
  queries = np.concatenate([QUERIES, DOCS[:10] + 0.05])
  np.save(emb / "corpus.npy", DOCS / np.linalg.norm(DOCS, axis=1, keepdims=True))
  np.save(emb / "queries.npy", queries / np.linalg.norm(queries, axis=1, keepdims=True))
  (emb / "corpus_ids.txt").write_text("".join(f"d{i}\n" for i in range(len(DOCS))))
  (emb / "query_ids.txt").write_text("".join(f"q{i}\n" for i in range(len(queries))))
  (root / "qrels").mkdir()
  train = "".join(f"q{i}\td{i}\t1\n" for i in range(20))
  (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + train)
  test = "".join(f"q{20 + i}\td{d}\t{g}\n" for i, (d, g) in enumerate(test_qrels))
  (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + test)


def test_dev_suite_fits_never_see_the_test_judgements(tmp_path):
  # Two copies of one collection that differ only in their test judgements:
  # every fit must come out bit for bit the same, while the scores differ.
  _collection(tmp_path / "a", [(i, 1) for i in range(10)])
  _collection(tmp_path / "b", [(100 + i, 2) for i in range(10)])
  # The log regime is the one that fits on queries, where test queries could leak in.
  fit = {"steps": 10, "eval_every": 5, "neighbours": 5, "batch_size": 16, "random_docs": 16,
         "dims": (2, 4, 12)}
  cfg = dev_suite.Config(regimes=("log50",), fit=fit)
  a = dev_suite.run_collection(cfg, tmp_path / "a", "toy")
  b = dev_suite.run_collection(cfg, tmp_path / "b", "toy")
  assert (a["regimes"]["log50"]["adaptor_fingerprint"]
          == b["regimes"]["log50"]["adaptor_fingerprint"])
  assert a["regimes"]["log50"]["table"] != b["regimes"]["log50"]["table"]


def test_margins_are_taken_against_the_best_baseline_per_dim():
  row = lambda *v: {str(m): {"ndcg@10": x} for m, x in zip((4, 8, 32), v)}
  table = {"raw": row(0.1, 0.2, 0.5), "PCA uncentred": row(0.3, 0.25, 0.4),
           "adaptor": row(0.35, 0.24, 0.49)}
  m = dev_suite.margins(table, 32)
  assert m["per_dim"] == pytest.approx({"4": 0.05, "8": -0.01})
  assert m["worst"] == pytest.approx(-0.01)
  assert m["mean"] == pytest.approx(0.02)
  assert m["full_minus_raw"] == pytest.approx(-0.01)


def test_bias_drift_weight_holds_the_bias_at_its_start():
  cfg = dataclasses.replace(SMALL, steps=30, learning_rate=1e-2, start="pca-docs")
  drift = {}
  for w in (0.0, 100.0):
    weights = adaptor.LossWeights(orthogonal=0.0, bias_drift=w)
    model = adaptor.fit(DOCS, config=cfg, weights=weights, dims=(4, 12), quiet=True)
    drift[w] = float(np.linalg.norm(np.asarray(model.module.base.bias[...])))  # The start's is 0.
  assert drift[0.0] > 0.05
  assert drift[100.0] < 0.1 * drift[0.0]


def test_cli_fit_start_option_reaches_the_fit(tmp_path):
  from adaptor import cli
  np.save(tmp_path / "corpus.npy", DOCS / np.linalg.norm(DOCS, axis=1, keepdims=True))
  out = tmp_path / "ck"
  assert cli.main(["fit", "--corpus", str(tmp_path / "corpus.npy"), "--dims", "4,12", "--steps",
                   "5", "--start", "pca-centred", "--out", str(out), "--quiet"]) == 0
  assert adaptor.load(out).info["start"]["chosen"] == "pca-centred"
