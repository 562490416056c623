"""The Matryoshka-Adaptor: `e -> base(e) + f(e)`, one map for queries and documents.

`base` is either the identity (the first `d_out` coordinates of `e`, as in the
paper) or a learned linear "reorder" stage initialised from the PCA of the
training corpus. A plain residual cannot move information between
coordinates cheaply, so it cannot put the most useful directions first; the
PCA start gives the adaptor PCA's quality at every prefix before any training,
and training only has to improve on it. `f` is a shallow MLP whose last layer
starts at zero, so an untrained adaptor equals its base.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adaptor.checks import check_dim
from adaptor.truncation import truncate


def default_dims(d: int) -> tuple[int, ...]:
  """Powers of two from 16 below `d`, plus `d` itself."""
  dims, m = [], 16
  while m < d:
    dims.append(m)
    m *= 2
  return tuple(dims) + (d,)


def adaptor_fingerprint(model) -> str:
  """16 hex characters that identify a fitted adaptor: a sha256 of its config and parameters.

  An index stores it, and a plan or a resumed apply checks it, to refuse another adaptor.

  Args:
    model: an `Adaptor` or its `MatryoshkaAdaptor` module.
  """
  module = getattr(model, "module", model)
  h = hashlib.sha256(json.dumps(module.config.to_dict(), sort_keys=True).encode())
  for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(module, nnx.Param)):
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(np.asarray(leaf)).data)
  return h.hexdigest()[:16]


def check_dims(dims, d: int, *, name: str = "dims") -> tuple[int, ...]:
  """Validates Matryoshka dims: sorted, unique ints in [1, d]; returns a tuple."""
  if isinstance(dims, (int, np.integer)) or not hasattr(dims, "__iter__"):
    raise TypeError(f"{name} must be a sequence of ints, got {dims!r}")
  dims = tuple(dims)
  if not dims:
    raise ValueError(f"{name} must name at least one dim, got an empty sequence")
  for m in dims:
    check_dim(m, d, name=f"each of {name}")
  if list(dims) != sorted(set(dims)):
    raise ValueError(f"{name} must be strictly increasing without repeats, got {list(dims)}")
  return tuple(int(m) for m in dims)


@dataclasses.dataclass(frozen=True)
class AdaptorConfig:
  """Shape of an adaptor; serialised next to every checkpoint.

  Attributes:
    d_in: size of the frozen model's embeddings.
    d_out: size of the adapted embeddings (d_out <= d_in compresses).
    hidden: width of the residual MLP; 0 means no MLP (base only).
    reorder: whether the base is a learned linear map (PCA-initialised)
      rather than the first d_out input coordinates.
    dims: the Matryoshka prefix lengths the adaptor is trained for.
  """

  d_in: int
  d_out: int
  hidden: int = 512
  reorder: bool = True
  dims: tuple[int, ...] = ()

  def __post_init__(self):
    for f in ("d_in", "d_out"):
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{f} must be a positive int, got {v!r}")
    if self.d_out > self.d_in:
      raise ValueError(f"d_out must be <= d_in ({self.d_in}), got {self.d_out}")
    if isinstance(self.hidden, bool) or not isinstance(self.hidden, (int, np.integer)) or self.hidden < 0:
      raise ValueError(f"hidden must be an int >= 0, got {self.hidden!r}")
    if not self.reorder and not self.hidden:
      raise ValueError("an adaptor needs reorder=True or hidden > 0; with neither it has no "
                       "parameters (it would only truncate)")
    dims = self.dims or default_dims(self.d_out)
    object.__setattr__(self, "dims", check_dims(dims, self.d_out))

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), "dims": list(self.dims)}

  @classmethod
  def from_dict(cls, d: dict) -> "AdaptorConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: (tuple(v) if k == "dims" else v) for k, v in d.items() if k in fields})


class MatryoshkaAdaptor(nnx.Module):
  """`e -> base(e) + f(e)` with f a two-layer MLP whose output layer starts at zero.

  Args:
    d_in: input size.
    d_out: output size (defaults to d_in).
    hidden: MLP width; 0 disables the MLP.
    reorder: learned linear base (identity-initialised here; see
      `init_reorder_from_pca`) instead of slicing the first d_out inputs.
    rngs: random streams for the MLP's first layer.
  """

  def __init__(self, d_in: int, *, d_out: int | None = None, hidden: int = 512,
               reorder: bool = True, rngs: nnx.Rngs):
    d_out = d_in if d_out is None else d_out
    self.config = AdaptorConfig(d_in=d_in, d_out=d_out, hidden=hidden, reorder=reorder)
    if reorder:
      eye = lambda key, shape, dtype=jnp.float32: jnp.eye(*shape, dtype=dtype)
      self.base = nnx.Linear(d_in, d_out, kernel_init=eye, rngs=rngs)
    else:
      self.base = None
    if hidden:
      self.hidden_layer = nnx.Linear(d_in, hidden, rngs=rngs)
      self.out_layer = nnx.Linear(hidden, d_out, kernel_init=nnx.initializers.zeros, rngs=rngs)
    else:
      self.hidden_layer = self.out_layer = None

  def __call__(self, x: jax.Array) -> jax.Array:
    """Adapts embeddings [..., d_in] to [..., d_out] (not normalised)."""
    x = x.astype(jnp.float32)
    y = self.base(x) if self.base is not None else x[..., : self.config.d_out]
    if self.hidden_layer is not None:
      y = y + self.out_layer(jax.nn.gelu(self.hidden_layer(x)))
    return y


def pca_basis(x, *, center: bool = False, max_rows: int = 200_000,
              key: jax.Array | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Principal directions of `x`, strongest first, from its (un)centred Gram matrix.

  Args:
    x: embeddings, with shape [n, d]; may be a memmap (read in row chunks).
    center: subtract the mean first (classic PCA) or not (uncentred, which
      keeps cosine similarities exact at full size).
    max_rows: at most this many rows are used, sampled with `key`.
    key: PRNG key for the row sample; required when n > max_rows.

  Returns:
    (components [d, d] with one direction per column, mean [d]; zeros if not centred).
  """
  n, d = x.shape
  rows = None
  if n > max_rows:
    if key is None:
      raise ValueError(f"key is required to sample {max_rows} of the {n} rows")
    rows = np.sort(np.asarray(jax.random.choice(key, n, (max_rows,), replace=False)))
  mean = np.zeros(d, np.float64)
  gram = np.zeros((d, d), np.float64)
  count = 0
  chunk = 65536
  for start in range(0, n if rows is None else len(rows), chunk):
    part = x[start:start + chunk] if rows is None else x[rows[start:start + chunk]]
    part = np.asarray(part, np.float64)
    mean += part.sum(0)
    gram += part.T @ part
    count += len(part)
  mean /= count
  if center:
    gram -= count * np.outer(mean, mean)
  else:
    mean[:] = 0.0
  eigvals, eigvecs = np.linalg.eigh(gram)
  order = np.argsort(-eigvals, kind="stable")
  comps = eigvecs[:, order]
  # Fix each direction's sign so the basis is deterministic across BLAS builds.
  signs = np.sign(comps[np.argmax(np.abs(comps), axis=0), np.arange(d)])
  return (comps * signs).astype(np.float32), mean.astype(np.float32)


def pca_reorder(x, d_out: int, *, center: bool = False,
                key: jax.Array | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The reorder stage that projects onto the top `d_out` principal directions of `x`.

  Args:
    x: embeddings, with shape [n, d_in]; may be a memmap.
    d_out: directions kept.
    center: centred PCA (the bias then subtracts the mean) or uncentred.
    key: PRNG key for `pca_basis`'s row sample.

  Returns:
    (kernel [d_in, d_out], bias [d_out]), so that the stage is `x @ kernel + bias`.
  """
  comps, mean = pca_basis(x, center=center, key=key)
  kernel = comps[:, :d_out]
  return kernel, -mean @ kernel


def init_reorder_from_pca(model: MatryoshkaAdaptor, x, *, center: bool = False,
                          key: jax.Array | None = None) -> None:
  """Sets the reorder stage to project onto the top d_out principal directions of `x`."""
  if model.base is None:
    raise ValueError("init_reorder_from_pca needs an adaptor built with reorder=True")
  kernel, bias = pca_reorder(x, model.config.d_out, center=center, key=key)
  model.base.kernel.set_value(jnp.asarray(kernel))
  model.base.bias.set_value(jnp.asarray(bias))


@functools.partial(jax.jit, static_argnames=("graphdef", "dim", "dtype"))
def _apply_batch(graphdef, state, x, *, dim, dtype):
  model = nnx.merge(graphdef, state)
  return truncate(model(x), dim).astype(dtype)


def warn_untrained_dim(dim: int | None, config) -> None:
  """Warns (UserWarning) when `dim` is not one of the dims the adaptor was trained at.

  Such a prefix is still a unit-norm embedding, so it is not refused; but no
  loss shaped it, and its quality was never measured.
  """
  if dim is not None and config.dims and dim not in config.dims:
    import warnings
    warnings.warn(f"dim={dim} is not one of the adaptor's trained dims {list(config.dims)}: "
                  "no loss shaped that prefix; prefer a trained dim", UserWarning, stacklevel=3)


def apply_adaptor(model: MatryoshkaAdaptor, x, *, dim: int | None = None,
                  dtype=np.float32, batch_size: int = 8192) -> np.ndarray:
  """Adapts, truncates to `dim` and L2-normalises embeddings in fixed-size batches.

  Args:
    model: the adaptor.
    x: embeddings, with shape [n, d_in]; may be a memmap.
    dim: output prefix length (default d_out).
    dtype: float32 or float16 output.
    batch_size: rows per device call; the last batch is padded so that one
      compiled program serves every batch.

  Returns:
    np.ndarray [n, dim] of unit-norm rows.
  """
  cfg = model.config
  if x.ndim != 2 or x.shape[1] != cfg.d_in:
    raise ValueError(f"embeddings must have shape [n, {cfg.d_in}] (the adaptor's d_in), got {x.shape}")
  dim = cfg.d_out if dim is None else check_dim(dim, cfg.d_out)
  dtype = np.dtype(dtype)
  if dtype not in (np.float32, np.float16):
    raise ValueError(f"dtype must be float32 or float16, got {dtype}")
  graphdef, state = nnx.split(model)
  n = x.shape[0]
  batch_size = max(1, min(batch_size, n))
  out = np.empty((n, dim), dtype)
  for start in range(0, n, batch_size):
    part = np.asarray(x[start:start + batch_size], np.float32)
    m = len(part)
    if m < batch_size:
      part = np.pad(part, ((0, batch_size - m), (0, 0)))
    out[start:start + m] = np.asarray(_apply_batch(graphdef, state, part, dim=dim, dtype=dtype))[:m]
  return out
