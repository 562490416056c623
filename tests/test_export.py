"""Export: numpy (adaptor/portable.py) and ONNX agree with Adaptor.apply; file handling."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

import adaptor
from adaptor import cli, export, portable
from adaptor.model import MatryoshkaAdaptor, init_reorder_from_pca
from conftest import REPO

DATA = REPO / "data" / "scifact" / "embeddings" / "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def scifact():
  """All shipped SciFact embeddings, queries then corpus: [6292, 384] float16."""
  corpus = np.load(DATA / "corpus.npy")
  return corpus, np.concatenate([np.load(DATA / "queries.npy"), corpus])


def _scifact_adaptor(corpus, *, hidden: int, reorder: bool = True) -> adaptor.Adaptor:
  """A PCA-initialised adaptor; with hidden > 0, seeded random MLP output weights.

  The unsupervised fit has no MLP (hidden=0) and a fitted MLP's output layer
  starts at zero, so random weights are what exercises the MLP path.
  """
  module = MatryoshkaAdaptor(corpus.shape[1], hidden=hidden, reorder=reorder, rngs=nnx.Rngs(0))
  if reorder:
    init_reorder_from_pca(module, corpus)
  if hidden:
    rng = np.random.default_rng(1)
    module.out_layer.kernel.set_value(rng.normal(scale=0.1, size=(hidden, 384)).astype(np.float32))
    module.out_layer.bias.set_value(rng.normal(scale=0.01, size=(384,)).astype(np.float32))
  return adaptor.Adaptor(module)


SHAPES = [pytest.param(0, True, id="linear"), pytest.param(64, True, id="reorder+mlp"),
          pytest.param(64, False, id="slice+mlp")]


@pytest.mark.slow
@pytest.mark.parametrize("hidden,reorder", SHAPES)
def test_numpy_export_matches_apply_at_every_dim(tmp_path, scifact, hidden, reorder):
  corpus, x = scifact
  a = _scifact_adaptor(corpus, hidden=hidden, reorder=reorder)
  a.export(tmp_path / "a.safetensors")
  p = portable.PortableAdaptor.load(tmp_path / "a.safetensors")
  assert p.dims == a.dims == (16, 32, 64, 128, 256, 384)
  for dim in a.dims:
    diff = np.abs(p.apply(x, dim=dim) - a.apply(x, dim=dim)).max()
    assert diff <= 1e-6, (dim, diff)
  # An export cut to 64 dims serves every prefix up to 64 exactly as well.
  a.export(tmp_path / "a64.safetensors", dim=64)
  p64 = portable.PortableAdaptor.load(tmp_path / "a64.safetensors")
  assert p64.dim == 64 and p64.dims == (16, 32, 64)
  for dim in (16, 33, 64):
    assert np.abs(p64.apply(x, dim=dim) - a.apply(x, dim=dim)).max() <= 1e-6
  one = p64.apply(x[3])
  assert one.shape == (64,) and np.abs(one - a.apply(x[3:4], dim=64)[0]).max() <= 1e-6
  if hidden:
    mlp = np.asarray(a.module.out_layer(jax.nn.gelu(a.module.hidden_layer(np.asarray(x, np.float32)))))
    assert np.abs(mlp).mean() > 0.01  # The MLP path is exercised, not a zero residual.


@pytest.mark.slow
@pytest.mark.parametrize("hidden,reorder", SHAPES)
def test_onnx_export_matches_apply_at_every_dim(tmp_path, scifact, hidden, reorder):
  ort = pytest.importorskip("onnxruntime")
  onnx = pytest.importorskip("onnx")
  corpus, x = scifact
  a = _scifact_adaptor(corpus, hidden=hidden, reorder=reorder)
  for dim in a.dims:
    path = tmp_path / f"a{dim}.onnx"
    meta = a.export(path, format="onnx", dim=dim)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert {p.key: p.value for p in model.metadata_props} == meta
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = a.apply(x, dim=dim)
    for rows in (slice(0, 1), slice(None)):  # The batch size is dynamic.
      got = session.run(["vectors"], {"embeddings": np.asarray(x[rows], np.float32)})[0]
      assert got.shape == ref[rows].shape
      diff = np.abs(got - ref[rows]).max()
      assert diff <= 1e-5, (dim, diff)


def _tiny(kernel, bias, *, hidden=0, d_out=2) -> adaptor.Adaptor:
  module = MatryoshkaAdaptor(2, d_out=d_out, hidden=hidden, rngs=nnx.Rngs(0))
  module.base.kernel.set_value(np.asarray(kernel, np.float32))
  module.base.bias.set_value(np.asarray(bias, np.float32))
  if hidden:  # Known non-zero MLP output weights (a fresh MLP's start at zero).
    module.out_layer.kernel.set_value(np.linspace(-1, 1, hidden * d_out, dtype=np.float32)
                                      .reshape(hidden, d_out))
  return adaptor.Adaptor(module)


def test_hand_computed_values_and_zero_vectors(tmp_path):
  # [3, 4] @ I + [0, 0] = [3, 4] -> [0.6, 0.8]; [0, 1] + [0, -1] = 0 stays zero.
  a = _tiny(np.eye(2), [0.0, 0.0])
  a.export(tmp_path / "a.safetensors")
  p = portable.PortableAdaptor.load(tmp_path / "a.safetensors")
  np.testing.assert_allclose(p.apply(np.array([[3.0, 4.0]])), [[0.6, 0.8]], rtol=1e-7)
  z = _tiny(np.eye(2), [0.0, -1.0])
  x = np.array([[0.0, 1.0], [3.0, 5.0]], np.float32)
  want = np.array([[0.0, 0.0], [0.6, 0.8]], np.float32)
  np.testing.assert_allclose(z.apply(x), want, rtol=1e-7)
  z.export(tmp_path / "z.safetensors")
  np.testing.assert_allclose(portable.PortableAdaptor.load(tmp_path / "z.safetensors").apply(x),
                             want, rtol=1e-7)
  ort = pytest.importorskip("onnxruntime")
  z.export(tmp_path / "z.onnx", format="onnx")
  got = ort.InferenceSession(str(tmp_path / "z.onnx")).run(None, {"embeddings": x})[0]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_gelu_is_the_tanh_approximation_of_jax():
  h = np.linspace(-6, 6, 2001, dtype=np.float32)
  np.testing.assert_allclose(portable.gelu_tanh(h), np.asarray(jax.nn.gelu(h)), atol=1e-6)
  # gelu_tanh(1) = 0.5 (1 + tanh(sqrt(2 / pi) * 1.044715)) = 0.8411920, not erf's 0.8413447.
  assert abs(portable.gelu_tanh(np.float32(1.0)) - 0.8411920) < 1e-6
  assert abs(np.asarray(jax.nn.gelu(1.0, approximate=False)) - 0.8413447) < 1e-6


def test_safetensors_round_trips_with_the_reference_package(tmp_path):
  st = pytest.importorskip("safetensors.numpy")
  from safetensors import safe_open
  a = _scifact_adaptor(np.load(DATA / "corpus.npy")[:500], hidden=8)
  meta = a.export(tmp_path / "ours.safetensors", dim=32)
  tensors, _ = export.export_arrays(a, 32)
  theirs = st.load_file(tmp_path / "ours.safetensors")
  assert theirs.keys() == tensors.keys()
  for k in tensors:
    np.testing.assert_array_equal(theirs[k], tensors[k])
  with safe_open(tmp_path / "ours.safetensors", framework="np") as f:
    assert f.metadata() == meta
  st.save_file(tensors, tmp_path / "theirs.safetensors", metadata=meta)
  got, got_meta = portable.read_safetensors(tmp_path / "theirs.safetensors")
  assert got_meta == meta and got.keys() == tensors.keys()
  for k in tensors:
    np.testing.assert_array_equal(got[k], tensors[k])


def test_bad_files_are_refused_with_the_path(tmp_path):
  a = _tiny(np.eye(2), [0.0, 0.0])
  a.export(tmp_path / "a.safetensors")
  raw = (tmp_path / "a.safetensors").read_bytes()
  (tmp_path / "short.safetensors").write_bytes(raw[:-4])
  with pytest.raises(portable.FormatError, match="short.safetensors.*inside the"):
    portable.PortableAdaptor.load(tmp_path / "short.safetensors")
  (tmp_path / "junk.safetensors").write_bytes(b"\x05" + b"\x00" * 7 + b"nope!")
  with pytest.raises(portable.FormatError, match="junk.safetensors: expected a JSON header"):
    portable.PortableAdaptor.load(tmp_path / "junk.safetensors")
  tensors, meta = portable.read_safetensors(tmp_path / "a.safetensors")
  with pytest.raises(portable.FormatError, match="format_version 1, got '2'"):
    portable.PortableAdaptor(tensors, {**meta, "format_version": "2"})
  with pytest.raises(portable.FormatError, match="expected tensors"):
    portable.PortableAdaptor({"base.kernel": tensors["base.kernel"]}, meta)
  p = portable.PortableAdaptor(tensors, meta)
  with pytest.raises(ValueError, match=r"shape \[n, 2\].*got \(4, 3\)"):
    p.apply(np.ones((4, 3), np.float32))
  with pytest.raises(ValueError, match=r"dim must be an int in \[1, 2\].*got 3"):
    p.apply(np.ones((4, 2), np.float32), dim=3)
  with pytest.raises(adaptor.InputError, match="format must be one of"):
    a.export(tmp_path / "a.bin", format="pickle")


def test_export_refuses_to_replace_and_follows_the_umask(tmp_path):
  a = _tiny(np.eye(2), [0.0, 0.0])
  path = tmp_path / "a.safetensors"
  old = os.umask(0o027)
  try:
    a.export(path)
  finally:
    os.umask(old)
  assert (path.stat().st_mode & 0o777) == 0o640
  before = path.read_bytes()
  with pytest.raises(adaptor.InputError, match="exists; pass overwrite=True"):
    _tiny(2 * np.eye(2), [0.0, 0.0]).export(path)
  assert path.read_bytes() == before
  _tiny(2 * np.eye(2), [0.0, 0.0]).export(path, overwrite=True)
  assert path.read_bytes() != before
  assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]  # No temporary files left.


def test_portable_runs_where_jax_cannot_be_imported(tmp_path):
  """A fresh interpreter whose `jax`, `flax` and `orbax` fail to import runs portable.py."""
  blocked = tmp_path / "blocked"
  for name in ("jax", "flax", "orbax", "adaptor"):
    (blocked / name).mkdir(parents=True)
    (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked')\n")
  service = tmp_path / "service"
  service.mkdir()
  shutil.copy(REPO / "adaptor" / "portable.py", service / "portable.py")  # As a service would.
  a = _tiny([[1.0, 2.0], [0.5, -1.0]], [0.1, 0.0], hidden=3)
  a.export(service / "a.safetensors")
  x = np.array([[0.3, -0.7], [1.0, 2.0]], np.float32)
  np.save(service / "x.npy", x)
  code = textwrap.dedent("""
      import sys
      import numpy as np
      import portable
      try:
        import jax
      except ImportError as e:
        print("blocked:", e)
      else:
        raise SystemExit("jax imported")
      out = portable.PortableAdaptor.load("a.safetensors").apply(np.load("x.npy"))
      np.save("out.npy", out)
      bad = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "flax", "orbax", "adaptor"))
      print("loaded:", bad)
  """)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["PYTHONPATH"] = os.pathsep.join([str(blocked), str(service)])
  proc = subprocess.run([sys.executable, "-c", code], cwd=service, env=env, capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert "blocked: jax is blocked" in proc.stdout and "loaded: []" in proc.stdout
  np.testing.assert_allclose(np.load(service / "out.npy"), a.apply(x), atol=1e-6)


def test_cli_export_writes_both_formats_and_refuses_to_replace(tmp_path, capsys):
  _tiny(np.eye(2), [0.0, 0.0], hidden=3).save(tmp_path / "ck")
  out = tmp_path / "a.safetensors"
  assert cli.main(["export", "--checkpoint", str(tmp_path / "ck"), "--format", "safetensors",
                   "--out", str(out), "--dim", "1"]) == 0
  assert "d_in=2 -> dim=1" in capsys.readouterr().out
  p = portable.PortableAdaptor.load(out)
  assert p.dim == 1 and json.loads(p.meta["dims"]) == [] and p.meta["hidden"] == "3"
  assert cli.main(["export", "--checkpoint", str(tmp_path / "ck"), "--format", "safetensors",
                   "--out", str(out)]) == 2
  assert "exists; pass --overwrite to replace it" in capsys.readouterr().err
  assert cli.main(["export", "--checkpoint", str(tmp_path / "ck"), "--format", "safetensors",
                   "--out", str(out), "--overwrite"]) == 0
  assert portable.PortableAdaptor.load(out).dim == 2
  pytest.importorskip("onnx")
  assert cli.main(["export", "--checkpoint", str(tmp_path / "ck"), "--format", "onnx",
                   "--out", str(tmp_path / "a.onnx")]) == 0
