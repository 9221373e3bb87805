"""Sharded init and train step on 8 fake CPU devices (conftest).

A small conv net stands in for the SSL model here, so these tests check the
step machinery (mesh, shardings, donation, collectives, non-finite guard)
in seconds; `ssl_step_test.py` runs the real model through the same step.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bsf_jax.run import kinds
from bsf_jax.step import optim, sharding, train_state, train_step

ROI = 8
IN_CH = 2


class TinyNet(nn.Module):
  """3D conv + dense regression net with dropout (exercises the rng)."""

  @nn.compact
  def __call__(self, x, deterministic=True):
    x = nn.Conv(16, (3, 3, 3))(x)
    x = nn.gelu(x)
    x = nn.Conv(16, (3, 3, 3), strides=2)(x)
    x = nn.Dropout(0.1, deterministic=deterministic)(x)
    x = x.reshape(x.shape[0], -1).mean(axis=1, keepdims=True) + 0 * x[:, 0, 0, 0]
    return nn.Dense(4)(jnp.concatenate([x, x * x], axis=-1))


def tiny_loss_fn(model):
  """MSE loss of TinyNet against batch['y'], with dropout keyed by rng."""

  def loss_fn(params, batch, rng):
    # Runs per device (train_step.sharded_loss). Row r of the global batch
    # draws its dropout from fold_in(rng, r), so the masks, hence the
    # results, do not depend on the device count.
    b = batch["x"].shape[0]
    rows = sharding.shard_index() * b + jnp.arange(b)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, rows)
    pred = jax.vmap(lambda x, k: model.apply(
        {"params": params}, x[None], deterministic=False,
        rngs={"dropout": k})[0])(batch["x"], keys)
    loss = jnp.mean((pred - batch["y"]) ** 2)
    return loss, {"pred_mean": pred.mean()}

  return loss_fn


def tiny_batch(seed, batch_size=8):
  rng = np.random.default_rng(seed)
  return {"x": rng.normal(size=(batch_size, ROI, ROI, ROI, IN_CH)
                          ).astype(np.float32),
          "y": rng.normal(size=(batch_size, 4)).astype(np.float32)}


def optim_cfg(**kw):
  cfg = optim.default_config()
  cfg.lr = 1e-2
  cfg.warmup_steps = 1
  cfg.grad_clip = 1.0
  cfg.update(kw)
  return cfg


def mesh_cfg(data, fsdp):
  return ml_collections.ConfigDict({"data": data, "fsdp": fsdp})


def run_steps(mesh, fsdp, n_steps=2, nonfinite="skip", donate=True):
  """Init + n steps; returns (final state, list of metrics, jitted step).

  Also checks that each step donated (deleted) the input state's buffers.
  """
  model = TinyNet()
  tx = optim.make_optimizer(optim_cfg(), total_steps=10)
  state, state_sh = train_state.create_train_state(
      model, tx, jax.random.key(0), (1, ROI, ROI, ROI, IN_CH), mesh, fsdp)
  step = train_step.make_train_step(tiny_loss_fn(model), tx, mesh, state_sh,
                                    nonfinite=nonfinite, donate=donate)
  metrics = []
  for i in range(n_steps):
    batch = jax.device_put(tiny_batch(i), sharding.data_sharding(mesh))
    old_kernel = state.params["Conv_0"]["kernel"]
    state, m = step(state, batch, jax.random.key(1))
    assert old_kernel.is_deleted() == donate
    metrics.append(m)
  return state, metrics, step


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


@pytest.fixture(scope="module")
def one_device_result():
  mesh = sharding.create_mesh(mesh_cfg(1, 1), devices=jax.devices()[:1])
  state, metrics, _ = run_steps(mesh, fsdp=False)
  return jax.device_get((state, metrics))


def test_create_mesh_sizes_and_errors():
  assert len(jax.devices()) == 8
  mesh = sharding.create_mesh(sharding.default_config())
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1}
  assert dict(sharding.create_mesh(mesh_cfg(-1, 4)).shape) == {"data": 2,
                                                               "fsdp": 4}
  with pytest.raises(ValueError, match="not divisible by 3"):
    sharding.create_mesh(mesh_cfg(-1, 3))
  with pytest.raises(ValueError, match="needs 4 devices"):
    sharding.create_mesh(mesh_cfg(2, 2))
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.create_mesh(mesh_cfg(-1, -1))


def test_fsdp_spec_rules():
  P = jax.sharding.PartitionSpec
  assert sharding.fsdp_spec((3, 3, 3, 32, 64), 4) == P(None, None, None,
                                                       None, "fsdp")
  assert sharding.fsdp_spec((64,), 4) == P()  # too small to be worth it
  assert sharding.fsdp_spec((4099, 3), 4) == P()  # nothing divisible
  assert sharding.fsdp_spec((3, 3, 3, 32, 64), 1) == P()


def test_gather_to_process_makes_whole_local_arrays_from_the_gathered_copies():
  mesh = sharding.create_mesh(mesh_cfg(2, 4))
  local_mesh = sharding.process_local_mesh(mesh)
  P = jax.sharding.PartitionSpec
  w = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
  tree = {"w": jax.device_put(w, jax.sharding.NamedSharding(mesh, P("fsdp", None))),
          "b": jax.device_put(np.ones(3, np.float32), sharding.replicated(mesh))}
  local = sharding.gather_to_process(mesh, local_mesh)(tree)
  for name, x in local.items():
    assert x.sharding == sharding.replicated(local_mesh), name
    assert {s.device for s in x.addressable_shards} == set(local_mesh.devices.flat)
    for shard in x.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(tree[name]))
  # Usable by a program on the local mesh, as the validation's predictor is.
  total = jax.jit(lambda t: t["w"].sum() + t["b"].sum())(local)
  assert float(total) == float(w.sum() + 3)


@pytest.mark.parametrize("data,fsdp", [(8, 1), (2, 4)])
def test_sharded_step_matches_one_device(one_device_result, data, fsdp):
  mesh = sharding.create_mesh(mesh_cfg(data, fsdp))
  state, metrics, step = run_steps(mesh, fsdp=fsdp > 1)
  ref_state, ref_metrics = one_device_result
  assert_trees_close(jax.device_get(state), ref_state)
  assert_trees_close(jax.device_get(metrics), ref_metrics)
  assert int(state.step) == 2 and int(state.nonfinite_count) == 0
  # Warm-up of 1 step: lr 0 on step 0, the peak on step 1.
  assert [float(m["lr"]) for m in metrics] == pytest.approx([0.0, 1e-2])

  kernel = state.params["Conv_1"]["kernel"]  # (3, 3, 3, 16, 16)
  if fsdp == 1:
    assert all(x.sharding.is_fully_replicated
               for x in jax.tree.leaves(state.params))
  else:
    assert kernel.sharding.spec[-1] == "fsdp"
    assert kernel.addressable_shards[0].data.shape == (3, 3, 3, 16, 4)
    mu = state.opt_state.inner_state[-1][0].mu["Conv_1"]["kernel"]
    assert mu.sharding.spec[-1] == "fsdp"  # Adam moments sharded too
  assert metrics[0]["loss"].sharding.is_fully_replicated

  # The gradient reduction over devices is in the compiled program.
  batch = jax.device_put(tiny_batch(0), sharding.data_sharding(mesh))
  hlo = step.lower(state, batch, jax.random.key(1)).compile().as_text()
  assert "all-reduce" in hlo or "reduce-scatter" in hlo
  if fsdp > 1:
    assert "all-gather" in hlo  # weights gathered for the forward pass


@pytest.mark.parametrize("mode", ["skip", "halt"])
def test_nonfinite_step_changes_nothing(mode):
  mesh = sharding.create_mesh(mesh_cfg(8, 1))
  model = TinyNet()
  tx = optim.make_optimizer(optim_cfg(), total_steps=10)
  state, state_sh = train_state.create_train_state(
      model, tx, jax.random.key(0), (1, ROI, ROI, ROI, IN_CH), mesh, False)
  step = train_step.make_train_step(tiny_loss_fn(model), tx, mesh, state_sh,
                                    nonfinite=mode, donate=False)
  good = jax.device_put(tiny_batch(0), sharding.data_sharding(mesh))
  state, _ = step(state, good, jax.random.key(1))
  bad = tiny_batch(1)
  bad["x"][3, 0, 0, 0, 0] = np.nan
  bad = jax.device_put(bad, sharding.data_sharding(mesh))
  new_state, m = step(state, bad, jax.random.key(1))
  assert int(m["nonfinite"]) == 1 and int(new_state.nonfinite_count) == 1
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get((new_state.params, new_state.opt_state)),
               jax.device_get((state.params, state.opt_state)))
  assert int(new_state.step) == (2 if mode == "skip" else 1)
  # A later good step still trains.
  after, m = step(new_state, good, jax.random.key(1))
  assert int(m["nonfinite"]) == 0
  assert not np.allclose(after.params["Dense_0"]["kernel"],
                         state.params["Dense_0"]["kernel"])


def test_bad_nonfinite_mode():
  mesh = sharding.create_mesh(mesh_cfg(8, 1))
  with pytest.raises(ValueError, match="nonfinite='ignore'"):
    train_step.make_train_step(None, None, mesh, None, nonfinite="ignore")


def _preflight_job():
  """A pretrain config whose data does not exist, and a TinyNet job."""
  from bsf_jax.run import config_lib  # pylint: disable=g-import-not-at-top
  from bsf_jax.trainers import loop  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config("pretrain")
  config_lib.runlocal(config)
  config.data.modalities = ("t1", "flair")
  config.data.datalist = "/nonexistent/datalist.json"
  config.mesh = mesh_cfg(2, 1)
  model = TinyNet()

  def loss_fn(params, batch, rng):
    del rng
    pred = model.apply({"params": params}, batch["image"])
    return jnp.mean(pred**2), {}

  job = loop.Job(model=model, loss_fn=loss_fn, kind=kinds.SSL, evaluate=None)
  return config, job


def test_preflight_stops_before_data_or_checkpoints(tmp_path, monkeypatch):
  from bsf_jax.run import preflight  # pylint: disable=g-import-not-at-top
  from bsf_jax.trainers import loop  # pylint: disable=g-import-not-at-top
  config, job = _preflight_job()
  mesh = sharding.create_mesh(config.mesh, devices=jax.devices()[:2])
  # A device with 1 KiB: the step cannot fit; the error names the ways out
  # and comes before the (missing) datalist is read or a checkpoint opened.
  monkeypatch.setattr(preflight, "device_capacity", lambda d: 1024)
  workdir = tmp_path / "run"
  with pytest.raises(preflight.DoesNotFitError) as e:
    loop.run(config, str(workdir), job, mesh)
  for remedy in ("config.model.attention", "config.model.remat", "config.mesh.fsdp",
                 "config.data.batch_size", "bfloat16", "0.00 GiB"):
    assert remedy in str(e.value), (remedy, str(e.value))
  assert not any(p.name != ".lock" and not p.name.endswith(".lock")
                 for p in workdir.rglob("*")) if workdir.exists() else True
  # With room to spare the report states peak and capacity, and the run
  # goes on to the data, which is missing here.
  monkeypatch.setattr(preflight, "device_capacity", lambda d: 2**40)
  compiled = jax.jit(lambda x: x * 2).lower(jnp.ones(4)).compile()
  lines = preflight.check(compiled, jax.devices()[0], config)
  assert "of 1024.00 GiB" in lines[0]
  with pytest.raises(Exception, match="nonexistent"):
    loop.run(config, str(workdir), job, mesh)


def test_bench_scale_stage3_fsdp_gathers_only_parameters(tmp_path):
  """`bench scale` on the real stage-3 (Dice) step, 8 devices, fsdp=2, small
  model: only parameters cross devices (the stage-1 step's DP and FSDP
  programs are checked in ssl_step_test)."""
  import json  # pylint: disable=g-import-not-at-top
  from bsf_jax.bench import scale  # pylint: disable=g-import-not-at-top
  out = tmp_path / "rows.json"
  assert scale.main([
      "--devices", "8", "--sizes", "tiny", "--meshes", "fsdp",
      "--fsdp", "2", "--dtypes", "fp32", "--remat", "none", "--stages", "3",
      "--feature-size", "12", "--roi", "32", "--json", str(out)]) == 0
  (row,) = json.loads(out.read_text())
  assert row["stage"] == 3 and row["mesh"].startswith("fsdp"), row
  # No activation crosses devices: the largest collective is one parameter's
  # (encoder10's 3x3x3x192x192 f32 kernel here, 3.8 MiB; one image is
  # 32^3 x 4 channels).
  assert row["largest_collective_bytes"] <= 4 * 3**3 * 192 * 192, row
  assert row["ratio_to_params"] <= 3.5, row
  assert row["collective_bytes"].get("all-gather", 0) > 0, row
  assert row["collective_bytes"].get("reduce-scatter", 0) > 0, row
