"""Matryoshka-Adaptor losses: pure functions of embeddings, summed over prefixes.

Every loss compares similarities of the frozen model's full vectors (the
target) with similarities of re-normalised prefixes of the adapted vectors, at
each Matryoshka dim, and returns the weighted sum over dims. No loss calls
`jit`; the trainer does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from adaptor.truncation import l2_normalize, truncate


def _dim_weights(dims, weights):
  if weights is None:
    return (1.0,) * len(dims)
  if len(weights) != len(dims):
    raise ValueError(f"weights must have one entry per dim ({len(dims)}), got {len(weights)}")
  return tuple(weights)


def _cosine(a, b):
  return jnp.einsum("...d,...d->...", l2_normalize(a), l2_normalize(b))


def _scores(anchors, candidates):
  """[batch, c] inner products with per-anchor [batch, c, d] or shared [c, d] candidates."""
  if candidates.ndim == 2:
    return anchors @ candidates.T
  return jnp.einsum("bd,bcd->bc", anchors, candidates)


def pairwise_similarity_loss(full, adapted, *, dims, weights=None):
  """Mean |cos(e_i, e_j) - cos(a_i[:m], a_j[:m])| over the distinct pairs of a batch.

  Args:
    full: frozen-model embeddings, with shape [batch, d_in].
    adapted: adapted embeddings of the same rows, with shape [batch, d_out].
    dims: prefix lengths m, each <= d_out.
    weights: optional weight per dim (default 1.0 each).

  Returns:
    Scalar: the weighted sum over dims of the mean absolute difference.
  """
  n = full.shape[0]
  target = l2_normalize(full) @ l2_normalize(full).T
  off_diag = 1.0 - jnp.eye(n)
  total = 0.0
  for m, w in zip(dims, _dim_weights(dims, weights)):
    a = truncate(adapted, m)
    total += w * jnp.sum(jnp.abs(target - a @ a.T) * off_diag) / max(n * (n - 1), 1)
  return total


def topk_similarity_loss(anchor_full, neighbour_full, anchor_adapted, neighbour_adapted,
                         *, dims, weights=None):
  """Mean |cos(e, e_nb) - cos(a[:m], a_nb[:m])| between items and their nearest neighbours.

  Args:
    anchor_full: frozen-model embeddings of the anchors, with shape [batch, d_in].
    neighbour_full: their k nearest neighbours in the frozen space, with shape
      [batch, k, d_in].
    anchor_adapted: adapted anchors, with shape [batch, d_out].
    neighbour_adapted: adapted neighbours, with shape [batch, k, d_out].
    dims: prefix lengths m, each <= d_out.
    weights: optional weight per dim.
  """
  target = _cosine(anchor_full[:, None, :], neighbour_full)
  total = 0.0
  for m, w in zip(dims, _dim_weights(dims, weights)):
    pred = jnp.einsum("bd,bkd->bk", truncate(anchor_adapted, m), truncate(neighbour_adapted, m))
    total += w * jnp.mean(jnp.abs(target - pred))
  return total


def reconstruction_loss(base, adapted):
  """Mean squared distance between adapted vectors and their base, per vector.

  In the paper's form the base is the input itself (`e + f(e)` stays near `e`);
  with a reorder stage it is the reorder stage's output, so that the MLP stays a
  small correction.

  Args:
    base: reference vectors, with shape [batch, d_out].
    adapted: adapted vectors, with shape [batch, d_out].
  """
  return jnp.mean(jnp.sum(jnp.square(adapted - base), axis=-1))


def orthogonality_penalty(kernel, probes):
  """Stochastic estimate of how far a linear map is from an isometry, relative to its size.

  With z ~ N(0, I), E ||K^T K z - z||^2 = ||K^T K - I||_F^2, so the mean over
  probes, divided by d_out, is 0 exactly when the map keeps every cosine (and
  the full-size ranking) of its inputs. Probing costs O(d_in d_out p) instead
  of the O(d_in d_out^2) of forming K^T K.

  Args:
    kernel: the map, with shape [d_in, d_out] (outputs are `x @ kernel`).
    probes: standard normal vectors, with shape [p, d_out].
  """
  back = (probes @ kernel.T) @ kernel
  return jnp.mean(jnp.sum(jnp.square(back - probes), axis=-1)) / kernel.shape[1]


def rank_distillation_loss(anchor_full, candidates_full, anchor_adapted, candidates_adapted,
                           *, dims, temperature=0.05, weights=None, mask=None):
  """Listwise distillation of the frozen model's ranking into every prefix.

  For each anchor, the frozen model's cosine scores over its candidates define a
  target distribution softmax(s / temperature); each prefix's scores define a
  prediction; the loss is KL(target || prediction). Unlike the pointwise L1
  losses it spends its effort on the order of the top candidates, which is what
  nDCG measures, and it does not ask a 16-d prefix to reproduce similarity
  values it cannot represent.

  Args:
    anchor_full: frozen-model anchors, with shape [batch, d_in].
    candidates_full: frozen-model candidates, either per anchor, with shape
      [batch, c, d_in], or shared by all anchors, with shape [c, d_in].
    anchor_adapted: adapted anchors, with shape [batch, d_out].
    candidates_adapted: adapted candidates, with shape [batch, c, d_out] or [c, d_out].
    dims: prefix lengths m, each <= d_out.
    temperature: softmax temperature on cosine scores.
    weights: optional weight per dim.
    mask: optional bool [batch, c]; False marks padding candidates.
  """
  target = _scores(l2_normalize(anchor_full), l2_normalize(candidates_full)) / temperature
  if mask is not None:
    target = jnp.where(mask, target, -jnp.inf)
  p = jax.nn.softmax(target, axis=-1)
  log_p = jax.nn.log_softmax(target, axis=-1)
  total = 0.0
  for m, w in zip(dims, _dim_weights(dims, weights)):
    s = _scores(truncate(anchor_adapted, m), truncate(candidates_adapted, m)) / temperature
    if mask is not None:
      s = jnp.where(mask, s, -jnp.inf)
    kl = jnp.where(p > 0, p * (log_p - jax.nn.log_softmax(s, axis=-1)), 0.0)
    total += w * jnp.mean(jnp.sum(kl, axis=-1))
  return total


def ranking_loss(queries_adapted, docs_adapted, relevance, *, dims, temperature=0.05,
                 weights=None, mask=None):
  """Supervised pairwise ranking loss at every prefix.

  For each query, every pair of its candidate documents (i, j) with
  relevance_i > relevance_j contributes
  (relevance_i - relevance_j) * softplus(-(s_i - s_j) / temperature),
  a logistic loss on the score difference weighted by the relevance gap.

  Args:
    queries_adapted: adapted queries, with shape [batch, d_out].
    docs_adapted: adapted candidate documents per query (judged ones and hard
      negatives), with shape [batch, c, d_out].
    relevance: graded relevance of each candidate (0 for negatives), with
      shape [batch, c].
    dims: prefix lengths m, each <= d_out.
    temperature: scale of score differences.
    weights: optional weight per dim.
    mask: optional bool [batch, c]; False marks padding candidates.

  Returns:
    Scalar: weighted sum over dims of the gap-weighted mean pair loss.
  """
  rel = relevance.astype(jnp.float32)
  gap = rel[:, :, None] - rel[:, None, :]
  pair_w = jnp.maximum(gap, 0.0)
  if mask is not None:
    pair_w = pair_w * (mask[:, :, None] & mask[:, None, :])
  norm = jnp.maximum(jnp.sum(pair_w), 1e-6)
  total = 0.0
  for m, w in zip(dims, _dim_weights(dims, weights)):
    s = jnp.einsum("bd,bcd->bc", truncate(queries_adapted, m), truncate(docs_adapted, m))
    diff = (s[:, :, None] - s[:, None, :]) / temperature
    total += w * jnp.sum(pair_w * jax.nn.softplus(-diff)) / norm
  return total
