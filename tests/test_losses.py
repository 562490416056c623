"""Losses against hand-computed values and numpy references, plain and jitted."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptor import losses


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _variants(fn, **static):
  """The loss plain and under jit, with its keyword options fixed."""
  f = functools.partial(fn, **static)
  return [f, jax.jit(f)]


RNG = np.random.default_rng(0)
FULL = RNG.normal(size=(6, 8)).astype(np.float32)
ADAPTED = RNG.normal(size=(6, 8)).astype(np.float32)


@pytest.mark.parametrize("variant", [0, 1])
def test_pairwise_matches_numpy(variant):
  f = _variants(losses.pairwise_similarity_loss, dims=(2, 8), weights=(1.0, 0.5))[variant]
  target = _unit(FULL) @ _unit(FULL).T
  expected = 0.0
  for m, w in ((2, 1.0), (8, 0.5)):
    a = _unit(ADAPTED[:, :m])
    diff = np.abs(target - a @ a.T)
    expected += w * (diff.sum() - np.trace(diff)) / (6 * 5)
  np.testing.assert_allclose(float(f(FULL, ADAPTED)), expected, rtol=1e-5)


def test_pairwise_is_zero_for_identity_at_full_dim():
  assert float(losses.pairwise_similarity_loss(FULL, FULL, dims=(8,))) < 1e-6


@pytest.mark.parametrize("variant", [0, 1])
def test_topk_matches_numpy(variant):
  f = _variants(losses.topk_similarity_loss, dims=(3, 8))[variant]
  nb_full = RNG.normal(size=(6, 4, 8)).astype(np.float32)
  nb_adapted = RNG.normal(size=(6, 4, 8)).astype(np.float32)
  target = np.einsum("bd,bkd->bk", _unit(FULL), _unit(nb_full))
  expected = sum(
      np.abs(target - np.einsum("bd,bkd->bk", _unit(ADAPTED[:, :m]), _unit(nb_adapted[..., :m]))).mean()
      for m in (3, 8))
  np.testing.assert_allclose(float(f(FULL, nb_full, ADAPTED, nb_adapted)), expected, rtol=1e-5)


def test_reconstruction_hand_value():
  base = jnp.array([[1.0, 0.0], [0.0, 0.0]])
  adapted = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  # Squared distances 4 and 25; mean 14.5.
  assert float(losses.reconstruction_loss(base, adapted)) == pytest.approx(14.5)


@pytest.mark.parametrize("variant", [0, 1])
def test_rank_distillation_matches_numpy(variant):
  t = 0.1
  f = _variants(losses.rank_distillation_loss, dims=(2, 8), temperature=t)[variant]
  cand_full = RNG.normal(size=(5, 8)).astype(np.float32)
  cand_adapted = RNG.normal(size=(5, 8)).astype(np.float32)

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  lp = log_softmax(_unit(FULL) @ _unit(cand_full).T / t)
  expected = sum(
      (np.exp(lp) * (lp - log_softmax(_unit(ADAPTED[:, :m]) @ _unit(cand_adapted[:, :m]).T / t))).sum(-1).mean()
      for m in (2, 8))
  got = f(FULL, cand_full, ADAPTED, cand_adapted)
  np.testing.assert_allclose(float(got), expected, rtol=1e-4)
  # Per-anchor candidates [b, c, d] give the same value as shared ones.
  per_anchor = f(FULL, np.broadcast_to(cand_full, (6, 5, 8)), ADAPTED, np.broadcast_to(cand_adapted, (6, 5, 8)))
  np.testing.assert_allclose(float(per_anchor), expected, rtol=1e-4)


def test_rank_distillation_zero_when_prefix_reproduces_ranking_and_mask_ignores_padding():
  cand = RNG.normal(size=(5, 8)).astype(np.float32)
  assert float(losses.rank_distillation_loss(FULL, cand, FULL, cand, dims=(8,))) < 1e-6
  mask = np.ones((6, 5), bool)
  mask[:, -1] = False
  garbage = cand.copy()
  garbage[-1] = 100.0 * RNG.normal(size=8)
  a = losses.rank_distillation_loss(FULL, cand, FULL, garbage, dims=(8,), mask=mask)
  b = losses.rank_distillation_loss(FULL, cand[:4], FULL, cand[:4], dims=(8,))
  np.testing.assert_allclose(float(a), float(b), atol=1e-6)


@pytest.mark.parametrize("variant", [0, 1])
def test_ranking_loss_hand_value(variant):
  f = _variants(losses.ranking_loss, dims=(2,), temperature=0.5)[variant]
  q = jnp.array([[1.0, 0.0]])
  # Candidates with cosines 0.6, 0.0, 1.0 and grades 2, 0, 1.
  docs = jnp.array([[[0.6, 0.8], [0.0, 1.0], [1.0, 0.0]]])
  rel = jnp.array([[2, 0, 1]])
  sp = lambda z: np.log1p(np.exp(z))
  # Pairs (i > j by grade): (0,1) gap 2, (0,2) gap 1, (2,1) gap 1.
  num = 2 * sp(-(0.6 - 0.0) / 0.5) + 1 * sp(-(0.6 - 1.0) / 0.5) + 1 * sp(-(1.0 - 0.0) / 0.5)
  np.testing.assert_allclose(float(f(q, docs, rel)), num / 4.0, rtol=1e-5)


def test_ranking_loss_mask_drops_padding():
  q = jnp.array([[1.0, 0.0]])
  docs = jnp.array([[[0.6, 0.8], [0.0, 1.0], [1.0, 0.0]]])
  rel = jnp.array([[2, 0, 1]])
  mask = jnp.array([[True, True, False]])
  sp = lambda z: np.log1p(np.exp(z))
  expected = sp(-(0.6 - 0.0) / 0.05)  # Only the (0, 1) pair remains.
  got = losses.ranking_loss(q, docs, rel, dims=(2,), mask=mask)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_dim_weights_length_is_checked():
  with pytest.raises(ValueError, match="one entry per dim"):
    losses.pairwise_similarity_loss(FULL, ADAPTED, dims=(2, 4), weights=(1.0,))
