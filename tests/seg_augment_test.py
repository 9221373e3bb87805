"""Fine-tuning augmentation on the device (`seg_augment.seg_augment`).

- Same distribution as the host version (`transforms.rand_flip` +
  `rand_scale_shift`, MONAI's RandFlipd x3, RandScaleIntensityd(0.1) and
  RandShiftIntensityd(0.1)): per-axis flip rates and their independence, the
  scale and shift ranges and laws, each checked against the exact law and
  device against host, with bounds many standard errors wide and fixed seeds.
- Deterministic for a key, one key per crop: a crop's draw depends on its
  index in the global batch only, not on the number of devices.
- The host then only reads crops: its batches equal un-augmented ones.
- A fine-tuning run stopped and resumed ends bit-identical to an
  uninterrupted one.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from scipy import stats

from bsf_jax.step import seg_augment, sharding
from bsf_jax.run import checkpoint_reads, config_lib, kinds
from bsf_jax import models
from bsf_jax.data import demo, pipeline
from bsf_jax.data import transforms as T
from bsf_jax.trainers import finetune, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 20_000
# A 2x2x2 volume with 8 distinct values: the flips and the intensity map of
# each augmented copy can be read back from it exactly.
BASE = np.arange(1, 9, dtype=np.float32).reshape(2, 2, 2, 1)


def _read_back(image, label):
  """Per sample: flips [3] (from the label, which is the unscaled image),
  scale and shift (from the image's extremes)."""
  n = image.shape[0]
  at_max = np.argmax(label.reshape(n, -1), axis=1)
  flips = np.stack(np.unravel_index(at_max, (2, 2, 2)), axis=1) == 0
  flat = image.reshape(n, -1).astype(np.float64)
  scale = (flat.max(1) - flat.min(1)) / 7.0
  shift = flat.min(1) - scale
  for i in range(min(n, 200)):  # The image is the flipped label, scaled.
    axes = tuple(np.flatnonzero(flips[i]))
    np.testing.assert_array_equal(label[i], np.flip(BASE, axes))
    np.testing.assert_allclose(image[i], label[i] * scale[i] + shift[i],
                               rtol=0, atol=1e-5)
  return flips, scale, shift


def _device_draws():
  keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(0),
                                                 jnp.arange(N))
  x = jnp.broadcast_to(jnp.asarray(BASE), (N,) + BASE.shape)
  image, label = jax.jit(seg_augment.seg_augment)(keys, x, x)
  return _read_back(np.asarray(image), np.asarray(label))


def _host_draws():
  images, labels = [], []
  for i in range(N):
    rng = np.random.default_rng([0, i])
    image, label = T.rand_flip(rng, [BASE, BASE])
    images.append(T.rand_scale_shift(rng, image))
    labels.append(label)
  return _read_back(np.stack(images), np.stack(labels))


def _check_law(flips, scale, shift, who):
  # Flips: each axis, each pair and all three at the rates of independent
  # fair coins, within 6 standard errors.
  for mask, p in [(flips[:, a], 0.5) for a in range(3)] + [
      (flips[:, 0] & flips[:, 1], 0.25), (flips[:, 1] & flips[:, 2], 0.25),
      (flips.all(1), 0.125)]:
    se = np.sqrt(p * (1 - p) / N)
    assert abs(mask.mean() - p) < 6 * se, (who, mask.mean(), p)
  # Scale 1 + U(-0.1, 0.1) and shift U(-0.1, 0.1): inside the range (float32
  # rounding aside), spread over all of it, and uniform (KS against the
  # exact law; p-values below 1e-6 only for a wrong law).
  for name, v, lo in (("scale", scale, 0.9), ("shift", shift, -0.1)):
    assert lo - 1e-5 <= v.min() and v.max() <= lo + 0.2 + 1e-5, (who, name)
    assert v.min() < lo + 0.001 and v.max() > lo + 0.199, (who, name)
    p = stats.kstest(v, stats.uniform(lo, 0.2).cdf).pvalue
    assert p > 1e-6, (who, name, p)
  # Scale, shift and flips are drawn independently.
  assert abs(np.corrcoef(scale, shift)[0, 1]) < 6 / np.sqrt(N), who
  assert abs(np.corrcoef(scale, flips[:, 0])[0, 1]) < 6 / np.sqrt(N), who


def test_device_and_host_draw_the_same_law():
  device, host = _device_draws(), _host_draws()
  _check_law(*device, "device")
  _check_law(*host, "host")
  for name, a, b in (("scale", device[1], host[1]), ("shift", device[2], host[2])):
    p = stats.ks_2samp(a, b).pvalue
    assert p > 1e-6, (name, p)


def test_deterministic_and_keyed_per_crop():
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.normal(size=(6, 8, 8, 8, 2)), jnp.float32)
  label = jnp.asarray(rng.uniform(size=(6, 8, 8, 8, 3)) > 0.5, jnp.float32)
  keys = jax.random.split(jax.random.key(3), 6)
  # One compiled program throughout (eager and jitted runs may round the
  # scale-and-shift differently: fused or not).
  augment = jax.jit(seg_augment.seg_augment)
  out = augment(keys, image, label)
  again = augment(keys, image, label)
  for a, b in zip(out, again):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Crop i depends on keys[i] and its own crop only.
  order = np.array([4, 2, 0, 5, 1, 3])
  permuted = augment(keys[order], image[order], label[order])
  for a, b in zip(out, permuted):
    np.testing.assert_array_equal(np.asarray(a)[order], np.asarray(b))
  other = augment(jax.random.split(jax.random.key(4), 6), image, label)
  assert not np.array_equal(np.asarray(out[0]), np.asarray(other[0]))
  assert out[0].dtype == image.dtype and out[1].dtype == label.dtype


def test_same_crops_on_any_number_of_devices():
  """`finetune.augment_batch` inside shard_map on 1, 2 and 4 devices."""
  rng = np.random.default_rng(1)
  batch = {"image": rng.normal(size=(4, 8, 8, 8, 2)).astype(np.float32),
           "label": (rng.uniform(size=(4, 8, 8, 8, 3)) > 0.5).astype(np.float32)}
  key = jax.random.key(7)
  outs = []
  for n in (1, 2, 4):
    mesh = sharding.create_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}),
                                devices=jax.devices()[:n])
    f = jax.jit(jax.shard_map(finetune.augment_batch, mesh=mesh,
                              in_specs=(P(sharding.DATA_AXES), P()),
                              out_specs=P(sharding.DATA_AXES)))
    outs.append(jax.device_get(f(batch, key)))
  for out in outs[1:]:
    # Flips move data: exact. The scale-and-shift of each program may be
    # fused differently (a rounding apart); another draw would be 1e-3 off.
    np.testing.assert_array_equal(outs[0]["label"], out["label"])
    np.testing.assert_allclose(outs[0]["image"], out["image"], rtol=0, atol=1e-5)
  assert not np.array_equal(outs[0]["image"], batch["image"])


@pytest.fixture(scope="module")
def brats(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("cohort"))
  return demo.write_demo_cohort(out, subjects=5, seed=0, small=True,
                                datasets=("brats",))["brats"]


def _data_cfg(brats, **kw):
  cfg = pipeline.default_config()
  cfg.update(dict(dataset="brats", datalist=brats["datalist"], label_format="brats2021",
                  modalities=("flair", "t1ce", "t1", "t2"), roi=(16, 16, 16),
                  batch_size=2, num_samples=1, workers=0), **kw)
  return cfg


def test_host_only_reads_crops_when_the_device_augments(brats):
  def batches(**kw):
    it = pipeline.make_train_iter(_data_cfg(brats, **kw), task="seg", seed=0,
                                  process_index=0, process_count=1)
    return [next(it) for _ in range(3)]
  device = batches()  # the default: augment_on="device"
  plain = batches(augment=False)
  host = batches(augment_on="host")
  for d, p, h in zip(device, plain, host):
    for k in d:
      np.testing.assert_array_equal(d[k], p[k], err_msg=k)
    assert not np.array_equal(d["image"], h["image"])
  with pytest.raises(ValueError, match="data.augment_on='gpu'"):
    pipeline.make_train_iter(_data_cfg(brats, augment_on="gpu"), task="seg", seed=0,
                             process_index=0, process_count=1)


def _train(brats, workdir, steps):
  """A tiny stage-3 run on 2 devices through the shared training loop, with
  the fine-tuning loss and device augmentation (no validation: nothing here
  needs it)."""
  config = config_lib.load_file(os.path.join(ROOT, "configs", "stage3.py"),
                                "dataset=brats2021,runlocal=True")
  config.data.update(datalist=brats["datalist"], root=brats["root"], roi=(32, 32, 32),
                     num_samples=1, batch_size=2)
  config.mesh.num_devices = 2
  config.model.update(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
  config.train.update(num_steps=steps, eval_every=0, ckpt_every=2, log_every=1)
  assert pipeline.seg_augmentation(config.data) == "device"
  mesh = sharding.create_mesh(config.mesh)
  model = models.from_config(config, devices=list(mesh.devices.flat))
  job = loop.Job(model=model, loss_fn=finetune.make_loss_fn(model, config.seg, True),
                 kind=kinds.SEG, evaluate=None)
  loop.run(config, workdir, job, mesh)
  params, _, step = checkpoint_reads.restore_params(workdir, "latest")
  return step, {jax.tree_util.keystr(p): np.asarray(x)
                for p, x in jax.tree_util.tree_leaves_with_path(params)}


def test_resumed_run_equals_uninterrupted(brats, tmp_path, fast_compile):
  """3 steps in one go, against 2 steps then a restart to 3: bit-identical
  (the crops' augmentation keys come from the step, not from the process)."""
  whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
  step_a, a = _train(brats, whole, 3)
  assert _train(brats, parts, 2)[0] == 2
  step_b, b = _train(brats, parts, 3)
  assert step_a == step_b == 3
  assert a.keys() == b.keys()
  different = [k for k in a if not np.array_equal(a[k], b[k])]
  assert not different, different[:5]
