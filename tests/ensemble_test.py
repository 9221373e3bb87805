"""Ensembles and mirroring (`inference.make_ensemble_predictor`), post-processing.

The models are a tiny Flax net (3x3x3 conv, tanh, 1x1x1 dense): its zero
padding at the window border makes the output depend on where each window
sits, and it is not flip-equivariant, so a wrong flip, grid or average shows.
The volume (20x17x13, roi 8, overlap 0.5) has a window grid that is not its
own mirror image, so mirroring the volume and mirroring each window differ.
The CLI side (checkpoints, contracts, written probabilities) is in
cli_test.py.
"""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bsf_jax.infer import inference, postprocess, sliding_window

IMAGE, ROI, C_IN = (20, 17, 13), (8, 8, 8), 2


class TinySeg(nn.Module):
  features: int = 4
  out: int = 3

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Conv(self.features, (3, 3, 3),
                         precision=jax.lax.Precision.HIGHEST)(x))
    return nn.Dense(self.out, precision=jax.lax.Precision.HIGHEST)(h)


def _config(mode="gaussian", sw=3):
  return ml_collections.ConfigDict(dict(
      data=dict(roi=ROI),
      seg=dict(sw_overlap=0.5, sw_mode=mode, sw_batch_size=sw)))


def _params(model, seed):
  return jax.jit(model.init)(jax.random.key(seed),
                             jnp.zeros((1, *ROI, C_IN)))["params"]


@pytest.fixture(scope="module")
def image():
  return jnp.asarray(np.random.default_rng(0).normal(
      size=(*IMAGE, C_IN)).astype(np.float32))


def _single(model, params, image, config):
  """One model, no flips: the validation path."""
  return np.asarray(inference.make_volume_predictor(model, config)(params, image))


def test_flip_combinations():
  assert inference.flip_combinations("") == [()]
  assert inference.flip_combinations("xyz") == [
      (), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
  assert inference.flip_combinations("zx") == [(), (0,), (2,), (0, 2)]
  for bad in ("xw", "xx"):
    with pytest.raises(ValueError, match="mirror axes"):
      inference.flip_combinations(bad)


def test_one_checkpoint_twice_is_the_single_prediction(image):
  model, config = TinySeg(), _config()
  params = _params(model, 0)
  single = _single(model, params, image, config)
  twice = inference.make_ensemble_predictor([model], config)(
      (inference.stack_members([params, params]),), image)
  assert twice.shape == (*IMAGE, 3)
  # The mean of two equal numbers is that number; only the program around
  # the model differs, so allow float rounding.
  np.testing.assert_allclose(np.asarray(twice), single, rtol=1e-6, atol=1e-6)


def _numpy_mirror_loop(models_params, image, config, flips):
  """The loop teams write by hand: per model and flip, flip the volume, run
  the sliding window, flip back, sigmoid; the mean over all of them."""
  total, n = 0.0, 0
  x = np.asarray(image)
  for model, params in models_params:
    for axes in flips:
      flipped = np.flip(x, axes).copy() if axes else x
      logits = np.asarray(sliding_window.sliding_window_inference(
          jnp.asarray(flipped)[None], config.data.roi, model.apply,
          overlap=config.seg.sw_overlap, mode=config.seg.sw_mode,
          sw_batch_size=config.seg.sw_batch_size,
          predictor_args=({"params": params},))[0])
      if axes:
        logits = np.flip(logits, axes)
      total = total + 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
      n += 1
  return total / n


def test_mirrored_ensemble_equals_an_explicit_loop_over_the_8_flips(image):
  model, config = TinySeg(), _config()
  params = [_params(model, seed) for seed in (1, 2)]
  all_flips = [axes for r in range(4) for axes in itertools.combinations(range(3), r)]
  assert len(all_flips) == 8
  expected = _numpy_mirror_loop([(model, p) for p in params], image, config, all_flips)
  got = inference.make_ensemble_predictor([model], config, mirror="xyz")(
      (inference.stack_members(params),), image)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
  # Mirroring changes the prediction (the check above is not vacuous).
  unmirrored = _numpy_mirror_loop([(model, p) for p in params], image, config, [()])
  assert np.abs(expected - unmirrored).max() > 1e-3


def test_architecture_groups_and_a_named_axis_subset(image):
  """Members of two architectures (another width) are averaged together."""
  small, wide = TinySeg(features=4), TinySeg(features=6)
  config = _config(mode="constant", sw=2)
  p_small, p_wide = [_params(small, 3), _params(small, 4)], [_params(wide, 5)]
  flips = [(), (0,)]
  expected = _numpy_mirror_loop(
      [(small, p) for p in p_small] + [(wide, p) for p in p_wide], image, config, flips)
  got = inference.make_ensemble_predictor([small, wide], config, mirror="x")(
      (inference.stack_members(p_small), inference.stack_members(p_wide)), image)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("models_per_step", [1, 2, None])
def test_members_per_step_compute_the_same(image, models_per_step):
  """Members one at a time, two at a time (vmap of 2 and a remainder of 1)
  and all at once (one vmap) give the same mean."""
  model, config = TinySeg(), _config()
  params = [_params(model, seed) for seed in (6, 7, 8)]
  expected = np.mean([_single(model, p, image, config) for p in params], axis=0)
  got = inference.make_ensemble_predictor(
      [model], config, models_per_step=models_per_step)(
          (inference.stack_members(params),), image)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def test_compiles_once_per_volume_shape(image):
  model, config = TinySeg(), _config()
  predict = inference.make_ensemble_predictor([model], config, mirror="z")
  stacked = (inference.stack_members([_params(model, 0), _params(model, 1)]),)
  for scale in (1.0, 2.0):  # a new volume of the same shape: no new compile
    predict(stacked, image * scale).block_until_ready()
  assert predict._cache_size() == 1
  predict(stacked, image[:15]).block_until_ready()
  assert predict._cache_size() == 2


def test_sharded_windows_match_unsharded(image):
  devices = jax.local_devices()
  if len(devices) < 2:
    pytest.skip("needs several devices (conftest fakes 8 CPU devices)")
  model, config = TinySeg(), _config(sw=4)
  # window_mesh leaves CPU devices unsharded; the mesh it builds on
  # accelerators is this one.
  assert inference.window_mesh(4, devices) is None
  mesh = jax.sharding.Mesh(np.array(devices[:inference.window_devices(4, len(devices))]),
                           ("data",))
  assert mesh.size in (2, 4)
  stacked = (inference.stack_members([_params(model, 0), _params(model, 1)]),)
  ref = inference.make_ensemble_predictor([model], config, mirror="y")(stacked, image)
  got = inference.make_ensemble_predictor([model], config, mirror="y", mesh=mesh)(
      stacked, image)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_window_devices_divide_the_batch():
  assert inference.window_devices(4, 8) == 4
  assert inference.window_devices(4, 3) == 2
  assert inference.window_devices(6, 4) == 3
  assert inference.window_devices(3, 2) == 1
  assert inference.window_devices(1, 8) == 1
  assert inference.window_devices(8, 8) == 8


def test_stacking_refuses_different_shapes():
  a = {"conv": {"kernel": np.zeros((3, 3, 3, 2, 4))}}
  b = {"conv": {"kernel": np.zeros((3, 3, 3, 2, 6))}}
  with pytest.raises(ValueError, match=r"member 1's \['conv'\]\['kernel'\] has shape"):
    inference.stack_members([a, b])
  with pytest.raises(ValueError, match="another structure"):
    inference.stack_members([a, {"other": a["conv"]}])
  stacked = inference.stack_members([a, a, a])
  assert stacked["conv"]["kernel"].shape == (3, 3, 3, 3, 2, 4)


def test_et_to_necrosis_below():
  regions = ["TC", "WT", "ET"]
  masks = np.zeros((6, 6, 6, 3), bool)
  masks[1:4, 1:4, 1:4, 1] = True          # WT: 27 voxels
  masks[1:3, 1:3, 1:3, 0] = True          # TC: 8 voxels
  masks[1:3, 1:3, 1, 2] = True            # ET: 4 voxels inside TC
  masks[5, 5, 5, 2] = True                # and 1 outside TC and WT
  steps = postprocess.parse("et_to_necrosis_below=6", regions)
  assert steps == [("et_to_necrosis_below", 6)]
  out = postprocess.apply(masks, steps, regions)
  # 5 ET voxels < 6: no ET left; every former ET voxel is TC and WT now.
  assert not out[..., 2].any()
  np.testing.assert_array_equal(out[..., 0], masks[..., 0] | masks[..., 2])
  np.testing.assert_array_equal(out[..., 1], masks[..., 1] | masks[..., 2])
  # At the threshold nothing changes (nnU-Net: fewer than N voxels).
  kept = postprocess.apply(masks, postprocess.parse("et_to_necrosis_below=5", regions),
                           regions)
  np.testing.assert_array_equal(kept, masks)
  assert postprocess.parse("", regions) == [] and postprocess.parse(None, regions) == []


def test_postprocess_errors_are_one_line():
  with pytest.raises(ValueError, match="expected NAME=VALUE"):
    postprocess.parse("largest_component", ["TC", "WT", "ET"])
  with pytest.raises(ValueError, match="bad value 'many'"):
    postprocess.parse("et_to_necrosis_below=many", ["TC", "WT", "ET"])
  with pytest.raises(ValueError, match=r"needs regions \['TC', 'WT', 'ET'\]; "
                     r"the model predicts \['lesion'\]"):
    postprocess.parse("et_to_necrosis_below=10", ["lesion"])
