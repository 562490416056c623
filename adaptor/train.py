"""Fitting a Matryoshka-Adaptor: unsupervised on corpus embeddings, then optionally supervised.

The trainer is one loop, `_run_stage`, driven by a jitted step over a plain
pytree train state `(params, opt_state)`. Every batch has a fixed shape and is
drawn on device from `fold_in(stage_key, step)`, so a run is a pure function
of its seed: the same seed gives the same parameters, and a run resumed from
a checkpoint continues exactly where it stopped.

`fit` is a short sequence of named steps, defined below it (see their
docstrings): resolve and check the config and inputs, pick the corpus rows and
the query anchors, build the data tables, set up validation, choose the start,
then run the unsupervised stage and, with qrels, the supervised one.

Unsupervised batches (one per step):
  anchors     `batch_size` rows drawn from the corpus and, if given, from
              unlabeled query embeddings (queries are what retrieval ranks
              documents for, so their neighbourhoods matter most);
  candidates  for each anchor, `neighbours_per_anchor` documents drawn from its
              exact top-`neighbours` documents in the frozen space, plus
              `random_docs` uniformly drawn documents; every anchor is scored
              against every candidate of the batch.
Losses on that batch: the paper's pairwise and top-k similarity losses, its
reconstruction term, and a listwise rank-distillation loss (see `losses`).

Supervised batches add `query_batch` judged queries, each with its judged
documents and `hard_negatives` documents drawn from the frozen model's own top
results, scored with a pairwise ranking loss at every prefix.

Devices: training is data parallel over a one-axis `Mesh` ("data") of all
devices (`jax.devices()`: every local GPU/TPU, and every host's after
`jax.distributed.initialize()`). Parameters, optimizer state and the data tables
(at most `max_rows` documents) are replicated; each step still draws its whole
batch from `fold_in(stage_key, step)`, and only then splits the batch's rows
across devices, so XLA sums the gradients and every device count draws the same
batches and follows the same loss curve (up to float summation order). With
several processes every host must pass the same inputs (checked), and only
process 0 shows progress and reads and writes the training checkpoints; that
plumbing (mesh, placement, agreement between processes) is in `distributed`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from adaptor import distributed, interrupts, losses
from adaptor.checkpoint import TrainCheckpointer, remove_resume_state, resume_fingerprint
from adaptor.data import InputError, check_embeddings, check_qrels, fingerprint
from adaptor.metrics import evaluate_topk
from adaptor.model import MatryoshkaAdaptor, apply_adaptor, check_dims, default_dims, pca_reorder
from adaptor.search import exact_search


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Weight of each loss term; 0 switches a term off (and skips its work)."""

  pairwise: float = 0.0
  topk: float = 0.0
  reconstruction: float = 0.0
  rank: float = 1.0
  ranking: float = 4.0
  orthogonal: float = 10.0
  bias_drift: float = 10.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that decides a fit, saved next to the checkpoint.

  Attributes:
    dims: Matryoshka dims to train (default: powers of two from 16, plus d_out).
    d_out: adapted size (default d_in).
    hidden: residual MLP width (0: none). Default: 0 for unsupervised fits
      (the MLP did not help there, and costs 4x the time), 512 for supervised
      ones (memorising which documents tend to be relevant needs capacity).
    reorder: PCA-initialised linear reorder stage before the residual.
    start: where the reorder stage starts: "auto" (the closed-form candidate
      with the best validation score at step 0: uncentred PCA of the documents,
      of the documents and queries, or centred PCA of the documents), or one of
      "pca-docs", "pca-docs-queries", "pca-centred".
    weights: loss weights.
    dim_weights: per-dim loss weights (default 1.0 each).
    temperature: softmax temperature of the rank-distillation and ranking losses.
    learning_rate, batch_size: Adam step size and anchors per step.
    neighbours: size of each anchor's exact nearest-document list.
    nearest_per_anchor: the closest documents of that list, always candidates.
    neighbours_per_anchor: candidates drawn per anchor from the rest of the list.
    random_docs: uniformly drawn candidate documents per step.
    query_fraction: share of anchors drawn from unlabeled queries, when given.
      None: n / (n + 200) for n training queries, at most 0.8, so that a
      small query log is not drawn so often that the fit memorises it.
    probes: random vectors per step that estimate the orthogonality penalty.
    steps: maximum unsupervised steps. None: enough for `epochs` passes over
      the training anchors (documents and queries), between 500 and 3000, so
      that a small collection fits in a fraction of a large one's time.
    epochs: passes over the anchors that `steps=None` allows.
    supervised_steps: maximum supervised steps (when qrels are given).
    query_batch, hard_negatives, negatives_from, max_positives: supervised
      batch layout: judged queries per step, hard negatives per query, drawn
      from the frozen model's top-`negatives_from` non-relevant documents, and
      at most `max_positives` judged documents per query.
    eval_every, patience: validation period in steps, and how many
      validations without a new best stop a stage.
    val_tolerance: a stage returns the latest validated parameters scoring
      within this fraction of the best score (validation is noisy; later is
      better when the scores cannot tell). Validation is nDCG@10 at the
      smallest dim on held-out judged queries when qrels are given, otherwise
      the training loss on held-out anchors.
    val_fraction: share of anchors (unsupervised) or judged queries
      (supervised) held out for validation.
    max_rows: at most this many corpus rows are used for fitting (sampled).
    seed: PRNG seed; the same seed gives the same adaptor.
  """

  dims: tuple[int, ...] = ()
  d_out: int | None = None
  hidden: int | None = None
  reorder: bool = True
  start: str = "auto"
  weights: LossWeights = LossWeights()
  dim_weights: tuple[float, ...] | None = None
  temperature: float = 0.05
  learning_rate: float = 1e-3
  batch_size: int = 64
  neighbours: int = 64
  nearest_per_anchor: int = 2
  neighbours_per_anchor: int = 6
  random_docs: int = 256
  query_fraction: float | None = None
  probes: int = 32
  steps: int | None = None
  epochs: float = 25.0
  supervised_steps: int = 3000
  query_batch: int = 32
  hard_negatives: int = 16
  negatives_from: int = 100
  max_positives: int = 4
  eval_every: int = 200
  patience: int = 8
  val_tolerance: float = 0.01
  val_fraction: float = 0.1
  max_rows: int = 50_000
  seed: int = 0

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["dims"] = list(self.dims)
    d["dim_weights"] = None if self.dim_weights is None else list(self.dim_weights)
    return d


START_CANDIDATES = ("pca-docs", "pca-docs-queries", "pca-centred")


def auto_steps(n_anchors: int, config: "TrainConfig") -> int:
  """Steps for `config.epochs` passes over `n_anchors` anchors, clipped to [500, 3000]."""
  return int(np.clip(round(config.epochs * n_anchors / config.batch_size), 500, 3000))


def auto_query_fraction(n_queries: int) -> float:
  """Share of anchors drawn from `n_queries` unlabeled queries: n / (n + 200), at most 0.8."""
  return min(0.8, n_queries / (n_queries + 200.0))


def _check_config(config: TrainConfig):
  for name in ("batch_size", "neighbours", "query_batch",
               "hard_negatives", "negatives_from", "max_positives", "eval_every", "patience"):
    v = getattr(config, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {v!r}")
  if config.steps is not None and (isinstance(config.steps, bool) or not isinstance(config.steps, int)
                                   or config.steps < 0):
    raise ValueError(f"TrainConfig.steps must be None or an int >= 0, got {config.steps!r}")
  if not config.epochs > 0:
    raise ValueError(f"TrainConfig.epochs must be > 0, got {config.epochs}")
  for name in ("supervised_steps", "random_docs", "nearest_per_anchor",
               "neighbours_per_anchor", "probes"):
    v = getattr(config, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {v!r}")
  if not 0.0 < config.val_fraction < 1.0:
    raise ValueError(f"TrainConfig.val_fraction must be in (0, 1), got {config.val_fraction}")
  if config.query_fraction is not None and not 0.0 <= config.query_fraction <= 1.0:
    raise ValueError(f"TrainConfig.query_fraction must be in [0, 1], got {config.query_fraction}")
  if config.start not in ("auto",) + START_CANDIDATES:
    raise ValueError(f"TrainConfig.start must be one of {('auto',) + START_CANDIDATES}, "
                     f"got {config.start!r}")
  if config.nearest_per_anchor > config.neighbours or (
      config.neighbours_per_anchor and config.nearest_per_anchor >= config.neighbours):
    raise ValueError(
        f"TrainConfig.nearest_per_anchor ({config.nearest_per_anchor}) must leave room in the "
        f"neighbour list of size {config.neighbours} for neighbours_per_anchor draws")
  if config.nearest_per_anchor + config.neighbours_per_anchor + config.random_docs < 1:
    raise ValueError("TrainConfig needs at least one candidate per step "
                     "(nearest_per_anchor + neighbours_per_anchor + random_docs >= 1)")
  if not config.temperature > 0:
    raise ValueError(f"TrainConfig.temperature must be > 0, got {config.temperature}")


# --------------------------------------------------------------------------- batches


def _draw_unsupervised(key, data, config: TrainConfig, anchor_pool):
  """Indices of one unsupervised batch; all shapes fixed by the config."""
  k_doc, k_query, k_probe, k_nb, k_rand = jax.random.split(key, 5)
  b = config.batch_size
  doc_anchors, query_anchors = anchor_pool
  n_query = int(round(b * config.query_fraction)) if query_anchors is not None else 0
  pick_doc = jax.random.randint(k_doc, (b - n_query,), 0, doc_anchors.shape[0])
  anchors_doc = doc_anchors[pick_doc]
  parts = [anchors_doc]
  if n_query:
    pick_q = jax.random.randint(k_query, (n_query,), 0, query_anchors.shape[0])
    parts.append(query_anchors[pick_q])
  anchor_rows = jnp.concatenate(parts)  # Rows of data["anchors"].
  # The closest few neighbours always, then a random draw from the rest of the list.
  nearest = jnp.broadcast_to(jnp.arange(config.nearest_per_anchor), (b, config.nearest_per_anchor))
  drawn = jax.random.randint(k_nb, (b, config.neighbours_per_anchor), config.nearest_per_anchor,
                             config.neighbours)
  nb_cols = jnp.concatenate([nearest, drawn], axis=1)
  neighbour_docs = jnp.take_along_axis(data["neighbours"][anchor_rows], nb_cols, axis=1)
  random_docs = jax.random.randint(k_rand, (config.random_docs,), 0, data["docs"].shape[0])
  probes = jax.random.normal(k_probe, (config.probes, config.d_out))
  return anchor_rows, neighbour_docs, random_docs, probes


def _split_rows(x, sharding):
  """`x` with its first axis split across devices by `sharding` (unchanged if None)."""
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def _unsupervised_loss(model, data, batch, config: TrainConfig, dims, sharding=None):
  anchor_rows, neighbour_docs, random_docs, probes = batch
  w = config.weights
  b, per = neighbour_docs.shape
  # The batch was drawn whole (the same on every device count); from here on its
  # anchors and candidates are split across devices, so each device runs the
  # model on its share of the rows.
  anchor_rows = _split_rows(anchor_rows, sharding)
  a_full = data["anchors"][anchor_rows]
  cand_ids = _split_rows(jnp.concatenate([neighbour_docs.reshape(-1), random_docs]), sharding)
  c_full = data["docs"][cand_ids]
  a_out = model(a_full)
  c_out = model(c_full)
  total = 0.0
  terms = {}
  if w.rank:
    # Every anchor ranks every candidate of the batch; an anchor's own document
    # is masked, since the identity match would dominate the softmax.
    own = data["anchor_doc"][anchor_rows]
    mask = cand_ids[None, :] != own[:, None]
    terms["rank"] = losses.rank_distillation_loss(
        a_full, c_full, a_out, c_out, dims=dims, temperature=config.temperature,
        weights=config.dim_weights, mask=mask)
    total += w.rank * terms["rank"]
  if w.pairwise:
    both_full = jnp.concatenate([a_full, c_full])
    both_out = jnp.concatenate([a_out, c_out])
    terms["pairwise"] = losses.pairwise_similarity_loss(
        both_full, both_out, dims=dims, weights=config.dim_weights)
    total += w.pairwise * terms["pairwise"]
  if w.topk:
    nb_full = c_full[: b * per].reshape(b, per, -1)
    nb_out = c_out[: b * per].reshape(b, per, -1)
    terms["topk"] = losses.topk_similarity_loss(
        a_full, nb_full, a_out, nb_out, dims=dims, weights=config.dim_weights)
    total += w.topk * terms["topk"]
  if w.reconstruction:
    base = model.base(a_full.astype(jnp.float32)) if model.base is not None else a_full[:, : a_out.shape[1]]
    terms["reconstruction"] = losses.reconstruction_loss(base, a_out)
    total += w.reconstruction * terms["reconstruction"]
  if model.base is not None and (w.orthogonal or w.bias_drift):
    # Keeps the reorder stage near an isometry of its start (an orthogonal map,
    # and the start's bias), so that the longest prefixes and the full size
    # keep the frozen model's ranking: a drifting bias alone cost 0.002 nDCG@10
    # at full size on NFCorpus.
    terms["orthogonal"] = (
        w.orthogonal * losses.orthogonality_penalty(model.base.kernel[...], probes)
        + w.bias_drift * jnp.sum(jnp.square(model.base.bias[...] - data["start_bias"])))
    total += terms["orthogonal"]
  return total, terms


def _draw_supervised(key, data, config: TrainConfig):
  k_q, k_neg = jax.random.split(key)
  rows = jax.random.randint(k_q, (config.query_batch,), 0, data["sup_queries"].shape[0])
  cols = jax.random.randint(k_neg, (config.query_batch, config.hard_negatives), 0,
                            data["sup_negatives"].shape[1])
  negatives = jnp.take_along_axis(data["sup_negatives"][rows], cols, axis=1)
  return rows, negatives


def _supervised_loss(model, data, batch, config: TrainConfig, dims, sharding=None):
  rows, negatives = batch
  rows, negatives = _split_rows(rows, sharding), _split_rows(negatives, sharding)
  q_out = model(data["sup_queries"][rows])
  pos = data["sup_positives"][rows]  # [qb, P], -1 = padding
  cand = _split_rows(jnp.concatenate([jnp.maximum(pos, 0), negatives], axis=1), sharding)
  rel = jnp.concatenate([data["sup_grades"][rows], jnp.zeros_like(negatives)], axis=1)
  mask = jnp.concatenate([pos >= 0, jnp.ones_like(negatives, bool)], axis=1)
  d_out = model(data["docs"][cand.reshape(-1)]).reshape(cand.shape + (-1,))
  return losses.ranking_loss(q_out, d_out, rel, dims=dims, temperature=config.temperature,
                             weights=config.dim_weights, mask=mask)


def _make_step(graphdef, optimizer, loss_fn, replicated):
  # Fixing the outputs' sharding keeps the updated state replicated like its
  # inputs (so donation reuses their buffers) whatever XLA's propagation prefers.
  @functools.partial(jax.jit, donate_argnums=(0, 1), out_shardings=replicated)
  def step(params, opt_state, data, key):
    def objective(p):
      return loss_fn(nnx.merge(graphdef, p), data, key)

    (loss, terms), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, terms

  return step


# --------------------------------------------------------------------------- stages


def _run_stage(name, *, steps, step_fn, evaluate, params, opt_state, data, key, config,
               checkpoints, higher_is_better, quiet):
  """Runs one training stage with early stopping, checkpointing and resume.

  Returns the best parameters seen by validation and a summary dict.
  """
  state = {"params": params, "opt_state": opt_state, "best": jax.tree.map(jnp.copy, params),
           "best_score": jnp.asarray(-jnp.inf if higher_is_better else jnp.inf, jnp.float32),
           "bad_evals": jnp.asarray(0, jnp.int32)}
  start, done, history, kept_step = 0, False, [], 0
  restored = distributed.restore(checkpoints, state)
  if restored is not None:
    start, state, meta = restored
    done = meta.get("done", False)
    history, kept_step = meta.get("history", []), meta.get("kept_step", start)
  sign = 1.0 if higher_is_better else -1.0
  if start == 0:
    # The starting point (PCA, or the previous stage's best) is a candidate too,
    # so a stage never returns something worse than what it was given.
    score = distributed.agreed_score(evaluate(params))
    history.append({"step": 0, "loss": None, "val": score})
    state["best_score"] = jnp.asarray(score, jnp.float32)
  bar = tqdm(total=steps, initial=start, desc=name, unit="step", dynamic_ncols=True,
             disable=quiet or done or jax.process_index() != 0, leave=not quiet)
  loss = float("nan")
  step = start
  while not done and step < steps:
    params, opt_state, loss_arr, _ = step_fn(state["params"], state["opt_state"], data,
                                             jax.random.fold_in(key, step))
    state["params"], state["opt_state"] = params, opt_state
    step += 1
    bar.update(1)
    if step % config.eval_every == 0 or step == steps:
      loss = float(loss_arr)
      score = distributed.agreed_score(evaluate(state["params"]))
      history.append({"step": step, "loss": loss, "val": score})
      # A few hundred validation queries give a noisy score, so the stage keeps
      # the latest parameters that score within `val_tolerance` of the best
      # rather than the argmax of the noise; patience counts evaluations that
      # set no new best.
      if sign * score > sign * float(state["best_score"]):
        state["best_score"] = jnp.asarray(score, jnp.float32)
        state["bad_evals"] = jnp.asarray(0, jnp.int32)
      else:
        state["bad_evals"] = state["bad_evals"] + 1
      best = float(state["best_score"])
      if sign * score >= sign * best - config.val_tolerance * abs(best):
        state["best"] = jax.tree.map(jnp.copy, state["params"])
        kept_step = step
      done = int(state["bad_evals"]) >= config.patience or step >= steps
      # The validation score is a loss without qrels and an nDCG with them: name which.
      val_name = "val_ndcg10" if higher_is_better else "val_loss"
      bar.set_postfix({"loss": f"{loss:.4f}", val_name: f"{score:.4f}",
                       "best": f"{float(state['best_score']):.4f}"})
      if checkpoints is not None:
        checkpoints.save(step, state, {"stage": name, "done": done, "history": history,
                                       "kept_step": kept_step})
    if interrupts.pending() is not None:  # Ctrl-C or SIGTERM (CLI): keep this step, then stop.
      if checkpoints is not None and step % config.eval_every and step != steps:
        checkpoints.save(step, state, {"stage": name, "done": False, "history": history,
                                       "kept_step": kept_step})
      bar.close()  # Before the one-line message, not redrawn after it.
      interrupts.check(interrupts.training_kept(checkpoints, step, name))
  bar.close()
  summary = {"steps": step, "best_val": float(state["best_score"]), "kept_step": kept_step,
             "history": history}
  return state["best"], summary


def _neighbour_table(anchors, docs, k, own_doc):
  """Exact top-k documents (by full-size cosine) of each anchor, skipping its own document.

  Args:
    own_doc: the document row each anchor is, or -1 for query anchors, with shape [n_anchors].
  """
  _, idx = exact_search(anchors, docs, min(k + 1, docs.shape[0]))
  # Move the anchor's own row (where it appears) to the end; keep the first k others.
  order = np.argsort(idx == own_doc[:, None], axis=1, kind="stable")
  return np.take_along_axis(idx, order, axis=1)[:, :k]


def _val_split(key, n, fraction):
  perm = np.asarray(jax.random.permutation(key, n))
  n_val = max(1, int(round(n * fraction)))
  if n - n_val < 1:
    raise InputError(f"need at least 2 rows to hold out a validation split, got {n}")
  return np.sort(perm[n_val:]), np.sort(perm[:n_val])


_VAL_BATCHES = 8


def _retrieval_eval(graphdef, docs, queries, query_ids, doc_ids, qrels, dim):
  def evaluate(params):
    model = nnx.merge(graphdef, distributed.local(params))
    d = apply_adaptor(model, docs, dim=dim)
    q = apply_adaptor(model, queries, dim=dim)
    scores, idx = exact_search(q, d, min(10, d.shape[0]))
    return evaluate_topk(idx, scores, query_ids, doc_ids, qrels, k_values=(10,))["ndcg@10"]
  return evaluate


def fit(
    corpus,
    *,
    dims=None,
    queries=None,
    qrels=None,
    query_ids=None,
    corpus_ids=None,
    config: TrainConfig | None = None,
    seed: int | None = None,
    checkpoint_dir=None,
    keep_resume_state: bool = False,
    quiet: bool = False,
    devices=None,
    **overrides,
):
  """Fits a Matryoshka-Adaptor on cached embeddings.

  Unsupervised when only `corpus` (and optionally unlabeled `queries`) is given;
  supervised (an unsupervised stage, then a supervised one) when `qrels` is given.

  Args:
    corpus: document embeddings, with shape [n_docs, d] (array or memmap).
    dims: Matryoshka dims (default: powers of two from 16, plus d_out).
    queries: optional query embeddings, with shape [n_queries, d]. Without
      qrels they serve as unlabeled anchors; with qrels, the judged ones are
      the supervised training queries.
    qrels: optional {query id: {doc id: grade}} for supervised training;
      needs `query_ids` and `corpus_ids`.
    query_ids, corpus_ids: string ids of the rows of `queries` and `corpus`.
    config: a TrainConfig; keyword `overrides` replace its fields.
    seed: shorthand for config.seed.
    checkpoint_dir: if given, training state is checkpointed there and an
      interrupted fit with the same arguments resumes from it. With several
      processes only process 0 writes (and reads) it. A completed fit removes
      it, unless `keep_resume_state`.
    keep_resume_state: keep `checkpoint_dir` after the fit completes, for a
      caller that removes it once it has saved the adaptor (as the CLI does),
      so that a kill in between resumes instead of fitting again.
    quiet: no progress bar.
    devices: the devices to train on, data parallel (default: `jax.devices()`,
      i.e. all local accelerators, and those of every host after
      `jax.distributed.initialize()`). Any count gives the same batches and,
      up to float summation order, the same adaptor; the batch rows are split
      evenly when `batch_size` and `query_batch` are multiples of the count
      (otherwise XLA pads the last device's share). With several processes,
      every process must call `fit` with the same inputs and arguments.

  Returns:
    A fitted `adaptor.Adaptor`, on this process's first device of `devices`;
    `info["devices"]` and `info["processes"]` record what trained it.
  """
  from adaptor.api import Adaptor  # Deferred: api imports this module.

  config = _resolve_config(config, seed=seed, dims=dims, overrides=overrides)
  mesh = distributed.mesh(devices)
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_rows = NamedSharding(mesh, PartitionSpec("data"))
  corpus = check_embeddings(corpus, name="corpus")
  d_in = corpus.shape[1]
  config = _sized_config(config, d_in=d_in, supervised=qrels is not None)
  queries = _check_inputs(corpus, queries, qrels, query_ids, corpus_ids)

  key = jax.random.PRNGKey(config.seed)
  k_rows, k_split, k_init, k_pca, k_unsup, k_sup, k_qsplit = (jax.random.fold_in(key, i) for i in range(7))
  docs, doc_ids = _fit_rows(corpus, corpus_ids, config, k_rows)
  anchor_queries, sup_train, sup_val = _anchor_queries(queries, qrels, query_ids, config, k_qsplit)
  n_anchor_queries = 0 if anchor_queries is None else len(anchor_queries)
  config = _scheduled_config(config, n_docs=len(docs), n_anchor_queries=n_anchor_queries)
  model = MatryoshkaAdaptor(d_in, d_out=config.d_out, hidden=config.hidden, reorder=config.reorder,
                            rngs=nnx.Rngs(params=k_init))
  model.config = dataclasses.replace(model.config, dims=config.dims)
  starts = (_start_candidates(config, docs, anchor_queries, config.d_out, k_pca)
            if config.reorder else {})

  t0 = time.time()
  host_data, train_pool, val_pool = _build_tables(docs, anchor_queries, config, k_split)
  # Hosts holding different inputs would each compute a different "replicated"
  # value, silently; the check costs one hash of the tables per fit.
  distributed.check_same_inputs({**host_data, "config": np.frombuffer(
      json.dumps(config.to_dict(), sort_keys=True).encode(), np.uint8)})
  # The tables are small (at most max_rows documents) and every device gathers
  # its batch rows from them, so each device holds a full copy.
  data = distributed.put(host_data, replicated)
  graphdef, params = nnx.split(model, nnx.Param)
  params = _agreed_params(params, replicated)
  optimizer = optax.adam(config.learning_rate)
  info = {"neighbour_seconds": time.time() - t0, "n_docs": len(docs),
          "n_query_anchors": n_anchor_queries, "devices": mesh.size,
          "processes": jax.process_count()}
  # Resume state records what decides this fit; another fit's state is refused.
  resume_fp = None if checkpoint_dir is None else resume_fingerprint(
      corpus=corpus, queries=queries, qrels=qrels, query_ids=query_ids, corpus_ids=corpus_ids,
      config=config.to_dict())
  checkpoints = functools.partial(_checkpoints, checkpoint_dir, fingerprint=resume_fp)

  train_pool = _device_pool(train_pool)
  evaluate, higher = _validation(
      graphdef, data, config, docs=docs, doc_ids=doc_ids, queries=queries, query_ids=query_ids,
      qrels=qrels, sup_val=sup_val, val_pool=val_pool, key=k_split, batch_rows=batch_rows)
  if starts:
    params, data["start_bias"], info["start"] = _choose_start(model, starts, evaluate, higher,
                                                              replicated)

  stages = {}
  params, stages["unsupervised"] = _unsupervised_stage(
      graphdef, optimizer, params, data, config, train_pool=train_pool, evaluate=evaluate,
      higher_is_better=higher, key=k_unsup, checkpoints=checkpoints, replicated=replicated,
      batch_rows=batch_rows, quiet=quiet)
  if qrels is not None and config.supervised_steps:
    host_sup = _supervised_tables(queries, query_ids, qrels, sup_train, docs, doc_ids, config)
    params, stages["supervised"] = _supervised_stage(
        graphdef, optimizer, params, data, host_sup, config, train_pool=train_pool,
        evaluate=evaluate, key=k_sup, checkpoints=checkpoints, replicated=replicated,
        batch_rows=batch_rows, quiet=quiet)

  nnx.update(model, distributed.local(params))
  info.update({
      "supervised": qrels is not None,
      "stages": stages,
      "corpus_fingerprint": fingerprint(corpus),
      "queries_fingerprint": None if queries is None else fingerprint(queries),
      "train_seconds": time.time() - t0,
  })
  if checkpoint_dir is not None and jax.process_index() == 0 and not keep_resume_state:
    remove_resume_state(checkpoint_dir)  # The fit is complete: a rerun must start afresh.
  return Adaptor(model, train_config=config, info=info)


# --------------------------------------------------------------------------- the steps of `fit`


def _resolve_config(config: TrainConfig | None, *, seed, dims, overrides: dict) -> TrainConfig:
  """`config` (default TrainConfig()) with `seed`, `dims` and `overrides` applied, validated."""
  config = config or TrainConfig()
  overrides = dict(overrides)
  if seed is not None:
    overrides["seed"] = seed
  if dims is not None:
    overrides["dims"] = tuple(dims)
  if overrides:
    config = dataclasses.replace(config, **overrides)
  _check_config(config)
  return config


def _sized_config(config: TrainConfig, *, d_in: int, supervised: bool) -> TrainConfig:
  """`config` with its sizes decided: d_out, checked dims, and the hidden width."""
  d_out = config.d_out or d_in
  dims = check_dims(config.dims or default_dims(d_out), d_out)
  hidden = config.hidden if config.hidden is not None else (512 if supervised else 0)
  return dataclasses.replace(config, dims=dims, d_out=d_out, hidden=hidden)


def _check_inputs(corpus, queries, qrels, query_ids, corpus_ids):
  """The checked `queries` (or None); raises InputError on inputs a fit cannot use.

  Args:
    corpus: the checked document embeddings, with shape [n_docs, d].
    queries: query embeddings, with shape [n_queries, d], or None.
  """
  if queries is not None:
    queries = check_embeddings(queries, name="queries", dim=corpus.shape[1])
  if qrels is not None:
    if queries is None or query_ids is None or corpus_ids is None:
      raise InputError("supervised fitting (qrels given) needs queries, query_ids and corpus_ids")
    if len(query_ids) != queries.shape[0]:
      raise InputError(f"query_ids has {len(query_ids)} ids but queries has {queries.shape[0]} rows")
    if len(corpus_ids) != corpus.shape[0]:
      raise InputError(f"corpus_ids has {len(corpus_ids)} ids but corpus has {corpus.shape[0]} rows")
    check_qrels(qrels, query_ids=query_ids, doc_ids=corpus_ids)
  return queries


def _fit_rows(corpus, corpus_ids, config: TrainConfig, key):
  """`(docs [n_fit, d] float32, their ids or None)`: the corpus rows used for fitting.

  All of them unless the corpus has more than `config.max_rows` rows; then a
  sorted sample of `max_rows` drawn with `key`.
  """
  n_docs = corpus.shape[0]
  if n_docs > config.max_rows:
    rows = np.sort(np.asarray(jax.random.choice(key, n_docs, (config.max_rows,), replace=False)))
  else:
    rows = np.arange(n_docs)
  docs = np.asarray(corpus[rows], np.float32)
  doc_ids = None if corpus_ids is None else [str(corpus_ids[i]) for i in rows]
  if config.neighbours >= docs.shape[0]:
    raise InputError(f"TrainConfig.neighbours must be < the number of documents ({docs.shape[0]}), "
                     f"got {config.neighbours}")
  return docs, doc_ids


def _anchor_queries(queries, qrels, query_ids, config: TrainConfig, key):
  """`(anchor queries [n_anchor_queries, d] float32 or None, sup_train, sup_val)`.

  Unlabeled query anchors are all given queries, minus the judged validation
  queries when `qrels` is given; then `sup_train` and `sup_val` are the rows of
  `queries` of the judged training and validation queries (split with `key`),
  otherwise None.
  """
  if qrels is not None:
    judged = np.array([i for i, q in enumerate(query_ids) if q in qrels and qrels[q]])
    if len(judged) < 2:
      raise InputError(f"qrels judge {len(judged)} of the given queries; need at least 2")
    tr, va = _val_split(key, len(judged), config.val_fraction)
    sup_train, sup_val = judged[tr], judged[va]
    return np.asarray(queries[sup_train], np.float32), sup_train, sup_val
  if queries is not None:
    return np.asarray(queries, np.float32), None, None
  return None, None, None


def _scheduled_config(config: TrainConfig, *, n_docs: int, n_anchor_queries: int) -> TrainConfig:
  """`config` with `query_fraction` and `steps` decided from the anchor counts when None."""
  if config.query_fraction is None:
    config = dataclasses.replace(config, query_fraction=auto_query_fraction(n_anchor_queries))
  if config.steps is None:
    config = dataclasses.replace(config, steps=auto_steps(n_docs + n_anchor_queries, config))
  return config


def _build_tables(docs, anchor_queries, config: TrainConfig, key):
  """`(host tables, train pool, validation pool)` of the unsupervised stage.

  The tables, the `data` every step gathers its batch from (a supervised fit
  adds `_supervised_tables`' later, once the unsupervised stage is done):
    docs         [n_docs, d] float32, the fitted corpus rows;
    anchors      [n_anchors, d] float32, the documents, then the unlabeled queries;
    anchor_doc   [n_anchors] int32, the document row each anchor is (-1: a query);
    neighbours   [n_anchors, config.neighbours] int32, each anchor's exact
                 top documents by full-size cosine, without itself;
    start_bias   [d_out] float32, the reorder stage's starting bias (zeros
                 until `_choose_start` picks a start).
  Each pool is `(document anchor rows, query anchor rows or None)`, host
  arrays; validation holds out some documents and some queries (split with `key`).

  Args:
    docs: the fitted corpus rows, with shape [n_docs, d].
    anchor_queries: unlabeled query anchors, with shape [n_anchor_queries, d], or None.
  """
  anchors = docs if anchor_queries is None else np.concatenate([docs, anchor_queries])
  anchor_doc = np.concatenate([np.arange(len(docs)), np.full(len(anchors) - len(docs), -1)])
  neighbours = _neighbour_table(anchors, docs, config.neighbours, anchor_doc)
  doc_tr, doc_va = _val_split(key, len(docs), config.val_fraction)
  if anchor_queries is not None and len(anchor_queries) >= 2:
    q_tr, q_va = _val_split(jax.random.fold_in(key, 1), len(anchor_queries), config.val_fraction)
    q_pool = (len(docs) + q_tr, len(docs) + q_va)
  else:
    q_pool = (None, None)
  host_data = {
      "docs": docs,
      "anchors": anchors,
      "anchor_doc": anchor_doc.astype(np.int32),
      "neighbours": neighbours.astype(np.int32),
      "start_bias": np.zeros(config.d_out, np.float32),
  }
  return host_data, (doc_tr, q_pool[0]), (doc_va, q_pool[1])


def _device_pool(pool):
  """A pool of `_build_tables` as device arrays, for `_draw_unsupervised`."""
  docs, queries = pool
  return jnp.asarray(docs), None if queries is None else jnp.asarray(queries)


def _supervised_tables(queries, query_ids, qrels, sup_train, docs, doc_ids, config: TrainConfig):
  """The host tables the supervised stage adds to `data`:

    sup_queries    [n_train, d] float32, the judged training queries;
    sup_positives  [n_train, max_positives] int32, their judged-relevant
                   documents (rows of docs; -1 padding);
    sup_grades     [n_train, max_positives] int32, those documents' grades;
    sup_negatives  [n_train, k] int32, each query's top frozen-model
                   documents that are not judged relevant.
  """
  pos, grades = _positives_table(qrels, [query_ids[i] for i in sup_train], doc_ids,
                                 config.max_positives)
  sup_q = np.asarray(queries[sup_train], np.float32)
  negatives = _hard_negatives(sup_q, docs, pos, config.negatives_from)
  return {"sup_queries": sup_q, "sup_positives": pos, "sup_grades": grades,
          "sup_negatives": negatives}


def _agreed_params(params, replicated):
  """Process 0's values of `params`, replicated over the mesh.

  The PCA start is computed on each host, and hosts with other BLAS builds
  could differ in the last bits.
  """
  return distributed.put(distributed.from_process_0(jax.tree.map(np.asarray, params)), replicated)


def _checkpoints(checkpoint_dir, stage: str, *, fingerprint):
  """The stage's TrainCheckpointer, or None where this process keeps no checkpoints."""
  # Process 0 alone writes checkpoints; `distributed.restore` sends their contents to the others.
  if checkpoint_dir is None or jax.process_index() != 0:
    return None
  return TrainCheckpointer(f"{checkpoint_dir}/{stage}", fingerprint=fingerprint)


def _validation(graphdef, data, config: TrainConfig, *, docs, doc_ids, queries, query_ids, qrels,
                sup_val, val_pool, key, batch_rows):
  """`(evaluate, higher_is_better)`: the validation score of a stage's parameters.

  With qrels, nDCG@10 at the smallest dim on the judged validation queries
  `sup_val` (rows of `queries`); without, the unsupervised loss on held-out
  anchors (`val_pool`), in fixed batches drawn from `key`. `data` is read when
  `evaluate` runs, so it sees the chosen start's bias.
  """
  if qrels is not None:
    evaluate = _retrieval_eval(
        graphdef, docs, np.asarray(queries[sup_val], np.float32),
        [query_ids[i] for i in sup_val], doc_ids,
        {query_ids[i]: qrels[query_ids[i]] for i in sup_val}, config.dims[0])
    return evaluate, True
  # Without labels, validation is the training objective on held-out anchors
  # (fixed batches). A label-free retrieval proxy (agreement of each prefix's
  # top 10 with the full-size top 10) was tried and rejected: on a few hundred
  # held-out queries it ranked the PCA start above checkpoints that were much
  # better on validation nDCG.
  val_pool = _device_pool(val_pool)
  val_keys = jnp.stack([jax.random.fold_in(key, 1000 + i) for i in range(_VAL_BATCHES)])

  @jax.jit
  def val_loss(params_, data_):
    model_ = nnx.merge(graphdef, params_)

    def one(vk):
      batch = _draw_unsupervised(vk, data_, config, val_pool)
      total, terms = _unsupervised_loss(model_, data_, batch, config, config.dims, batch_rows)
      # The score is the ranking objective alone: the orthogonality penalty
      # is relative to the chosen start, which the start candidates differ in.
      return total - terms.get("orthogonal", 0.0)

    # lax.map compiles the batch once instead of unrolling it _VAL_BATCHES times.
    return jnp.mean(jax.lax.map(one, val_keys))

  return (lambda p: float(val_loss(p, data))), False


def _choose_start(model, starts: dict, evaluate, higher_is_better: bool, replicated):
  """`(params, start bias, info)` of the best-scoring closed-form start; sets it in `model`.

  Each start of `_start_candidates` is scored like any checkpoint, and the fit
  starts from the best.
  """
  scores = {}
  for name, (kernel, bias) in starts.items():
    model.base.kernel.set_value(jnp.asarray(kernel))
    model.base.bias.set_value(jnp.asarray(bias))
    scores[name] = distributed.agreed_score(
        evaluate(_agreed_params(nnx.split(model, nnx.Param)[1], replicated)))
  pick = max if higher_is_better else min
  chosen = pick(scores, key=scores.get)
  kernel, bias = starts[chosen]
  model.base.kernel.set_value(jnp.asarray(kernel))
  model.base.bias.set_value(jnp.asarray(bias))
  params = _agreed_params(nnx.split(model, nnx.Param)[1], replicated)
  start_bias = distributed.put(np.asarray(bias, np.float32), replicated)
  return params, start_bias, {"chosen": chosen, "val": scores}


def _unsupervised_stage(graphdef, optimizer, params, data, config: TrainConfig, *, train_pool,
                        evaluate, higher_is_better, key, checkpoints, replicated, batch_rows,
                        quiet):
  """`(best params, summary)` of the unsupervised stage (see `_run_stage`)."""
  def loss(model_, data_, key_):
    batch = _draw_unsupervised(key_, data_, config, train_pool)
    return _unsupervised_loss(model_, data_, batch, config, config.dims, batch_rows)

  step_fn = _make_step(graphdef, optimizer, loss, replicated)
  return _run_stage(
      "unsupervised", steps=config.steps, step_fn=step_fn, evaluate=evaluate, params=params,
      opt_state=distributed.put(optimizer.init(params), replicated), data=data, key=key,
      config=config, checkpoints=checkpoints("unsupervised"), higher_is_better=higher_is_better,
      quiet=quiet)


def _supervised_stage(graphdef, optimizer, params, data, host_sup, config: TrainConfig, *,
                      train_pool, evaluate, key, checkpoints, replicated, batch_rows, quiet):
  """`(best params, summary)` of the supervised stage, on `data` plus `host_sup`.

  Each step adds a supervised batch's ranking loss to an unsupervised batch's
  loss, so the fit keeps what the unsupervised stage taught.
  """
  distributed.check_same_inputs(host_sup)
  data = {**data, **distributed.put(host_sup, replicated)}

  def loss(model_, data_, key_):
    k1, k2 = jax.random.split(key_)
    unsup, terms = _unsupervised_loss(
        model_, data_, _draw_unsupervised(k1, data_, config, train_pool), config, config.dims,
        batch_rows)
    ranking = _supervised_loss(model_, data_, _draw_supervised(k2, data_, config), config,
                               config.dims, batch_rows)
    return unsup + config.weights.ranking * ranking, {**terms, "ranking": ranking}

  step_fn = _make_step(graphdef, optimizer, loss, replicated)
  return _run_stage(
      "supervised", steps=config.supervised_steps, step_fn=step_fn, evaluate=evaluate,
      params=params, opt_state=distributed.put(optimizer.init(params), replicated), data=data,
      key=key, config=config, checkpoints=checkpoints("supervised"), higher_is_better=True,
      quiet=quiet)


def _start_candidates(config: TrainConfig, docs, queries, d_out: int, key) -> dict:
  """{name: (kernel [d_in, d_out], bias [d_out])} of the closed-form starts `config.start` allows.

  Uncentred PCA keeps every cosine at full size; centred PCA drops the shared
  mean direction, which some collections' rankings do better without; PCA of
  documents and queries puts first what queries vary in too.
  """
  def pca(x, center):
    return pca_reorder(x, d_out, center=center, key=key)

  makers = {"pca-docs": lambda: pca(docs, False),
            "pca-centred": lambda: pca(docs, True)}
  if queries is not None:
    makers["pca-docs-queries"] = lambda: pca(np.concatenate([docs, queries]), False)
  names = list(makers) if config.start == "auto" else [config.start]
  if config.start == "pca-docs-queries" and queries is None:
    names = ["pca-docs"]  # Without queries, the documents' PCA is the same start.
  return {name: makers[name]() for name in names}


def _positives_table(qrels, qids, doc_ids, max_positives):
  """[n_queries, max_positives] rows of judged-relevant docs (-1 padding) and their grades."""
  row_of = {d: i for i, d in enumerate(doc_ids)}
  pos = np.full((len(qids), max_positives), -1, np.int32)
  grades = np.zeros((len(qids), max_positives), np.int32)
  for r, q in enumerate(qids):
    judged = sorted(((g, d) for d, g in qrels[q].items() if g > 0 and d in row_of), reverse=True)
    for c, (g, d) in enumerate(judged[:max_positives]):
      pos[r, c], grades[r, c] = row_of[d], g
  return pos, grades


def _hard_negatives(queries, docs, positives, k):
  """Each query's top-k frozen-model documents that are not judged relevant."""
  k = min(k, docs.shape[0] - positives.shape[1])
  _, idx = exact_search(queries, docs, k + positives.shape[1])
  is_pos = (idx[:, :, None] == positives[:, None, :]).any(-1)
  order = np.argsort(is_pos, axis=1, kind="stable")
  return np.take_along_axis(idx, order, axis=1)[:, :k].astype(np.int32)
