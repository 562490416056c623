"""Export a fitted adaptor for serving without JAX: safetensors (numpy) or ONNX.

    model.export("scifact.safetensors")                  # apply with adaptor/portable.py
    model.export("scifact-64.onnx", format="onnx", dim=64)  # apply with onnxruntime

Both formats hold the adaptor's float32 weights, with the output columns cut
to `dim` (default d_out): a prefix of the adapted vector only depends on the
first `dim` output columns of the base and of the MLP's output layer, so an
export for a 64-dim service is smaller and faster and still exact. The
metadata (safetensors `__metadata__`, ONNX `metadata_props`) holds the same
strings: format, format_version, d_in, d_out, dim, hidden, reorder, dims (the
trained dims up to `dim`, JSON), activation ("gelu_tanh": jax.nn.gelu's
default tanh approximation), normalize_inputs ("false": inputs are used as
they are, as in `Adaptor.apply`) and library_version.

The ONNX graph maps "embeddings" [batch, d_in] float32 (any batch) to
"vectors" [batch, dim] float32, L2-normalised exactly as `Adaptor.apply`
does, zero vectors included. It uses opset 18 primitives only (MatMul, Add,
Tanh, ReduceSumSquare, Where, ...), no Gelu op, so any runtime that reads
opset 18 runs it.

Files are written to a temporary file beside the target, fsynced and renamed
into place (readers never see half a file), with the mode a new file gets
under the process umask; an existing file is replaced only with
`overwrite=True`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np

from adaptor._version import __version__
from adaptor import portable
from adaptor.data import InputError
from adaptor.checks import check_dim

FORMATS = ("safetensors", "onnx")
ONNX_OPSET = 18


def export_arrays(model, dim: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """The tensors and metadata an export holds (see adaptor/portable.py for the layout).

  Args:
    model: an `adaptor.Adaptor`.
    dim: output width in [1, d_out] (default d_out); output columns beyond it
      are dropped.

  Returns:
    ({name: float32 array}, {str: str} metadata).
  """
  module, cfg = model.module, model.config
  dim = cfg.d_out if dim is None else check_dim(dim, cfg.d_out)
  value = lambda v: np.asarray(v.get_value() if hasattr(v, "get_value") else v.value, np.float32)
  tensors = {}
  if module.base is not None:
    tensors["base.kernel"] = value(module.base.kernel)[:, :dim]
    tensors["base.bias"] = value(module.base.bias)[:dim]
  if module.hidden_layer is not None:
    tensors["hidden.kernel"] = value(module.hidden_layer.kernel)
    tensors["hidden.bias"] = value(module.hidden_layer.bias)
    tensors["out.kernel"] = value(module.out_layer.kernel)[:, :dim]
    tensors["out.bias"] = value(module.out_layer.bias)[:dim]
  meta = {
      "format": portable.FORMAT, "format_version": str(portable.FORMAT_VERSION),
      "d_in": str(cfg.d_in), "d_out": str(cfg.d_out), "dim": str(dim), "hidden": str(cfg.hidden),
      "reorder": "true" if cfg.reorder else "false",
      "dims": json.dumps([m for m in cfg.dims if m <= dim]),
      "activation": portable.ACTIVATION, "normalize_inputs": "false",
      "library_version": __version__,
  }
  return {k: np.ascontiguousarray(v) for k, v in tensors.items()}, meta


def safetensors_bytes(tensors: dict[str, np.ndarray], meta: dict[str, str]) -> bytes:
  """Serialises float32 arrays and string metadata in the safetensors format.

  The header is padded with spaces to a multiple of 8 bytes, as the
  `safetensors` package does, so the data section stays aligned.
  """
  header, offset, chunks = {"__metadata__": dict(meta)}, 0, []
  for name, a in tensors.items():
    a = np.ascontiguousarray(a, "<f4")
    header[name] = {"dtype": "F32", "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    chunks.append(a.tobytes())
    offset += a.nbytes
  text = json.dumps(header, separators=(",", ":")).encode("utf-8")
  text += b" " * (-len(text) % 8)
  return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def onnx_model(tensors: dict[str, np.ndarray], meta: dict[str, str]):
  """An onnx.ModelProto computing `PortableAdaptor.apply` (see the module docstring)."""
  from onnx import TensorProto, helper, numpy_helper

  d_in, dim = int(meta["d_in"]), int(meta["dim"])
  inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in tensors.items()]
  const = lambda name, v: inits.append(numpy_helper.from_array(np.asarray(v, np.float32), name))
  nodes = []
  node = lambda op, ins, out, **kw: nodes.append(helper.make_node(op, ins, [out], **kw)) or out
  if "base.kernel" in tensors:
    y = node("Add", [node("MatMul", ["embeddings", "base.kernel"], "base_mm"), "base.bias"], "base")
  else:
    for name, v in (("slice_start", [0]), ("slice_end", [dim]), ("slice_axis", [1])):
      inits.append(numpy_helper.from_array(np.asarray(v, np.int64), name))
    y = node("Slice", ["embeddings", "slice_start", "slice_end", "slice_axis"], "base")
  if "hidden.kernel" in tensors:
    # gelu_tanh(h) = h * (0.5 * (1 + tanh(c * (h + 0.044715 * h^3)))), in jax.nn.gelu's order.
    const("gelu_c", math.sqrt(2 / math.pi))
    const("gelu_a", 0.044715)
    const("half", 0.5)
    const("one", 1.0)
    h = node("Add", [node("MatMul", ["embeddings", "hidden.kernel"], "h_mm"), "hidden.bias"], "h")
    h3 = node("Mul", [node("Mul", [h, h], "h2"), h], "h3")
    inner = node("Mul", ["gelu_c", node("Add", [h, node("Mul", ["gelu_a", h3], "ah3")], "h_ah3")],
                 "inner")
    cdf = node("Mul", ["half", node("Add", ["one", node("Tanh", [inner], "t")], "one_t")], "cdf")
    g = node("Mul", [h, cdf], "gelu")
    f = node("Add", [node("MatMul", [g, "out.kernel"], "out_mm"), "out.bias"], "mlp")
    y = node("Add", [y, f], "adapted")
  # Row norms; rows below NORM_EPS become zero vectors, as in adaptor.truncation.l2_normalize.
  inits.append(numpy_helper.from_array(np.asarray([1], np.int64), "norm_axes"))
  const("eps2", portable.NORM_EPS**2)
  const("zero", 0.0)
  if "one" not in {i.name for i in inits}:
    const("one", 1.0)
  sq = node("ReduceSumSquare", [y, "norm_axes"], "sq", keepdims=1)
  nonzero = node("Greater", [sq, "eps2"], "nonzero")
  safe = node("Where", [nonzero, sq, "one"], "safe_sq")
  inv = node("Div", ["one", node("Sqrt", [safe], "norm")], "inv_norm")
  inv = node("Where", [nonzero, inv, "zero"], "inv")
  node("Mul", [y, inv], "vectors")
  graph = helper.make_graph(
      nodes, "matryoshka_adaptor",
      [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", d_in])],
      [helper.make_tensor_value_info("vectors", TensorProto.FLOAT, ["batch", dim])],
      initializer=inits)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                            producer_name="matryoshka-adaptor",
                            producer_version=__version__)
  helper.set_model_props(model, meta)
  return model


def _umask() -> int:
  """The process umask, read without changing it where /proc allows."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0o022)  # Elsewhere: set and restore (not thread-safe, but brief).
  os.umask(mask)
  return mask


def write_file(path, data: bytes, *, overwrite: bool = False) -> None:
  """Atomically writes `data` to `path` with the mode the umask gives a new file.

  A temporary file beside `path` is written, fsynced, given mode
  0o666 & ~umask (mkstemp makes it 0o600) and renamed onto `path`; without
  `overwrite`, it is hard-linked instead, which fails if `path` appeared in
  the meantime, so an existing file is never replaced.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(path):
    raise InputError(f"export path {path}: expected a file path, got a directory")
  if os.path.exists(path) and not overwrite:
    raise InputError(f"export path {path} exists; pass overwrite=True to replace it")
  folder = os.path.dirname(path)
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fchmod(f.fileno(), 0o666 & ~_umask())
      os.fsync(f.fileno())
    if overwrite:
      os.replace(tmp, path)
    else:
      try:
        os.link(tmp, path)
      except FileExistsError:
        raise InputError(f"export path {path} exists; pass overwrite=True to "
                         "replace it") from None
      except OSError:  # No hard links on this filesystem: checked above, rename instead.
        os.replace(tmp, path)
      else:
        os.remove(tmp)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
      os.fsync(dir_fd)
    finally:
      os.close(dir_fd)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def export(model, path, *, format: str = "safetensors", dim: int | None = None,
           overwrite: bool = False) -> dict[str, str]:
  """Writes `model` to `path` as safetensors (for adaptor/portable.py) or ONNX.

  Args:
    model: an `adaptor.Adaptor`.
    path: the output file.
    format: "safetensors" or "onnx".
    dim: output width in [1, d_out] (default d_out).
    overwrite: replace an existing file (otherwise it is refused).

  Returns:
    the metadata written.
  """
  if format not in FORMATS:
    raise InputError(f"format must be one of {list(FORMATS)}, got {format!r}")
  tensors, meta = export_arrays(model, dim)
  if format == "safetensors":
    data = safetensors_bytes(tensors, meta)
  else:
    try:
      import onnx  # noqa: F401
    except ImportError:
      raise InputError("format='onnx' needs the onnx package: pip install "
                       "'matryoshka-adaptor[export]'") from None
    data = onnx_model(tensors, meta).SerializeToString()
  write_file(path, data, overwrite=overwrite)
  return meta
