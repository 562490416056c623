"""The adaptor module: identity at start, PCA reorder, batched apply."""

import numpy as np
import pytest
from flax import nnx

from adaptor.model import (AdaptorConfig, MatryoshkaAdaptor, apply_adaptor, check_dims,
                           default_dims, init_reorder_from_pca, pca_basis)

X = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)


@pytest.mark.parametrize("reorder", [False, True])
def test_untrained_adaptor_is_identity(reorder):
  model = MatryoshkaAdaptor(6, hidden=5, reorder=reorder, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(model(X)), X, atol=1e-6)


def test_compression_without_reorder_keeps_first_coordinates():
  model = MatryoshkaAdaptor(6, d_out=4, hidden=3, reorder=False, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(model(X)), X[:, :4], atol=1e-6)


def test_known_weights_give_hand_computed_output():
  model = MatryoshkaAdaptor(2, hidden=1, reorder=False, rngs=nnx.Rngs(0))
  model.hidden_layer.kernel.set_value(np.array([[1.0], [0.0]], np.float32))
  model.hidden_layer.bias.set_value(np.zeros(1, np.float32))
  model.out_layer.kernel.set_value(np.array([[0.0, 2.0]], np.float32))
  x = np.array([[3.0, 1.0]], np.float32)
  gelu3 = 3.0 * 0.5 * (1.0 + np.tanh(np.sqrt(2 / np.pi) * (3.0 + 0.044715 * 27.0)))
  np.testing.assert_allclose(np.asarray(model(x)), [[3.0, 1.0 + 2.0 * gelu3]], rtol=1e-5)


@pytest.mark.parametrize("center", [False, True])
def test_pca_reorder_equals_numpy_pca(center):
  model = MatryoshkaAdaptor(6, d_out=3, hidden=0, rngs=nnx.Rngs(0))
  init_reorder_from_pca(model, X, center=center)
  mu = X.mean(0) if center else 0.0
  _, s, vt = np.linalg.svd(X - mu, full_matrices=False)
  ref = (X - mu) @ vt[:3].T
  out = np.asarray(model(X))
  # Directions are defined up to sign.
  np.testing.assert_allclose(np.abs(out), np.abs(ref), atol=1e-4)
  assert np.all(np.diff(np.var(out, axis=0) if center else np.sum(out**2, 0)) <= 1e-4)


def test_pca_basis_is_orthonormal_and_deterministic(tmp_path):
  import os
  import subprocess
  import sys
  c1, _ = pca_basis(X)
  np.testing.assert_allclose(c1.T @ c1, np.eye(6), atol=1e-5)
  # Independent reference: numpy's SVD, each direction's sign fixed so that its
  # largest-magnitude entry is positive (the convention pca_basis documents).
  _, _, vt = np.linalg.svd(X.astype(np.float64), full_matrices=False)
  ref = vt.T * np.sign(vt.T[np.argmax(np.abs(vt.T), axis=0), np.arange(6)])
  np.testing.assert_allclose(c1, ref, atol=1e-5)
  # Deterministic across processes and BLAS thread counts: a fresh interpreter,
  # one BLAS thread, gives the same bits.
  np.save(tmp_path / "x.npy", X)
  code = ("import sys, numpy as np; from adaptor.model import pca_basis; "
          "np.save(sys.argv[2], pca_basis(np.load(sys.argv[1]))[0])")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
  subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.npy"), str(tmp_path / "c.npy")],
                 env=env, check=True, timeout=120)
  np.testing.assert_array_equal(c1, np.load(tmp_path / "c.npy"))


def test_apply_is_batch_invariant_unit_norm_and_float16():
  model = MatryoshkaAdaptor(6, hidden=5, rngs=nnx.Rngs(1))
  model.out_layer.kernel.set_value(np.random.default_rng(2).normal(size=(5, 6)).astype(np.float32))
  a = apply_adaptor(model, X, dim=4, batch_size=7)   # 40 = 5 * 7 + 5: padded last batch
  b = apply_adaptor(model, X, dim=4, batch_size=64)
  np.testing.assert_allclose(a, b, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
  ref = np.asarray(model(X))[:, :4]
  np.testing.assert_allclose(a, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)
  h = apply_adaptor(model, X, dim=4, dtype=np.float16)
  assert h.dtype == np.float16
  np.testing.assert_allclose(h, a, atol=2e-3)


def test_apply_errors():
  model = MatryoshkaAdaptor(6, hidden=0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"shape \[n, 6\].*got \(40, 5\)"):
    apply_adaptor(model, X[:, :5])
  with pytest.raises(ValueError, match=r"dim must be in \[1, 6\]"):
    apply_adaptor(model, X, dim=7)
  with pytest.raises(ValueError, match="float32 or float16"):
    apply_adaptor(model, X, dtype=np.int8)


def test_dims_validation_and_defaults():
  assert default_dims(384) == (16, 32, 64, 128, 256, 384)
  assert default_dims(16) == (16,)
  assert check_dims([8, 16], 16) == (8, 16)
  for bad, msg in [([16, 8], "strictly increasing"), ([8, 8], "strictly increasing"),
                   ([0, 8], r"in \[1, 16\]"), ([8, 32], r"in \[1, 16\]"), ([], "at least one")]:
    with pytest.raises(ValueError, match=msg):
      check_dims(bad, 16)
  with pytest.raises(ValueError, match="d_out must be <= d_in"):
    AdaptorConfig(d_in=4, d_out=8)
