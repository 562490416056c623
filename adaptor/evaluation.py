"""Comparison of truncation methods: raw prefixes, PCA and fitted adaptors, per dim."""

from __future__ import annotations

import json
import os

import numpy as np

from adaptor.data import atomic_file
from adaptor.metrics import evaluate_topk
from adaptor.model import pca_basis
from adaptor.search import exact_search


class PCA:
  """Projection onto principal directions of a corpus; a baseline with the adaptor's interface."""

  def __init__(self, x, *, center: bool):
    self.components, self.mean = pca_basis(x, center=center)
    self.d_in = x.shape[1]

  def apply(self, embeddings, *, dim=None):
    dim = self.d_in if dim is None else dim
    return (np.asarray(embeddings, np.float32) - self.mean) @ self.components[:, :dim]


class Raw:
  """Plain truncation of the frozen model's vectors."""

  def apply(self, embeddings, *, dim=None):
    return np.asarray(embeddings[:, :dim], np.float32)


def compare(methods: dict, corpus, queries, *, query_ids, corpus_ids, qrels, dims,
            k_values=(10, 100)) -> dict:
  """Exact-search retrieval quality of each method at each prefix length.

  Args:
    methods: name -> object with `.apply(embeddings, dim=m)` (Raw, PCA, Adaptor).
    corpus: document embeddings, with shape [n_docs, d].
    queries: query embeddings, with shape [n_queries, d].
    query_ids, corpus_ids: string ids of the rows.
    qrels: {query id: {doc id: grade}}.
    dims: prefix lengths to evaluate.
    k_values: metric cut-offs (nDCG, recall and MRR at each).

  Returns:
    {method: {str(dim): {"ndcg@10": ..., "recall@100": ..., ...}}}.
  """
  k = min(max(k_values), corpus.shape[0])
  out = {}
  for name, method in methods.items():
    out[name] = {}
    for dim in dims:
      # exact_search re-normalises each prefix, so PCA projections are scored by cosine too.
      scores, idx = exact_search(method.apply(queries, dim=dim), method.apply(corpus, dim=dim), k)
      out[name][str(dim)] = evaluate_topk(idx, scores, query_ids, corpus_ids, qrels,
                                          k_values=k_values)
  return out


def format_table(results: dict, metric: str = "ndcg@10", *, reference: float | None = None) -> str:
  """A Markdown table: one row per method, one column per dim.

  With `reference` (e.g. the full-size raw score), cells also show the share of it kept.
  """
  dims = sorted({int(d) for r in results.values() for d in r})
  lines = [f"| {metric} | " + " | ".join(str(d) for d in dims) + " |",
           "|---|" + "---|" * len(dims)]
  for name, row in results.items():
    cells = []
    for d in dims:
      v = row.get(str(d), {}).get(metric)
      if v is None:
        cells.append("")
      elif reference:
        cells.append(f"{v:.4f} ({100 * v / reference:.0f}%)")
      else:
        cells.append(f"{v:.4f}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_json(obj, path) -> None:
  """Writes JSON atomically (temp file in the same folder, then rename)."""
  with atomic_file(path) as f:
    json.dump(obj, f, indent=2)
    f.write("\n")


def plot(results: dict, path, *, metric: str = "ndcg@10", title: str = "") -> None:
  """Line plot of `metric` against dims (log scale), one line per method, saved as PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for name, row in results.items():
    dims = sorted(int(d) for d in row)
    ax.plot(dims, [row[str(d)][metric] for d in dims], marker="o", label=name)
  ax.set_xscale("log", base=2)
  # One tick per evaluated dim, full size included, labelled 16 ... 384 rather than 2^4 ...
  ticks = sorted({int(d) for row in results.values() for d in row})
  ax.set_xticks(ticks, labels=[str(d) for d in ticks])
  ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
  ax.set_xlabel("dims kept")
  ax.set_ylabel(metric)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  save_figure(fig, path)


def save_figure(fig, path) -> None:
  """Writes a matplotlib figure as PNG atomically (temporary file, then rename) and closes it."""
  import matplotlib.pyplot as plt

  fig.tight_layout()
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.png"
  fig.savefig(tmp)
  plt.close(fig)
  os.replace(tmp, path)
