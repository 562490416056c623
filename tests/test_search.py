"""Truncation and exact search against brute-force numpy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptor import topk
from adaptor.search import exact_search
from adaptor.truncation import l2_normalize, truncate


def _brute(queries, corpus, k, dim):
  q = queries[:, :dim].astype(np.float64)
  c = corpus[:, :dim].astype(np.float64)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  c /= np.linalg.norm(c, axis=1, keepdims=True)
  s = q @ c.T
  # Stable sort on -score: equal scores keep ascending index order.
  idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(s, idx, axis=1), idx


def _assert_same_topk(scores, idx, ref_scores, ref_idx, atol=1e-5):
  np.testing.assert_allclose(scores, ref_scores, atol=atol)
  # Indices may differ only where scores tie within tolerance.
  differ = idx != ref_idx
  assert np.all(np.abs(scores[differ] - ref_scores[differ]) <= atol)


@pytest.mark.parametrize("jit", [False, True])
def test_truncate_values_and_unit_norm(jit):
  x = jnp.array([[3.0, 4.0, 12.0], [0.0, 0.0, 5.0]])
  f = jax.jit(truncate, static_argnums=1) if jit else truncate
  out = np.asarray(f(x, 2))
  np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)  # Zero prefix stays zero.
  np.testing.assert_allclose(np.asarray(f(x, None)), np.asarray(x) / np.array([[13.0], [5.0]]), rtol=1e-6)


def test_truncate_validates_dim():
  x = jnp.ones((2, 4))
  for bad in (0, 5, -1):
    with pytest.raises(ValueError, match=r"dim must be in \[1, 4\]"):
      truncate(x, bad)
  with pytest.raises(TypeError, match="dim must be an int"):
    truncate(x, 2.0)


def test_l2_normalize_gradient_is_finite_at_zero():
  g = jax.grad(lambda v: jnp.sum(l2_normalize(v)))(jnp.zeros((1, 3)))
  assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize(
    "n_docs,k,block,dim,n_q",
    [(1000, 10, 300, 8, 7),      # last block partial
     (257, 100, 64, 16, 3),      # k > block size
     (50, 50, 16, 32, 5),        # k = corpus size
     (100, 5, 1000, 32, 1)],     # one query, block larger than corpus
)
def test_exact_search_matches_brute_force(n_docs, k, block, dim, n_q):
  rng = np.random.default_rng(n_docs)
  corpus = rng.normal(size=(n_docs, 32)).astype(np.float32)
  queries = rng.normal(size=(n_q, 32)).astype(np.float32)
  scores, idx = exact_search(queries, corpus, k, dim=dim, block_size=block, query_batch=4)
  assert scores.shape == idx.shape == (n_q, k)
  _assert_same_topk(scores, idx, *_brute(queries, corpus, k, dim))


def test_exact_search_ties_go_to_lower_index():
  corpus = np.tile(np.array([[1.0, 0.0], [0.0, 1.0]], np.float32), (10, 1))  # rows 0,2,4.. equal
  _, idx = exact_search(np.array([[1.0, 0.0]], np.float32), corpus, 4, block_size=3)
  np.testing.assert_array_equal(idx[0], [0, 2, 4, 6])


def test_exact_search_float16_storage():
  rng = np.random.default_rng(1)
  corpus = rng.normal(size=(300, 16)).astype(np.float16)
  queries = rng.normal(size=(4, 16)).astype(np.float32)
  scores, idx = exact_search(queries, corpus, 10, block_size=128)
  ref_s, ref_i = _brute(queries.astype(np.float16).astype(np.float32), corpus.astype(np.float32), 10, 16)
  _assert_same_topk(scores, idx, ref_s, ref_i, atol=3e-3)


def test_exact_search_errors():
  c = np.ones((5, 4), np.float32)
  with pytest.raises(ValueError, match=r"k must be an int in \[1, 5\]"):
    exact_search(c, c, 6)
  with pytest.raises(ValueError, match=r"k must be an int in \[1, 5\]"):
    exact_search(c, c, 0)
  with pytest.raises(ValueError, match="queries have d=3 but corpus has d=4"):
    exact_search(np.ones((2, 3), np.float32), c, 1)


# ---------------------------------------------------------------- search, funnel

from adaptor.search import Stage, check_schedule, format_schedule, funnel_search, schedule_cost
from adaptor.topk import float_scorer, rerank, top_k_scan
from adaptor.truncation import normalized_prefix, prefix_inv_norms

search = exact_search


def _brute_funnel(queries, corpus, schedule):
  """numpy reference: stage by stage, stable sorts, ties to the lower index."""
  cand = np.arange(corpus.shape[0])[None].repeat(len(queries), 0)
  for m, keep in schedule:
    q = queries[:, :m].astype(np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    c = corpus[:, :m].astype(np.float64)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    s = np.einsum("qd,qcd->qc", q, c[cand])          # cand ascending: stable sort = lower index
    order = np.argsort(-s, axis=1, kind="stable")[:, :keep]
    scores, ranked = np.take_along_axis(s, order, 1), np.take_along_axis(cand, order, 1)
    cand = np.sort(ranked, axis=1)
  return scores, ranked


@pytest.mark.parametrize(
    "n_docs,k,block,dim,n_q",
    [(1000, 10, 256, 8, 7),      # groups inside blocks, last block partial
     (4096, 5, 4096, 24, 3),     # one block, grouped top-k
     (257, 100, 64, 16, 3),      # k > block size
     (50, 50, 16, 32, 1)])       # k = corpus size, one query
def test_search_matches_brute_force_float16_too(n_docs, k, block, dim, n_q):
  rng = np.random.default_rng(n_docs + k)
  corpus = rng.normal(size=(n_docs, 32)).astype(np.float32)
  queries = rng.normal(size=(n_q, 32)).astype(np.float32)
  scores, idx = search(queries, corpus, k, dim=dim, block_size=block, query_batch=2)
  _assert_same_topk(scores, idx, *_brute(queries, corpus, k, dim))
  half = corpus.astype(np.float16)
  scores, idx = search(queries, half, k, dim=dim, block_size=block)
  _assert_same_topk(scores, idx, *_brute(queries, half.astype(np.float32), k, dim), atol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_top_k_scan_plain_and_jitted(jit):
  rng = np.random.default_rng(3)
  corpus = rng.normal(size=(1100, 16)).astype(np.float32)
  q = np.asarray(truncate(jnp.asarray(rng.normal(size=(4, 16)), jnp.float32), 8))
  scale = prefix_inv_norms(corpus, 8)
  f = lambda q, corpus, scale: top_k_scan(float_scorer(8), q, q, (corpus, scale), 7, block_size=512)
  f = jax.jit(f) if jit else f
  scores, idx = f(jnp.asarray(q), jnp.asarray(corpus), jnp.asarray(scale))
  _assert_same_topk(np.asarray(scores), np.asarray(idx), *_brute(q, corpus, 7, 8))


def test_grouped_block_ties_go_to_lower_index():
  # 2048 rows in one block use the grouped path; equal rows everywhere.
  corpus = np.zeros((2048, 4), np.float32)
  corpus[:, 1] = 1.0
  corpus[[5, 70, 700, 1500, 2047], 0] = 1.0   # cos = 1/sqrt(2), all equal
  scores, idx = search(np.array([[1.0, 0, 0, 0]], np.float32), corpus, 3, block_size=2048)
  np.testing.assert_array_equal(idx[0], [5, 70, 700])
  _, idx = search(np.array([[0, 1.0, 0, 0]], np.float32), corpus, 4, block_size=512)
  np.testing.assert_array_equal(idx[0], [0, 1, 2, 3])


def test_prefix_inv_norms_values():
  x = np.array([[3.0, 4.0, 12.0], [0.0, 0.0, 5.0]], np.float32)
  np.testing.assert_allclose(prefix_inv_norms(x, 2), [0.2, 0.0])
  np.testing.assert_allclose(prefix_inv_norms(x, 3, block_size=1), [1 / 13, 0.2], rtol=1e-6)


@pytest.mark.parametrize("schedule", [[(4, 200), (16, 30), (32, 10)], [(8, 64), (32, 5)],
                                      [(32, 10)]])
def test_funnel_matches_brute_force(schedule):
  rng = np.random.default_rng(len(schedule))
  corpus = rng.normal(size=(700, 32)).astype(np.float32)
  queries = rng.normal(size=(5, 32)).astype(np.float32)
  k = schedule[-1][1]
  scores, idx = funnel_search(queries, corpus, schedule, block_size=256, query_batch=2)
  ref_s, ref_i = _brute_funnel(queries, corpus, schedule)
  assert scores.shape == idx.shape == (5, k)
  _assert_same_topk(scores, idx, ref_s, ref_i)
  # A one-stage funnel at full size is exact search.
  if len(schedule) == 1:
    _assert_same_topk(scores, idx, *search(queries, corpus, k))


def test_normalized_prefix_is_truncate_contiguous():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(300, 12)).astype(np.float32)
  x[7, :5] = 0.0  # a zero prefix stays zero
  for corpus in (x, x.astype(np.float16)):
    p = normalized_prefix(corpus, 5, block_size=64)
    assert p.dtype == np.float32 and p.shape == (300, 5) and p.flags.c_contiguous
    np.testing.assert_allclose(p, np.asarray(truncate(jnp.asarray(corpus, jnp.float32), 5)),
                               atol=1e-6)
    assert not p[7].any()
  with pytest.raises(ValueError, match=r"inv_norms must have shape \(300,\), got \(3,\)"):
    normalized_prefix(x, 5, inv_norms=np.ones(3))


@pytest.mark.parametrize("schedule", [[(4, 200), (16, 30), (32, 10)], [(8, 64), (32, 5)]])
def test_funnel_first_stage_copy_matches_brute_force(schedule):
  rng = np.random.default_rng(5)
  corpus = rng.normal(size=(700, 32)).astype(np.float32)
  queries = rng.normal(size=(5, 32)).astype(np.float32)
  first = normalized_prefix(corpus, schedule[0][0])
  scores, idx = funnel_search(queries, corpus, schedule, block_size=256, query_batch=2,
                              first_stage_copy=first)
  _assert_same_topk(scores, idx, *_brute_funnel(queries, corpus, schedule))
  with pytest.raises(ValueError, match=r"first_stage_copy must be float32 with shape \(700, 4\)"):
    funnel_search(queries, corpus, [(4, 10)], first_stage_copy=first[:, :3])


@pytest.mark.parametrize("jit", [False, True])
def test_rerank_plain_and_jitted(jit):
  corpus = jnp.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]])
  q = jnp.array([[0.0, 1.0]])
  plain = lambda q, docs, cand, keep: rerank(float_scorer(2), q, docs, cand, keep)
  f = jax.jit(plain, static_argnums=3) if jit else plain
  scores, idx = f(q, (corpus, None), jnp.array([[3, 0, 1]]), 2)
  np.testing.assert_allclose(np.asarray(scores), [[0.8, 0.6]], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(idx), [[1, 3]])


def test_schedule_validation_and_cost():
  assert check_schedule([(2, 5), [4, 3]], 4) == (Stage(2, 5), Stage(4, 3, "float32"))
  assert check_schedule("2:5,4:3", 4) == check_schedule([(2, 5), (4, 3)], 4)
  with pytest.raises(ValueError, match="dims must strictly increase, got \\[4, 2\\]"):
    check_schedule([(4, 5), (2, 3)], 4)
  with pytest.raises(ValueError, match="keeps must not increase"):
    check_schedule([(2, 3), (4, 5)], 4)
  with pytest.raises(ValueError, match=r"schedule\[1\] dim must be in \[1, 4\]"):
    check_schedule([(2, 3), (9, 1)], 4)
  with pytest.raises(ValueError, match="at most the corpus size 10, got 11"):
    check_schedule([(2, 11)], 4, n_docs=10)
  with pytest.raises(ValueError, match="last keep must be >= k=5, got 3"):
    check_schedule([(2, 3)], 4, k=5)
  # The model (ms/query on the reference CPU), by hand: scan + selection, then re-ranks.
  scan_32 = 2.0 * (0.460 + 0.0233 * 32)
  assert schedule_cost([(32, 400), (768, 10)], 2_000_000) == pytest.approx(
      scan_32 + 0.4 * (0.738 + 0.0326 * 32) + 0.4 * (0.191 + 0.00043 * 768) + 0.01 * 0.115)
  exact = schedule_cost([(768, 10)], 1_000_000)
  assert exact == pytest.approx(0.460 + 0.0233 * 256 + 0.0237 * 512 + 0.01 * (0.738 + 0.0326 * 768))
  # Cheaper with shorter first prefixes, smaller shortlists and fewer documents.
  assert (schedule_cost([(16, 200), (768, 10)], 10**6) < schedule_cost([(32, 200), (768, 10)], 10**6)
          < schedule_cost([(32, 1000), (768, 10)], 10**6) < exact)
  assert schedule_cost([(16, 200), (768, 10)], 10**5) < schedule_cost([(16, 200), (768, 10)], 10**6)


def test_search_errors():
  c = np.ones((5, 4), np.float32)
  with pytest.raises(ValueError, match="block_size must be a positive int, got 0"):
    search(c, c, 1, block_size=0)
  with pytest.raises(ValueError, match=r"inv_norms must have shape \(5,\), got \(4,\)"):
    search(c, c, 1, inv_norms=np.ones(4, np.float32))
  with pytest.raises(ValueError, match="must be 2-D"):
    search(np.ones(4, np.float32), c, 1)


def test_large_k_path_ties_and_tail():
  # k = 150 with 512-row blocks takes the whole-corpus group-maxima path; 1000 rows
  # leave a 488-row tail whose last group is short. Every row ties with every other.
  corpus = np.ones((1000, 4), np.float32)
  scores, idx = search(np.ones((2, 4), np.float32), corpus, 150, block_size=512)
  np.testing.assert_array_equal(idx, np.arange(150)[None].repeat(2, 0))
  np.testing.assert_allclose(scores, 1.0, rtol=1e-6)
  rng = np.random.default_rng(9)
  corpus = rng.normal(size=(1000, 8)).astype(np.float32)
  q = rng.normal(size=(3, 8)).astype(np.float32)
  _assert_same_topk(*search(q, corpus, 1000, block_size=512), *_brute(q, corpus, 1000, 8))
  # Up to 32 dims the maxima are laid out [documents, queries], beyond [queries, documents].
  corpus = rng.normal(size=(1000, 48)).astype(np.float32)
  q = rng.normal(size=(3, 48)).astype(np.float32)
  for dim in (32, 48):
    _assert_same_topk(*search(q, corpus, 300, dim=dim, block_size=512),
                      *_brute(q, corpus, 300, dim))


def test_default_sizes_follow_the_cpus_the_process_may_use(monkeypatch):
  # Pinned to one CPU (a single-threaded run or a search worker), XLA runs
  # the matmul on that CPU alone and smaller tiles win (see default_sizes).
  n, nq = 1_000_000, 4096
  monkeypatch.setattr(topk, "available_cpus", lambda: [0, 1])
  several = {(dim, c): topk.default_sizes(dim, n, nq, contiguous=c, k=100)
             for dim in (64, 256, 768) for c in (False, True)}
  monkeypatch.setattr(topk, "available_cpus", lambda: [0])
  one = {key: topk.default_sizes(key[0], n, nq, contiguous=key[1], k=100) for key in several}
  assert several[(64, True)] == (4096, 1024) and one[(64, True)] == (1024, 512)
  assert several[(256, False)] == (1024, 512) and one[(256, False)] == (1024, 256)
  assert several[(768, False)] == one[(768, False)] == (4096, 1024)
  assert several[(64, False)] == one[(64, False)] == (1024, 256)
  # Given sizes are kept, and both are clipped to the corpus and the queries.
  assert topk.default_sizes(64, 500, 7, contiguous=True, k=100) == (500, 7)
  assert topk.default_sizes(64, n, nq, block_size=2048, query_batch=64) == (2048, 64)


def test_default_sizes_give_every_cpu_a_batch(monkeypatch):
  # Several CPUs: batches of at most ceil(n_queries / cpus), rounded up to 8,
  # so that run_batches has one for each CPU; one CPU keeps whole batches.
  monkeypatch.setattr(topk, "available_cpus", lambda: [0, 1])
  assert topk.default_sizes(768, 1_000_000, 1000) == (4096, 504)
  assert topk.default_sizes(32, 1_000_000, 1000, contiguous=True, k=500) == (4096, 504)
  assert topk.default_sizes(768, 1_000_000, 5) == (4096, 5)   # Clipped to the queries.
  monkeypatch.setattr(topk, "available_cpus", lambda: [0])
  assert topk.default_sizes(768, 1_000_000, 1000) == (4096, 1000)


def test_run_batches_in_threads_equals_one_at_a_time(monkeypatch):
  import threading
  rng = np.random.default_rng(5)
  queries = rng.normal(size=(23, 6)).astype(np.float32)
  running, most, lock = [0], [0], threading.Lock()
  # With threads, each batch waits at a 3-party barrier before it returns; the
  # barrier opens only once three batches are inside `step` at the same time,
  # so passing it proves the overlap without relying on timing. The timeout only
  # turns a missing overlap into a failure instead of a hang.
  barrier = [None]

  def step(q):  # Scores: the batch itself; "indices": each row's first value's rank.
    with lock:
      running[0] += 1
      most[0] = max(most[0], running[0])
    if barrier[0] is not None:
      barrier[0].wait()
    with lock:
      running[0] -= 1
    return q * 2, np.argsort(q, axis=1)

  monkeypatch.setattr(topk, "available_cpus", lambda: [0])
  serial = topk.run_batches(step, queries, 4, k=3)
  assert most[0] == 1
  monkeypatch.setattr(topk, "available_cpus", lambda: [0, 1, 2])
  assert topk.query_threads(6) == 3 and topk.query_threads(1) == 1
  # 6 batches: two rounds of three (batches 0-2, then 3-5 once 0-2 returned).
  barrier[0] = threading.Barrier(3, timeout=30)
  threaded = topk.run_batches(step, queries, 4, k=3)
  assert barrier[0].n_waiting == 0 and not barrier[0].broken
  assert most[0] == 3   # Three batches ran at once, never more.
  barrier[0] = None
  for got, ref in zip(threaded, serial):
    np.testing.assert_array_equal(got, ref)
  np.testing.assert_array_equal(threaded[0], queries[:, :3] * 2)   # In order, padding dropped.
  np.testing.assert_array_equal(threaded[1], np.argsort(queries, axis=1)[:, :3])

  def failing(q):
    if q[0, 0] == queries[8, 0]:
      raise ValueError("batch 3 failed")
    return step(q)
  with pytest.raises(ValueError, match="batch 3 failed"):
    topk.run_batches(failing, queries, 4)


def test_threaded_search_and_funnel_equal_one_cpu(monkeypatch):
  # The same results whether batches run in threads (several CPUs) or one
  # at a time, with the batch sizes each setting picks.
  rng = np.random.default_rng(6)
  corpus = rng.normal(size=(3000, 64)).astype(np.float32)
  q = rng.normal(size=(37, 64)).astype(np.float32)
  out = {}
  for cpus in ([0], [0, 1]):
    monkeypatch.setattr(topk, "available_cpus", lambda cpus=cpus: cpus)
    out[len(cpus)] = (exact_search(q, corpus, 7, dim=48),
                      funnel_search(q, corpus, [(16, 100), (64, 7)]))
  for one, several in zip(out[1], out[2]):
    np.testing.assert_array_equal(one[1], several[1])
    np.testing.assert_allclose(one[0], several[0], atol=1e-6)
  _assert_same_topk(*out[2][0], *_brute(q, corpus, 7, 48))


def _np_best_groups(group_max, k):
  """numpy reference: the k best groups per row (ties to the lower index), ascending."""
  return np.sort(np.argsort(-group_max, axis=1, kind="stable")[:, :k], axis=1)


def test_best_groups_and_their_bound():
  rng = np.random.default_rng(11)
  x = rng.normal(size=(3, 2000)).astype(np.float32)
  for k in (1, 10, 100):
    g, bound = jax.jit(topk.best_groups, static_argnames="k")(x, k=k)
    np.testing.assert_array_equal(np.asarray(g), _np_best_groups(x, k))
    kth = -np.sort(-x, axis=1)[:, k - 1]
    # Just below the k-th best maximum: by the slack, no more.
    slack = topk._BOUND_SLACK
    np.testing.assert_allclose(np.asarray(bound), kth - slack * (1 + np.abs(kth)), rtol=1e-6)
  # Fewer groups than k: all of them, and no bound.
  g, bound = topk.best_groups(x[:, :50], 100)
  np.testing.assert_array_equal(np.asarray(g), np.arange(50)[None].repeat(3, 0))
  np.testing.assert_array_equal(np.asarray(bound), -np.inf)
  # Equal maxima everywhere: the lowest groups.
  g, bound = topk.best_groups(np.zeros((2, 2000), np.float32), 100)
  np.testing.assert_array_equal(np.asarray(g), np.arange(100)[None].repeat(2, 0))
  assert np.all(np.asarray(bound) < 0)


def test_bounded_group_selection_matches_brute_force():
  # Blocks of 4096 rows take the whole-corpus group-maxima path (313 groups, k = 100).
  rng = np.random.default_rng(12)
  corpus = rng.normal(size=(10_000, 8)).astype(np.float32)
  q = rng.normal(size=(3, 8)).astype(np.float32)
  _assert_same_topk(*search(q, corpus, 100, block_size=4096), *_brute(q, corpus, 100, 8))
  # Equal rows: every member sits at the bound, and ties go to the lower index.
  scores, idx = search(np.ones((2, 4), np.float32), np.ones((10_000, 4), np.float32), 100,
                       block_size=4096)
  np.testing.assert_array_equal(idx, np.arange(100)[None].repeat(2, 0))
  np.testing.assert_allclose(scores, 1.0, rtol=1e-6)
