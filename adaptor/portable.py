"""Apply an exported adaptor with numpy alone: copy this one file into a service.

    model = PortableAdaptor.load("scifact-minilm.safetensors")   # from Adaptor.export
    vectors = model.apply(query_embeddings, dim=64)               # [n, 64] float32, unit norm

It computes exactly what `Adaptor.apply` computes (to float32 rounding:
within 1e-6, tested at every trained dim on the shipped SciFact embeddings):

    y = x @ base.kernel + base.bias     (or x[:, :dim] for an adaptor without reorder)
    y = y + gelu_tanh(x @ hidden.kernel + hidden.bias) @ out.kernel + out.bias   (if hidden > 0)
    vectors = y[:, :dim] / |y[:, :dim]|   (rows whose prefix norm is below 1e-12 stay zero)

where gelu_tanh is jax.nn.gelu's default, the tanh approximation
0.5 h (1 + tanh(sqrt(2 / pi) (h + 0.044715 h^3))), not the erf form. Inputs
are used as they are (float16 is cast to float32), never normalised first,
as in `Adaptor.apply`.

Imports numpy and the standard library only, never jax, flax or orbax (a
test runs it where `import jax` fails). The safetensors file is read by the
small parser below instead of the `safetensors` package: the format is 8
bytes of header length, a JSON header and raw little-endian arrays, so 40
lines keep this file dependency-free and copyable as is; the tests check the
parser and `adaptor.export`'s writer against the `safetensors` package both
ways.

File layout (written by `adaptor.export`): tensors "base.kernel" [d_in, dim]
and "base.bias" [dim] (reorder adaptors), "hidden.kernel" [d_in, hidden],
"hidden.bias" [hidden], "out.kernel" [hidden, dim], "out.bias" [dim] (MLP
adaptors), all float32; string metadata: format, format_version, d_in,
d_out, dim (the exported width), hidden, reorder, dims, activation,
normalize_inputs, library_version.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

FORMAT = "matryoshka-adaptor"
FORMAT_VERSION = 1
ACTIVATION = "gelu_tanh"
# As adaptor.truncation.NORM_EPS: prefixes with a smaller norm become zero vectors.
NORM_EPS = 1e-12
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U8": "u1", "BOOL": "?"}
_MAX_HEADER = 100 * 2**20  # The safetensors package's own limit.


class FormatError(ValueError):
  """A file that is not a valid exported adaptor; the message names the file and the problem."""


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Reads a safetensors file into numpy arrays.

  Args:
    path: the file.

  Returns:
    ({name: array}, metadata as {str: str}); the arrays are read-only views
    of one buffer holding the file's data section.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    raw = f.read()
  if len(raw) < 8:
    raise FormatError(f"{path}: expected a safetensors file (8-byte header length), got "
                      f"{len(raw)} bytes")
  n = int.from_bytes(raw[:8], "little")
  if not 2 <= n <= min(_MAX_HEADER, len(raw) - 8):
    raise FormatError(f"{path}: expected a header length in [2, {len(raw) - 8}], got {n}")
  try:
    header = json.loads(raw[8:8 + n].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise FormatError(f"{path}: expected a JSON header, got an error: {e}") from None
  if not isinstance(header, dict):
    raise FormatError(f"{path}: expected a JSON object header, got {type(header).__name__}")
  meta = header.pop("__metadata__", None) or {}
  data = memoryview(raw)[8 + n:]
  tensors = {}
  for name, spec in header.items():
    try:
      dtype = np.dtype(_DTYPES[spec["dtype"]])
      shape = tuple(int(s) for s in spec["shape"])
      begin, end = (int(v) for v in spec["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise FormatError(f"{path}: tensor {name!r}: expected dtype in {sorted(_DTYPES)}, shape and "
                        f"data_offsets, got {spec!r}") from None
    size = math.prod(shape) * dtype.itemsize
    if not 0 <= begin <= end <= len(data) or end - begin != size:
      raise FormatError(f"{path}: tensor {name!r}: expected {size} bytes inside the "
                        f"{len(data)}-byte data section, got data_offsets [{begin}, {end}]")
    tensors[name] = np.frombuffer(data[begin:end], dtype).reshape(shape)
  return tensors, {str(k): str(v) for k, v in meta.items()}


def gelu_tanh(h: np.ndarray) -> np.ndarray:
  """jax.nn.gelu(h) (approximate=True), in the same order of float32 operations.

  Args:
    h: pre-activations, with shape [..., hidden], float32.
  """
  c = np.float32(math.sqrt(2 / math.pi))
  cdf = np.float32(0.5) * (np.float32(1.0) + np.tanh(c * (h + np.float32(0.044715) * (h * h * h))))
  return h * cdf


def l2_normalize_prefix(y: np.ndarray, dim: int) -> np.ndarray:
  """The first `dim` columns of `y` [n, d], each row scaled to unit norm; near-zero rows stay zero."""
  y = y[:, :dim]
  sq = np.einsum("ij,ij->i", y, y)[:, None]
  nonzero = sq > np.float32(NORM_EPS**2)
  inv = np.where(nonzero, np.float32(1.0) / np.sqrt(np.where(nonzero, sq, np.float32(1.0))),
                 np.float32(0.0))
  return y * inv


class PortableAdaptor:
  """An exported Matryoshka-Adaptor, applied with numpy.

  Attributes:
    d_in: the frozen model's embedding size.
    dim: the exported output width (the largest `dim` apply accepts).
    dims: the trained prefix lengths up to `dim`.
    meta: the file's metadata ({str: str}).
  """

  def __init__(self, tensors: dict[str, np.ndarray], meta: dict[str, str], *, where: str = "tensors"):
    if meta.get("format") != FORMAT:
      raise FormatError(f"{where}: expected metadata format={FORMAT!r}, got {meta.get('format')!r}")
    if meta.get("format_version") != str(FORMAT_VERSION):
      raise FormatError(f"{where}: expected format_version {FORMAT_VERSION}, got "
                        f"{meta.get('format_version')!r} (export it again with this version)")
    if meta.get("activation") != ACTIVATION or meta.get("normalize_inputs") != "false":
      raise FormatError(f"{where}: expected activation={ACTIVATION!r} and normalize_inputs='false', "
                        f"got {meta.get('activation')!r} and {meta.get('normalize_inputs')!r}")
    self.meta = dict(meta)
    self.d_in, self.dim, hidden = (int(meta[k]) for k in ("d_in", "dim", "hidden"))
    self.dims = tuple(json.loads(meta["dims"]))
    self.reorder = meta["reorder"] == "true"
    want = {}
    if self.reorder:
      want.update({"base.kernel": (self.d_in, self.dim), "base.bias": (self.dim,)})
    if hidden:
      want.update({"hidden.kernel": (self.d_in, hidden), "hidden.bias": (hidden,),
                   "out.kernel": (hidden, self.dim), "out.bias": (self.dim,)})
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if found != want:
      raise FormatError(f"{where}: expected tensors {want}, got {found}")
    # Contiguous float32 copies: matmuls on them are the fastest numpy has.
    get = lambda k: np.ascontiguousarray(tensors[k], np.float32) if k in tensors else None
    self.base_kernel, self.base_bias = get("base.kernel"), get("base.bias")
    self.hidden_kernel, self.hidden_bias = get("hidden.kernel"), get("hidden.bias")
    self.out_kernel, self.out_bias = get("out.kernel"), get("out.bias")

  @classmethod
  def load(cls, path) -> "PortableAdaptor":
    """Loads a file written by `Adaptor.export(path, format="safetensors")`."""
    tensors, meta = read_safetensors(path)
    return cls(tensors, meta, where=os.fspath(path))

  def __repr__(self):
    return (f"PortableAdaptor(d_in={self.d_in}, dim={self.dim}, hidden={self.meta['hidden']}, "
            f"reorder={self.reorder}, dims={list(self.dims)})")

  def adapt(self, x: np.ndarray) -> np.ndarray:
    """The adapted vectors before normalisation: [n, d_in] -> [n, dim] float32."""
    if self.base_kernel is not None:
      y = x @ self.base_kernel + self.base_bias
    else:
      y = x[:, :self.dim].copy()
    if self.hidden_kernel is not None:
      y += gelu_tanh(x @ self.hidden_kernel + self.hidden_bias) @ self.out_kernel + self.out_bias
    return y

  def apply(self, embeddings, *, dim: int | None = None) -> np.ndarray:
    """Adapts embeddings and returns their first `dim` coordinates, L2-normalised.

    Args:
      embeddings: frozen-model embeddings, with shape [n, d_in] (or [d_in] for
        one vector, returned as [dim]); float16 is cast to float32. Rows are
        not checked for NaN/Inf (Adaptor.apply refuses them).
      dim: output size in [1, self.dim] (default self.dim).

    Returns:
      np.ndarray float32 [n, dim] of unit-norm rows.
    """
    x = np.asarray(embeddings)
    one = x.ndim == 1
    x = x[None] if one else x
    if x.ndim != 2 or x.shape[1] != self.d_in:
      raise ValueError(f"embeddings must have shape [n, {self.d_in}] (the adaptor's d_in), got "
                       f"{np.shape(embeddings)}")
    if x.dtype != np.float32:
      x = x.astype(np.float32)
    if dim is None:
      dim = self.dim
    elif isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= self.dim:
      raise ValueError(f"dim must be an int in [1, {self.dim}] (the exported width), got {dim!r}")
    out = l2_normalize_prefix(self.adapt(x), int(dim))
    return out[0] if one else out

  __call__ = apply
