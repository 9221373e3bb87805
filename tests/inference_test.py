"""Tests for bsf_jax.infer.inference against monai.inferers.sliding_window_inference.

The predictor is a small random 3x3x3 conv + tanh + 1x1x1 conv, written once in
JAX (NDHWC) and once in torch (NCDHW) with the same weights. The 3x3x3 conv
zero-pads at the window border, so its output depends on where each window
sits: a wrong window grid or a wrong blend shows up as a mismatch.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from bsf_jax.infer import sliding_window

torch = pytest.importorskip("torch")
monai = pytest.importorskip("monai")
from monai.data.utils import compute_importance_map, dense_patch_slices  # noqa: E402
from monai.inferers import sliding_window_inference as monai_swi  # noqa: E402
from monai.inferers.utils import _get_scan_interval  # noqa: E402

C_IN, C_HID, K = 2, 4, 3


def _weights(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "w1": rng.normal(size=(3, 3, 3, C_IN, C_HID)).astype(np.float32) * 0.3,
      "b1": rng.normal(size=(C_HID,)).astype(np.float32) * 0.1,
      "w2": rng.normal(size=(C_HID, K)).astype(np.float32) * 0.5,
      "b2": rng.normal(size=(K,)).astype(np.float32) * 0.1,
  }


def jax_predictor(p, win):
  h = jax.lax.conv_general_dilated(
      win, p["w1"], (1, 1, 1), "SAME",
      dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
      precision=jax.lax.Precision.HIGHEST)
  h = jnp.tanh(h + p["b1"])
  return jnp.einsum("...c,ck->...k", h, p["w2"],
                    precision=jax.lax.Precision.HIGHEST) + p["b2"]


def torch_predictor(p):
  w1 = torch.from_numpy(p["w1"]).permute(4, 3, 0, 1, 2).contiguous()
  b1 = torch.from_numpy(p["b1"])
  w2 = torch.from_numpy(p["w2"]).T[..., None, None, None].contiguous()
  b2 = torch.from_numpy(p["b2"])

  def fn(win):
    h = torch.tanh(torch.nn.functional.conv3d(win, w1, b1, padding=1))
    return torch.nn.functional.conv3d(h, w2, b2)
  return fn


def _monai(x, roi, overlap, mode, sw, p, **kw):
  xt = torch.from_numpy(np.moveaxis(x, -1, 1).copy())
  with torch.no_grad():
    y = monai_swi(xt, roi, sw, torch_predictor(p), overlap=overlap, mode=mode,
                  **kw)
  return np.moveaxis(y.numpy(), 1, -1)


@pytest.mark.parametrize("image,roi,overlap", [
    ((20, 17, 13), (8, 8, 8), 0.5),
    ((20, 17, 13), (8, 6, 5), (0.25, 0.6, 0.0)),
    ((9, 9, 9), (9, 4, 3), 0.9),
    ((5, 12, 3), (8, 8, 8), 0.5),
])
def test_window_grid_matches_monai(image, roi, overlap):
  padded = tuple(max(i, r) for i, r in zip(image, roi))
  ov = overlap if isinstance(overlap, tuple) else (overlap,) * 3
  interval = _get_scan_interval(padded, roi, 3, ov)
  assert sliding_window.scan_interval(padded, roi, ov) == interval
  expected = [tuple(s.start for s in sl)
              for sl in dense_patch_slices(padded, roi, interval)]
  got = [tuple(int(v) for v in row)
         for row in sliding_window.window_starts(padded, roi, ov)]
  assert got == expected


def test_window_grid_by_hand():
  # 10 voxels, roi 4, overlap 0.5 -> stride 2: starts 0, 2, 4, 6; the last
  # window ends exactly at 10. 7 voxels, roi 7: one window at 0.
  got = sliding_window.window_starts((10, 7, 5), (4, 7, 4), 0.5)
  # dim 3: 5 voxels, roi 4, stride 2 -> starts 0, then min(2, 1) = 1.
  expected = [(a, 0, c) for a in (0, 2, 4, 6) for c in (0, 1)]
  assert [tuple(r) for r in got.tolist()] == expected


@pytest.mark.parametrize("roi,sigma", [((8, 6, 5), 0.125), ((7, 7, 7), 0.3),
                                       ((6, 6, 6), (0.1, 0.2, 0.4))])
def test_gaussian_importance_map_matches_monai(roi, sigma):
  ref = compute_importance_map(roi, mode="gaussian", sigma_scale=sigma).numpy()
  factors = sliding_window.importance_map_1d(roi, "gaussian", sigma)
  got = np.asarray(sliding_window._importance_map(factors, jnp.float32))
  np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
  # Clamping: the smallest weight is the corner product, at least 1e-3.
  assert got.min() >= 1e-3


CASES = [
    # batch, image, roi, overlap, mode, sw_batch_size
    (1, (20, 17, 13), (8, 8, 8), 0.5, "constant", 4),
    (2, (20, 17, 13), (8, 8, 8), 0.5, "gaussian", 3),
    (1, (18, 11, 9), (8, 6, 5), 0.25, "gaussian", 5),
    (1, (18, 11, 9), (8, 6, 5), 0.75, "constant", 1),
    (2, (5, 12, 3), (8, 8, 8), 0.5, "gaussian", 2),  # smaller than the roi
    (1, (12, 10, 6), (12, 10, 6), 0.5, "gaussian", 2),  # roi == image
]


@pytest.mark.parametrize("batch,image,roi,overlap,mode,sw", CASES)
def test_matches_monai(batch, image, roi, overlap, mode, sw):
  p = _weights()
  rng = np.random.default_rng(1)
  x = rng.normal(size=(batch, *image, C_IN)).astype(np.float32)
  ref = _monai(x, roi, overlap, mode, sw, p)
  got = sliding_window.sliding_window_inference(
      jnp.asarray(x), roi, jax_predictor, overlap=overlap, mode=mode,
      sw_batch_size=sw, predictor_args=(p,))
  assert got.shape == ref.shape == (batch, *image, K)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate"])
def test_padding_modes_match_monai(padding_mode):
  p = _weights(2)
  x = np.random.default_rng(3).normal(size=(1, 6, 10, 5, C_IN)).astype(
      np.float32)
  ref = _monai(x, (8, 8, 8), 0.5, "gaussian", 2, p, padding_mode=padding_mode)
  got = sliding_window.sliding_window_inference(
      jnp.asarray(x), (8, 8, 8), jax_predictor, overlap=0.5, mode="gaussian",
      sw_batch_size=2, padding_mode=padding_mode, predictor_args=(p,))
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


def test_constant_cval_and_identity_predictor():
  # With an identity predictor every blend returns the input exactly, whatever
  # the weights: a direct check of accumulation / division and of the crop.
  x = np.random.default_rng(4).normal(size=(2, 7, 9, 4, 3)).astype(np.float32)
  got = sliding_window.sliding_window_inference(
      jnp.asarray(x), (8, 4, 8), lambda w: w, overlap=0.6, mode="gaussian",
      sw_batch_size=3, cval=5.0)
  np.testing.assert_allclose(np.asarray(got), x, rtol=1e-6, atol=1e-6)


def test_sharded_windows_match_unsharded():
  devices = np.array(jax.devices())
  if devices.size < 2:
    pytest.skip("needs several devices (conftest fakes 8 CPU devices)")
  mesh = jax.sharding.Mesh(devices, ("data",))
  p = _weights()
  x = jnp.asarray(np.random.default_rng(5).normal(
      size=(1, 20, 17, 13, C_IN)).astype(np.float32))
  kw = dict(overlap=0.5, mode="gaussian", sw_batch_size=devices.size,
            predictor_args=(p,))
  ref = sliding_window.sliding_window_inference(x, (8, 8, 8), jax_predictor, **kw)
  got = sliding_window.sliding_window_inference(x, (8, 8, 8), jax_predictor,
                                           mesh=mesh, **kw)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5,
                             atol=1e-6)


def test_compiles_once_per_shape():
  traces = []

  def predictor(scale, win):
    traces.append(win.shape)
    return win[..., :1] * scale

  x = jnp.ones((1, 10, 10, 10, 2))
  assert len(sliding_window.window_starts((10, 10, 10), (6, 6, 6), 0.5)) == 27
  for scale in (1.0, 2.0):  # new traced args, same static config: no retrace
    out = sliding_window.sliding_window_inference(
        x, 6, predictor, sw_batch_size=4, predictor_args=(jnp.float32(scale),))
    np.testing.assert_allclose(np.asarray(out), scale)
  # Traced once each: the output-shape probe, the scan body (6 batches of 4)
  # and the 3-window remainder, which is not padded up to 4 windows.
  assert traces == [(4, 6, 6, 6, 2), (4, 6, 6, 6, 2), (3, 6, 6, 6, 2)]


def test_fewer_windows_than_the_batch_predicts_only_real_windows():
  """One window with sw_batch_size 4: the predictor runs on 1 window, not 4."""
  seen = []

  def predictor(win):
    seen.append(win.shape[0])
    return win[..., :1] * 3.0

  out = sliding_window.sliding_window_inference(jnp.ones((1, 6, 6, 6, 1)), 6, predictor,
                                           sw_batch_size=4)
  np.testing.assert_allclose(np.asarray(out), 3.0)
  assert seen == [1, 1]  # the shape probe and the one real batch


def test_bad_arguments_raise_clearly():
  x = jnp.zeros((1, 8, 8, 8, 1))
  with pytest.raises(ValueError, match="overlap"):
    sliding_window.sliding_window_inference(x, 4, lambda w: w, overlap=1.0)
  with pytest.raises(ValueError, match="roi_size"):
    sliding_window.sliding_window_inference(x, (4, 4), lambda w: w)
  with pytest.raises(ValueError, match="mode"):
    sliding_window.sliding_window_inference(x, 4, lambda w: w, mode="linear")
  with pytest.raises(ValueError, match="padding_mode"):
    sliding_window.sliding_window_inference(x, 4, lambda w: w, padding_mode="edge")
  with pytest.raises(ValueError, match="channels-last"):
    sliding_window.sliding_window_inference(jnp.zeros((8, 8)), 4, lambda w: w)
  with pytest.raises(ValueError, match=r"\[n, \*roi, K\]"):
    sliding_window.sliding_window_inference(x, 4, lambda w: w[:, ::2])
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  if mesh.shape["data"] > 1:
    with pytest.raises(ValueError, match="multiple of mesh axis"):
      sliding_window.sliding_window_inference(x, 4, lambda w: w, mesh=mesh,
                                         sw_batch_size=mesh.shape["data"] + 1)


def test_flax_model_apply_as_predictor():
  # A pointwise Flax model: blending pointwise predictions is exact, so the
  # result equals the model applied to the whole volume at once.
  import flax.linen as nn
  model = nn.Dense(3)
  x = jnp.asarray(np.random.default_rng(6).normal(size=(1, 11, 9, 7, 2)),
                  jnp.float32)
  variables = model.init(jax.random.key(0), x[:, :1, :1, :1])
  got = sliding_window.sliding_window_inference(
      x, (4, 4, 4), model.apply, overlap=0.5, mode="gaussian",
      predictor_args=(variables,))
  np.testing.assert_allclose(np.asarray(got), np.asarray(model.apply(
      variables, x)), rtol=1e-5, atol=1e-6)


def test_sliding_window_runs_the_model_in_its_compute_dtype():
  """A bf16 model (the stage configs' dtype) is evaluated in bf16 by the sliding window,
  and the blended result is float32 and close to the float32 model's."""
  from bsf_jax import models  # pylint: disable=g-import-not-at-top
  kw = dict(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1),
            num_heads=(1, 1, 1, 1), impl="xla")
  f32, bf16 = models.SwinUNETR(**kw), models.SwinUNETR(dtype=jnp.bfloat16, **kw)
  x = jax.random.normal(jax.random.key(0), (1, 32, 32, 48, 1))
  params = jax.jit(f32.init)(jax.random.key(1), x[:, :, :, :32])["params"]
  run = lambda model: jax.jit(lambda p: sliding_window.sliding_window_inference(
      x, (32, 32, 32), model.apply, overlap=0.5, sw_batch_size=2,
      predictor_args=({"params": p},))).lower(params)
  lowered16 = run(bf16)
  hlo = lowered16.as_text()
  assert "bf16" in hlo and "convolution" in hlo
  out16, out32 = lowered16.compile()(params), run(f32).compile()(params)
  assert out16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
  print(f"\n[sliding window bf16 vs fp32] relative L2 {rel:.2e}")
  # bf16 keeps 8 significant bits; a depth-(1,1,1,1) SwinUNETR stays within a few percent.
  assert rel < 0.05
