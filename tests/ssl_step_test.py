"""SSL loss_fn, train step and eval step on the real (small) SSL head.

Compiling the Swin model dominates the cost here, so the tests share one
batch shape and one jitted reference forward. The sharded-vs-1-device
equality of the step is tested with a small stand-in net in
`sharding_test.py`.
"""


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bsf_jax import augment, losses, optim, sharding, ssl_step, train_state
from bsf_jax import train_step
from bsf_jax.models import SSLHead

# H = W (rotations are in the H-W plane); the bottleneck is 2x2x1 = 4 tokens
# (rotation reads token 0, contrastive token 1).
SHAPE = (4, 64, 64, 32, 2)


def small_model():
  return SSLHead(in_channels=SHAPE[-1], feature_size=12, depths=(1, 1, 1, 1),
                 num_heads=(1, 1, 2, 2))


def images(seed):
  rng = np.random.default_rng(seed)
  return rng.uniform(size=SHAPE).astype(np.float32)


@pytest.fixture(scope="module")
def params():
  x = jnp.zeros((1,) + SHAPE[1:])
  return jax.jit(small_model().init)(jax.random.key(0), x)["params"]


@jax.jit
def _separate_forwards(params, key, x, valid=None):
  """Reference: views, each view through its own forward, the loss inputs."""
  model = small_model()
  v1, v2, labels, targets = augment.make_views(key, x, valid=valid)
  r1, c1, rec1 = model.apply({"params": params}, v1)
  r2, c2, rec2 = model.apply({"params": params}, v2)
  return (jnp.concatenate([r1, r2]), labels, c1, c2,
          jnp.concatenate([rec1, rec2]), targets)


def test_loss_fn_is_one_forward_of_both_views(params):
  x = jnp.asarray(images(0))
  key = jax.random.key(3)
  loss, parts = jax.jit(ssl_step.make_loss_fn(
      small_model(), ssl_step.default_config()))(params, {"image": x}, key)
  view_key, _ = jax.random.split(key)
  want, want_parts = losses.ssl_loss(*_separate_forwards(params, view_key, x))
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  for k in ("rot", "con", "rec"):
    np.testing.assert_allclose(parts[k], want_parts[k], rtol=1e-5)


def test_bf16_train_step_keeps_fp32_params():
  cfg_optim = optim.default_config()
  cfg_optim.lr, cfg_optim.warmup_steps = 1e-3, 0
  tx = optim.make_optimizer(cfg_optim, total_steps=4)
  mesh = sharding.create_mesh(
      ml_collections.ConfigDict({"data": -1, "fsdp": 1}),
      devices=jax.devices()[:2])
  state, state_sh = train_state.create_train_state(
      small_model(), tx, jax.random.key(0), (1,) + SHAPE[1:], mesh, False)
  loss_fn = ssl_step.make_loss_fn(small_model(), ssl_step.default_config(),
                                  jnp.bfloat16)
  step = train_step.make_train_step(loss_fn, tx, mesh, state_sh)
  x = images(0)
  init_params = jax.device_get(state.params)  # before the state is donated
  new_state, m = step(state, jax.device_put(
      {"image": x}, sharding.data_sharding(mesh)), jax.random.key(5))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(
      new_state.params))
  assert int(m["nonfinite"]) == 0 and int(new_state.step) == 1
  assert float(m["lr"]) == pytest.approx(1e-3)
  assert set(m) >= {"loss", "rot", "con", "rec", "grad_norm", "param_norm"}
  # Same weights and views in fp32: bf16 compute changes the loss slightly.
  want, _ = losses.ssl_loss(*_separate_forwards(
      init_params, jax.random.split(jax.random.fold_in(jax.random.key(5), 0))[0],
      jnp.asarray(x)))
  np.testing.assert_allclose(float(m["loss"]), float(want), rtol=0.05)


def _eval_step_on_4_devices():
  """The SSL eval step of the small model, batch split over 4 devices."""
  mesh = sharding.create_mesh(
      ml_collections.ConfigDict({"data": 4, "fsdp": 1}),
      devices=jax.devices()[:4])
  return ssl_step.make_eval_step(small_model(), ssl_step.default_config(), mesh)


def test_eval_step_ignores_padded_samples(params):
  eval_step = _eval_step_on_4_devices()
  x = images(2)
  # Padding rows hold other values; they must not enter the sums.
  x[2:] = 0.5
  mask = np.array([True, True, False, False])
  key = jax.random.key(7)
  sums = jax.device_get(eval_step(params, {"image": x, "mask": mask}, key))
  assert sums["count"] == 2

  # Same views (drawn on the full batch, padding never a swap source),
  # losses of the real samples only.
  rot, labels, c1, c2, rec, targets = _separate_forwards(
      params, key, jnp.asarray(x), jnp.asarray(mask))
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


def test_eval_sums_do_not_depend_on_padding(params):
  # The eval pipeline pads a last partial batch to the full batch. Padded
  # samples must not be swap-drop sources of real ones, so neither the
  # padding's content nor its amount may change the validation sums.
  eval_step = _eval_step_on_4_devices()
  real = images(3)[:2]
  key = jax.random.key(11)

  def sums(batch_size, fill):
    x = np.empty((batch_size,) + SHAPE[1:], np.float32)
    x[:2] = real
    x[2:] = fill(x[2:].shape)
    mask = np.arange(batch_size) < 2
    return jax.device_get(eval_step(params, {"image": x, "mask": mask}, key))

  rng = np.random.default_rng(0)
  want = sums(4, np.zeros)  # the pipeline's placeholder padding
  for batch_size, fill in ((4, lambda s: rng.uniform(-5, 5, s)),
                           (4, lambda s: np.full(s, 3.0)),
                           (8, lambda s: rng.uniform(size=s))):
    got = sums(batch_size, fill)
    assert got["count"] == 2
    for k in ("rot", "con", "rec", "total"):
      np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6,
                                 err_msg=f"{k}, batch {batch_size}")


def test_bad_batch_names_the_key(params):
  loss_fn = ssl_step.make_loss_fn(small_model(), ssl_step.default_config())
  with pytest.raises(ValueError, match="'image'"):
    loss_fn(params, {"img": np.zeros(SHAPE)}, jax.random.key(0))
