"""The fitted adaptor users hold: apply, save, load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import nnx

from adaptor._version import __version__
from adaptor import checkpoint
from adaptor.checkpoint import CheckpointError
from adaptor.data import check_embeddings
from adaptor.model import AdaptorConfig, MatryoshkaAdaptor, apply_adaptor, warn_untrained_dim
from adaptor.checks import check_dim


class Adaptor:
  """A fitted Matryoshka-Adaptor with the config and training record that explain it.

  Attributes:
    module: the flax NNX `MatryoshkaAdaptor`.
    config: its `AdaptorConfig` (d_in, d_out, hidden, reorder, dims).
    train_config: the `TrainConfig` it was fitted with (a dict after `load`).
    info: training record: data fingerprints, validation history, timings.
  """

  def __init__(self, module: MatryoshkaAdaptor, *, train_config=None, info=None):
    self.module = module
    self.train_config = train_config
    self.info = dict(info or {})

  @property
  def config(self) -> AdaptorConfig:
    return self.module.config

  @property
  def d_in(self) -> int:
    return self.config.d_in

  @property
  def d_out(self) -> int:
    return self.config.d_out

  @property
  def dims(self) -> tuple[int, ...]:
    return self.config.dims

  def __repr__(self):
    c = self.config
    return (f"Adaptor(d_in={c.d_in}, d_out={c.d_out}, hidden={c.hidden}, "
            f"reorder={c.reorder}, dims={list(c.dims)})")

  def apply(self, embeddings, *, dim: int | None = None, dtype=np.float32,
            batch_size: int = 8192) -> np.ndarray:
    """Adapts embeddings and returns their first `dim` coordinates, L2-normalised.

    Args:
      embeddings: frozen-model embeddings (queries or documents alike), with
        shape [n, d_in] (may be a memmap), or one vector [d_in]; also a
        path or a `datasets.Dataset`, read as `load_embeddings` reads them.
      dim: output size (default d_out); a dim the adaptor was not trained at
        is allowed, with a UserWarning.
      dtype: float32 or float16.
      batch_size: rows per device call.

    Returns:
      np.ndarray [n, dim] of unit-norm rows ([dim] for one vector).
    """
    if getattr(embeddings, "ndim", None) == 1 or (
        isinstance(embeddings, (list, tuple)) and np.ndim(embeddings) == 1):
      one = np.asarray(embeddings)[None, :]
      return self.apply(one, dim=dim, dtype=dtype, batch_size=batch_size)[0]
    x = check_embeddings(embeddings, name="embeddings", dim=self.d_in)
    if dim is not None:
      dim = check_dim(dim, self.d_out)  # A bad dim is refused, not warned about.
      warn_untrained_dim(dim, self.config)
    return apply_adaptor(self.module, x, dim=dim, dtype=dtype, batch_size=batch_size)

  __call__ = apply

  def export(self, path, *, format: str = "safetensors", dim: int | None = None,
             overwrite: bool = False) -> dict[str, str]:
    """Writes the adaptor for serving without JAX (see adaptor/export.py).

    Args:
      path: the output file, written atomically.
      format: "safetensors" (apply it with numpy: `adaptor.portable.PortableAdaptor`)
        or "onnx" (input "embeddings" [batch, d_in] float32, output "vectors"
        [batch, dim] float32; needs the `export` extra).
      dim: output width in [1, d_out] (default d_out); the file applies at
        any dim up to it (ONNX: exactly this dim).
      overwrite: replace an existing file (otherwise it is refused).

    Returns:
      the metadata written (d_in, d_out, dim, dims, activation, ...).
    """
    from adaptor import export
    return export.export(self, path, format=format, dim=dim, overwrite=overwrite)

  def save(self, directory, *, overwrite: bool = False) -> None:
    """Atomically writes the adaptor to `directory` (orbax params + config.json).

    An existing checkpoint there is replaced only with `overwrite=True`.
    """
    tc = self.train_config
    tc = tc.to_dict() if hasattr(tc, "to_dict") else tc
    config = {"adaptor": self.config.to_dict(), "train_config": tc, "info": self.info}
    checkpoint.save(directory, nnx.state(self.module, nnx.Param), config, overwrite=overwrite)


def read_adaptor_config(config: dict, where) -> tuple[AdaptorConfig | None, list[str]]:
  """The adaptor config in a checkpoint's config.json, and what is wrong with it.

  Args:
    config: the parsed config.json.
    where: its path, named in the problems.

  Returns:
    (config or None, problems): the library version must match ours in
    major.minor, and the 'adaptor' section must be a valid `AdaptorConfig`.
  """
  problems, cfg = [], None
  found = config.get("library_version")
  if str(found).split(".")[:2] != __version__.split(".")[:2]:
    problems.append(f"{where}: expected a checkpoint from matryoshka-adaptor {__version__} "
                    f"(same major.minor), found library_version {found!r}")
  try:
    cfg = AdaptorConfig.from_dict(config["adaptor"])
  except (KeyError, TypeError, ValueError) as e:
    problems.append(f"{where}: expected a valid 'adaptor' section, found error: "
                    f"{type(e).__name__}: {e}")
  return cfg, problems


def abstract_module(cfg: AdaptorConfig) -> MatryoshkaAdaptor:
  """The adaptor module `cfg` describes, with shapes and no values (what a checkpoint restores into)."""
  return nnx.eval_shape(lambda: MatryoshkaAdaptor(
      cfg.d_in, d_out=cfg.d_out, hidden=cfg.hidden, reorder=cfg.reorder, rngs=nnx.Rngs(0)))


def load(directory, *, d_in: int | None = None) -> Adaptor:
  """Loads an adaptor saved by `Adaptor.save`, validating its config and arrays.

  Args:
    directory: the checkpoint directory.
    d_in: if given, the embedding size the adaptor must accept; a checkpoint
      for another size is refused.
  """
  config = checkpoint.read_config(directory)
  cfg, problems = read_adaptor_config(config, Path(directory) / checkpoint.CONFIG)
  if problems:
    raise CheckpointError(problems[0])
  if d_in is not None and cfg.d_in != d_in:
    raise CheckpointError(
        f"{directory}: adaptor expects embeddings with d_in={cfg.d_in}, but the embeddings have d={d_in}")
  graphdef, target, rest = nnx.split(abstract_module(cfg), nnx.Param, ...)
  state, _ = checkpoint.load(directory, target)
  module = nnx.merge(graphdef, state, rest)
  module.config = cfg
  return Adaptor(module, train_config=config.get("train_config"), info=config.get("info"))
