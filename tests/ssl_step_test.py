"""The real stage-1 SSL step on 8 fake devices, and the SSL eval step.

Compiling the Swin model dominates the cost here, so the stage-1 step is
compiled once for data parallelism and once for FSDP (module fixtures), and
every check reads those two programs: what crosses devices, the loss
against a 1-device reference, FSDP against DP. The model is the stage-1
config's `:runlocal` size with the accelerator kernels (`impl="xla"`).
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bsf_jax.step import sharding, ssl_step, ssl_views
from bsf_jax.run import config_lib
from bsf_jax import models
from bsf_jax.step import train_state, train_step
from bsf_jax.bench import scale
import ssl_losses

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "configs")
# H = W (rotations are in the H-W plane); the bottleneck is 2x2x1 = 4 tokens
# (rotation reads token 0, contrastive token 1). One crop per device.
SHAPE = (8, 64, 64, 32, 2)


def stage1_config(fsdp=1):
  config = config_lib.load_file(os.path.join(_CONFIGS, "stage1.py"),
                                "runlocal=True")
  config.model.num_heads = (1, 1, 2, 2)
  config.model.impl = "xla"
  config.data.batch_size = SHAPE[0]
  config.mesh.fsdp = fsdp
  config.optim.warmup_steps = 0
  return config


def small_model():
  return models.from_config(stage1_config())


def images(seed, n=SHAPE[0]):
  rng = np.random.default_rng(seed)
  return rng.uniform(size=(n,) + SHAPE[1:]).astype(np.float32)


@jax.jit
def _reference_forward(params, views):
  """Each view through its own forward of the model (no mesh, 1 device)."""
  return [small_model().apply({"params": params}, v) for v in views]


def reference_terms(params, key, x, group, valid=None):
  """Loss inputs as the reference computes them: views per swap group.

  Group g of `group` consecutive samples gets `make_views(fold_in(key, g))`,
  the rule of `ssl_step`; then view 1 and view 2 of the batch go through
  separate forwards.
  """
  per_group = [ssl_views.make_views(
      jax.random.fold_in(key, g), x[g * group:(g + 1) * group],
      valid=None if valid is None else valid[g * group:(g + 1) * group])
               for g in range(x.shape[0] // group)]
  v1 = jnp.concatenate([p[0] for p in per_group])
  v2 = jnp.concatenate([p[1] for p in per_group])
  by_view = lambda i: jnp.concatenate(
      [p[i][:group] for p in per_group] + [p[i][group:] for p in per_group])
  (r1, c1, rec1), (r2, c2, rec2) = _reference_forward(params, (v1, v2))
  return (jnp.concatenate([r1, r2]), by_view(2), c1, c2,
          jnp.concatenate([rec1, rec2]), by_view(3))


class Stage1:
  """One compiled stage-1 step on the 8 fake devices, and its first run."""

  def __init__(self, fsdp, init_state=None):
    config = stage1_config(fsdp)
    self.mesh = sharding.create_mesh(config.mesh)
    self.config = config
    model = models.from_config(config, devices=list(self.mesh.devices.flat))
    from bsf_jax.step import optim  # pylint: disable=g-import-not-at-top
    tx = optim.make_optimizer(config.optim, config.train.num_steps)
    abstract, state_sh = train_state.abstract_train_state(
        model, tx, (1,) + SHAPE[1:], self.mesh, fsdp=fsdp > 1)
    if init_state is None:
      init_state, _ = train_state.create_train_state(
          model, tx, jax.random.key(0), (1,) + SHAPE[1:], self.mesh, False)
      init_state = jax.device_get(init_state)
    self.init_state = init_state
    loss_fn = ssl_step.make_loss_fn(model, config.ssl,
                                    jnp.dtype(config.model.dtype))
    step = train_step.make_train_step(loss_fn, tx, self.mesh, state_sh,
                                      donate=False)
    batch = {"image": jax.ShapeDtypeStruct(
        SHAPE, jnp.float32, sharding=sharding.data_sharding(self.mesh))}
    self.compiled = step.lower(abstract, batch, jax.random.key(5)).compile()
    self.report = scale.analyse(self.compiled,
                                scale.param_bytes(abstract.params))
    self.largest_param = scale.largest_param_bytes(abstract.params)
    state = jax.device_put(init_state, state_sh)
    self.x = images(0)
    new_state, metrics = self.compiled(
        state, jax.device_put({"image": self.x},
                              sharding.data_sharding(self.mesh)),
        jax.random.key(5))
    self.params = jax.device_get(new_state.params)
    self.metrics = jax.device_get(metrics)


@pytest.fixture(scope="module")
def dp():
  return Stage1(fsdp=1)


@pytest.fixture(scope="module")
def fsdp(dp):
  return Stage1(fsdp=2, init_state=dp.init_state)


def test_dp_step_moves_only_gradients(dp):
  r = dp.report
  assert dict(dp.mesh.shape) == {"data": 8, "fsdp": 1}
  # Nothing activation-sized crosses devices: no collective array is larger
  # than the largest parameter (one image of a device is 1 MiB, a gathered
  # batch 8 MiB).
  assert r["largest_collective_bytes"] <= dp.largest_param, r
  assert r["ratio_to_params"] <= 1.6, r
  # The gradients are all-reduced once: at least the parameter bytes.
  assert r["collective_bytes"]["all-reduce"] >= r["param_bytes"], r


def test_fsdp_step_gathers_only_parameters(fsdp, dp):
  r = fsdp.report
  # Activations stay sharded over the batch as under DP: no more temp memory
  # than DP's, beyond the gathered parameters themselves (measured: +0.2 MB
  # of 242 MB, for 4.4 MB gathered; at 64 devices FSDP's temp is below DP's,
  # BENCHMARKS.md).
  assert r["temp_bytes"] <= dp.report["temp_bytes"] + r["collective_bytes"][
      "all-gather"], (r, dp.report)
  assert dict(fsdp.mesh.shape) == {"data": 4, "fsdp": 2}
  assert r["largest_collective_bytes"] <= fsdp.largest_param, r
  assert r["ratio_to_params"] <= 3.5, r
  assert r["collective_bytes"].get("all-gather", 0) > 0, r
  assert r["collective_bytes"].get("reduce-scatter", 0) > 0, r


def test_loss_equals_one_device_loss(dp):
  # The step's loss (at the initial params) is the loss of the same global
  # batch computed on one device, without a mesh, view 1 and view 2 in
  # separate forwards: within float32 reduction-order noise.
  key = jax.random.split(jax.random.fold_in(jax.random.key(5), 0))[0]
  _, want = ssl_losses.ssl_loss(*reference_terms(
      dp.init_state.params, key, jnp.asarray(dp.x), group=1))
  for k in ("rot", "con", "rec"):
    np.testing.assert_allclose(dp.metrics[k], want[k], rtol=2e-5, err_msg=k)
  assert int(dp.metrics["nonfinite"]) == 0


def test_fsdp_step_equals_dp_step(dp, fsdp):
  for k in ("loss", "grad_norm", "param_norm"):
    np.testing.assert_allclose(fsdp.metrics[k], dp.metrics[k], rtol=1e-5,
                               err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=1e-7), fsdp.params, dp.params)
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                       dp.params, dp.init_state.params)
  assert max(jax.tree.leaves(moved)) > 0  # the step did update the params


def test_bf16_steps_compute_in_bf16_with_fp32_params(dp):
  # Lowering only (no compile): the train and eval programs convolve in
  # bf16, and the train step returns float32 params.
  config = stage1_config()
  config.model.dtype = "bfloat16"
  mesh = sharding.create_mesh(ml_collections.ConfigDict(
      {"data": 2, "fsdp": 1}), devices=jax.devices()[:2])
  model = models.from_config(config)
  from bsf_jax.step import optim  # pylint: disable=g-import-not-at-top
  tx = optim.make_optimizer(config.optim, 4)
  abstract, state_sh = train_state.abstract_train_state(
      model, tx, (1,) + SHAPE[1:], mesh, fsdp=False)
  batch = {"image": jax.ShapeDtypeStruct((2,) + SHAPE[1:], jnp.float32)}
  step = train_step.make_train_step(
      ssl_step.make_loss_fn(model, config.ssl, jnp.bfloat16), tx, mesh,
      state_sh)
  lowered = step.lower(abstract, batch, jax.random.key(0))
  assert "bf16" in lowered.as_text()
  out_state, _ = lowered.out_info
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(
      out_state.params))
  eval_step = ssl_step.make_eval_step(model, config.ssl, mesh, jnp.bfloat16)
  eval_text = eval_step.lower(abstract.params, batch,
                              jax.random.key(0)).as_text()
  assert "bf16" in eval_text
  fp32_text = ssl_step.make_eval_step(model, config.ssl, mesh).lower(
      abstract.params, batch, jax.random.key(0)).as_text()
  assert "bf16" not in fp32_text


def _eval_step_on_2_devices(group):
  """The SSL eval step, batch split over 2 devices, swap groups of `group`."""
  mesh = sharding.create_mesh(
      ml_collections.ConfigDict({"data": 2, "fsdp": 1}),
      devices=jax.devices()[:2])
  cfg = ssl_step.default_config()
  cfg.swap_group_size = group
  return ssl_step.make_eval_step(small_model(), cfg, mesh)


def test_eval_step_ignores_padded_samples(dp):
  params = dp.init_state.params
  eval_step = _eval_step_on_2_devices(group=0)  # the per-device batch, 2
  x = images(2, n=4)
  # Padding rows hold other values; they must not enter the sums. Sample 2
  # shares its swap group with padding.
  x[3:] = 0.5
  mask = np.array([True, True, True, False])
  key = jax.random.key(7)
  sums = jax.device_get(eval_step(params, {"image": x, "mask": mask}, key))
  assert sums["count"] == 3

  # Same views (drawn per group, padding never a swap source), losses of
  # the real samples only.
  rot, labels, c1, c2, rec, targets = reference_terms(
      params, key, jnp.asarray(x), group=2, valid=jnp.asarray(mask))
  both = np.array([0, 1, 2, 4, 5, 6])  # real samples of view 1, then view 2
  _, want = ssl_losses.ssl_loss(rot[both], labels[both], c1[:3], c2[:3],
                                rec[both], targets[both])
  for k in ("rot", "con", "rec"):
    np.testing.assert_allclose(sums[k] / sums["count"], want[k], rtol=1e-4,
                               err_msg=k)
  np.testing.assert_allclose(
      sums["total"], sums["rot"] + sums["con"] + sums["rec"], rtol=1e-6)
  # Fixed key -> identical numbers every evaluation.
  again = jax.device_get(eval_step(params, {"image": x, "mask": mask}, key))
  assert again == sums


def test_eval_sums_do_not_depend_on_padding(dp):
  # The eval pipeline pads a last partial batch to the full batch. Padded
  # samples must not be swap-drop sources of real ones, so neither the
  # padding's content nor its amount may change the validation sums.
  params = dp.init_state.params
  eval_step = _eval_step_on_2_devices(group=2)
  real = images(3, n=3)
  key = jax.random.key(11)

  def sums(batch_size, fill):
    x = np.empty((batch_size,) + SHAPE[1:], np.float32)
    x[:3] = real
    x[3:] = fill(x[3:].shape)
    mask = np.arange(batch_size) < 3
    return jax.device_get(eval_step(params, {"image": x, "mask": mask}, key))

  rng = np.random.default_rng(0)
  want = sums(4, np.zeros)  # the pipeline's placeholder padding
  for batch_size, fill in ((4, lambda s: rng.uniform(-5, 5, s)),
                           (8, lambda s: rng.uniform(size=s))):
    got = sums(batch_size, fill)
    assert got["count"] == 3
    for k in ("rot", "con", "rec", "total"):
      np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6,
                                 err_msg=f"{k}, batch {batch_size}")


def test_bad_batch_and_group_name_the_key():
  mesh = sharding.create_mesh(ml_collections.ConfigDict(
      {"data": 2, "fsdp": 1}), devices=jax.devices()[:2])
  params = jax.eval_shape(lambda: small_model().init(
      jax.random.key(0), jnp.zeros((1,) + SHAPE[1:]))["params"])
  x = jax.ShapeDtypeStruct((4,) + SHAPE[1:], jnp.float32)
  with pytest.raises(ValueError, match="'image'"):
    ssl_step.make_eval_step(small_model(), ssl_step.default_config(),
                            mesh).lower(params, {"img": x},
                                        jax.random.key(0))
  cfg = ssl_step.default_config()
  cfg.swap_group_size = 3
  with pytest.raises(ValueError, match="swap_group_size=3 must divide the "
                     "per-device batch 2"):
    ssl_step.make_eval_step(small_model(), cfg, mesh).lower(
        params, {"image": x}, jax.random.key(0))
  cfg.swap_group_size, cfg.negatives = 0, "local"
  with pytest.raises(ValueError, match="negatives='local'"):
    ssl_step.make_eval_step(small_model(), cfg, mesh).lower(
        params, {"image": x}, jax.random.key(0))
