"""SSL loss_fn, train step and eval step on the real (small) SSL head."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bsf_jax import augment, losses, optim, sharding, ssl_step, train_state
from bsf_jax import train_step
from bsf_jax.models import SSLHead

# roi 64 is the smallest with >= 2 bottleneck tokens (rotation reads token 0,
# contrastive token 1).
ROI = 64
IN_CH = 2


def small_model():
  return SSLHead(in_channels=IN_CH, feature_size=12, depths=(1, 1, 1, 1),
                 num_heads=(1, 1, 2, 2))


def images(seed, b):
  rng = np.random.default_rng(seed)
  return rng.uniform(size=(b, ROI, ROI, ROI, IN_CH)).astype(np.float32)


@pytest.fixture(scope="module")
def params():
  x = jnp.zeros((1, ROI, ROI, ROI, IN_CH))
  return jax.jit(small_model().init)(jax.random.key(0), x)["params"]


def _separate_forwards(params, key, x):
  """Reference: views, each view through its own forward, the ssl loss."""
  model = small_model()
  v1, v2, labels, targets = augment.make_views(key, x)
  r1, c1, rec1 = model.apply({"params": params}, v1)
  r2, c2, rec2 = model.apply({"params": params}, v2)
  return (jnp.concatenate([r1, r2]), labels, c1, c2,
          jnp.concatenate([rec1, rec2]), targets)


def test_loss_fn_one_forward_of_both_views_fp32_and_bf16(params):
  cfg = ssl_step.default_config()
  x = jnp.asarray(images(0, 2))
  key = jax.random.key(3)
  loss, parts = jax.jit(ssl_step.make_loss_fn(small_model(), cfg))(
      params, {"image": x}, key)

  view_key, _ = jax.random.split(key)
  want, want_parts = losses.ssl_loss(
      *jax.jit(_separate_forwards)(params, view_key, x))
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  for k in ("rot", "con", "rec"):
    np.testing.assert_allclose(parts[k], want_parts[k], rtol=1e-5)

  # bf16 compute: float32 loss and float32 gradients for float32 params.
  loss16_fn = ssl_step.make_loss_fn(small_model(), cfg, jnp.bfloat16)
  (loss16, _), grads = jax.jit(jax.value_and_grad(loss16_fn, has_aux=True))(
      params, {"image": x}, key)
  assert loss16.dtype == jnp.float32
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  np.testing.assert_allclose(loss16, loss, rtol=0.05)


def test_ssl_train_step_data_parallel_matches_one_device():
  cfg_optim = optim.default_config()
  cfg_optim.lr, cfg_optim.warmup_steps = 1e-3, 0
  tx = optim.make_optimizer(cfg_optim, total_steps=4)
  model = small_model()
  loss_fn = ssl_step.make_loss_fn(model, ssl_step.default_config())
  batch = {"image": images(1, 4)}

  def one_step(devices):
    mesh = sharding.create_mesh(
        ml_collections.ConfigDict({"data": -1, "fsdp": 1}), devices=devices)
    state, state_sh = train_state.create_train_state(
        model, tx, jax.random.key(0), (1, ROI, ROI, ROI, IN_CH), mesh, False)
    step = train_step.make_train_step(loss_fn, tx, mesh, state_sh)
    state, metrics = step(
        state, jax.device_put(batch, sharding.data_sharding(mesh)),
        jax.random.key(5))
    return jax.device_get((state.params, metrics))

  p1, m1 = one_step(jax.devices()[:1])
  p4, m4 = one_step(jax.devices()[:4])
  assert np.isfinite(m1["loss"]) and int(m1["nonfinite"]) == 0
  assert float(m1["lr"]) == pytest.approx(1e-3)
  for k in ("loss", "rot", "con", "rec", "grad_norm", "param_norm"):
    np.testing.assert_allclose(m4[k], m1[k], rtol=1e-5, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6), p4, p1)


def test_eval_step_ignores_padded_samples(params):
  cfg = ssl_step.default_config()
  mesh = sharding.create_mesh(
      ml_collections.ConfigDict({"data": 4, "fsdp": 1}),
      devices=jax.devices()[:4])
  eval_step = ssl_step.make_eval_step(small_model(), cfg, mesh)
  x = images(2, 4)
  # Padding rows hold garbage that must not leak into the sums.
  x[2:] = 1e3
  mask = np.array([True, True, False, False])
  key = jax.random.key(7)
  sums = jax.device_get(eval_step(params, {"image": x, "mask": mask}, key))
  assert sums["count"] == 2

  # Same views (drawn on the full batch), losses of the real samples only.
  rot, labels, c1, c2, rec, targets = jax.jit(_separate_forwards)(
      params, key, jnp.asarray(x))
  both = np.array([0, 1, 4, 5])  # real samples of view 1, then of view 2
  _, want = losses.ssl_loss(rot[both], labels[both], c1[:2], c2[:2],
                            rec[both], targets[both])
  for k in ("rot", "con", "rec"):
    np.testing.assert_allclose(sums[k] / sums["count"], want[k], rtol=1e-4,
                               err_msg=k)
  np.testing.assert_allclose(
      sums["total"], sums["rot"] + sums["con"] + sums["rec"], rtol=1e-6)
  # Fixed key -> identical numbers every evaluation.
  again = jax.device_get(eval_step(params, {"image": x, "mask": mask}, key))
  assert again == sums


def test_bad_batch_names_the_key(params):
  loss_fn = ssl_step.make_loss_fn(small_model(), ssl_step.default_config())
  with pytest.raises(ValueError, match="'image'"):
    loss_fn(params, {"img": np.zeros((1, ROI, ROI, ROI, IN_CH))},
            jax.random.key(0))
