"""Multi-host: two local CPU processes train together and agree.

The test starts this file twice as a worker (`python multihost_test.py worker
<process_id> <port> <out_dir>`), each process with 2 fake CPU devices, joined
by `jax.distributed.initialize` into one 4-device mesh. Each process feeds
only its own half of the global batch. After 2 steps both must hold identical
parameters, equal to a single-process run on 4 devices with the whole batch.
Then each process scores its own share of fine-tuning validation volumes
(every other one, padded as `make_eval_iter` pads), and both must report the
mean metrics of all volumes, as one process scoring them all does.

A run without a datalist (`datalists.run_datalist`): process 0 scans the
data folder once and writes the datalist into the workdir, process 1 waits and
reads it without scanning; when process 0's scan fails, both raise.

Also unit tests for `distributed.resolve` (SLURM auto-detection rules) that
need no processes.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

TIMEOUT_S = 480
GLOBAL_BATCH = 8
STEPS = 2


def _train(mesh):
  """2 DP steps of the sharding test's TinyNet, feeding local rows only."""
  import jax  # pylint: disable=g-import-not-at-top
  from bsf_jax.step import optim, sharding, train_state, train_step
  import sharding_test as st

  model = st.TinyNet()
  tx = optim.make_optimizer(st.optim_cfg(), total_steps=10)
  state, state_sh = train_state.create_train_state(
      model, tx, jax.random.key(0), (1, st.ROI, st.ROI, st.ROI, st.IN_CH),
      mesh, fsdp=False)
  step = train_step.make_train_step(st.tiny_loss_fn(model), tx, mesh, state_sh)
  data_sh = sharding.data_sharding(mesh)
  losses = []
  for i in range(STEPS):
    full = st.tiny_batch(i, GLOBAL_BATCH)
    # The rows this process's devices hold; a real pipeline reads only these.
    rows = sorted({idx[0].start or 0 for idx in
                   data_sh.addressable_devices_indices_map(
                       full["x"].shape).values()})
    per_dev = GLOBAL_BATCH // mesh.size
    local = {k: np.concatenate([v[r:r + per_dev] for r in rows])
             for k, v in full.items()}
    batch = {k: jax.make_array_from_process_local_data(
        data_sh, v, full[k].shape) for k, v in local.items()}
    state, metrics = step(state, batch, jax.random.key(1))
    losses.append(np.asarray(metrics["loss"].addressable_data(0)))
  leaves = jax.tree_util.tree_leaves_with_path(state.params)
  out = {optim.param_path(p): np.asarray(x.addressable_data(0))
         for p, x in leaves}
  out["losses"] = np.stack(losses)
  return out


N_VOLUMES = 5


def _seg_config():
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict({
      "model": {"out_channels": 3}, "data": {"label_format": "brats2021"},
      "seg": {"threshold": 0.5}})


def _validate(process_id, process_count):
  """This process's share of the volumes -> the gathered val_* means."""
  from bsf_jax.infer import scoring  # pylint: disable=g-import-not-at-top
  config = _seg_config()
  rng = np.random.default_rng(0)
  volumes = [(rng.uniform(size=(8, 8, 8, 3)),
              (rng.uniform(size=(8, 8, 8, 3)) > 0.6).astype(np.float32))
             for _ in range(N_VOLUMES)]
  volumes[1][1][..., 2] = 0  # no ET: an undefined ET Dice, skipped
  padded = volumes + [None] * (-len(volumes) % process_count)
  per_volume = [None if v is None else scoring.volume_metrics(
      v[0], v[1], config.data.label_format, config.seg.threshold)
                for v in padded[process_id::process_count]]
  return scoring.mean_volume_metrics(per_volume,
                                      scoring.volume_metric_keys(
      config.data.label_format, config.model.out_channels))


def _join(process_id, port):
  """Joins the 2-process job."""
  from bsf_jax.run import distributed  # pylint: disable=g-import-not-at-top
  cfg = distributed.default_config()
  cfg.coordinator_address = f"localhost:{port}"
  cfg.num_processes = 2
  cfg.process_id = process_id
  cfg.initialization_timeout = 60
  distributed.initialize(cfg)


def _worker(process_id, port, out_dir):
  """One process of the 2-process training job; writes OUT_DIR/p{id}.npz."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from bsf_jax.step import sharding

  out_path = os.path.join(out_dir, f"p{process_id}.npz")
  _join(process_id, port)
  import jax  # pylint: disable=g-import-not-at-top
  assert jax.process_count() == 2 and jax.device_count() == 4, (
      jax.process_count(), jax.devices())
  mesh = sharding.create_mesh(ml_collections.ConfigDict({"data": -1,
                                                         "fsdp": 1}))
  out = _train(mesh)
  out.update(_validate(process_id, 2))
  np.savez(out_path, **out)
  jax.distributed.shutdown()


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_two(mode, *args):
  """Runs `python multihost_test.py MODE PROCESS_ID PORT *args` for process
  ids 0 and 1 side by side; returns their outputs (both must exit 0)."""
  port = _free_port()
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
       env.get("PYTHONPATH", "")])
  for var in ("SLURM_JOB_ID", "JAX_COORDINATOR_ADDRESS"):
    env.pop(var, None)
  procs = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), mode, str(i), str(port),
       *map(str, args)], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=TIMEOUT_S)[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    tails = [p.communicate()[0][-2000:] for p in procs]
    pytest.fail(f"2-process run did not finish in {TIMEOUT_S}s; output:\n"
                + "\n---\n".join(tails))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} failed:\n{logs[i][-3000:]}"
  return logs


def test_two_processes_end_with_identical_params(tmp_path):
  _run_two("worker", tmp_path)
  outs = [tmp_path / f"p{i}.npz" for i in range(2)]

  p0, p1 = (dict(np.load(o)) for o in outs)
  assert p0.keys() == p1.keys()
  for k in p0:
    np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)

  # Same result as one process driving 4 devices with the whole batch.
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from bsf_jax.step import sharding
  mesh = sharding.create_mesh(
      ml_collections.ConfigDict({"data": -1, "fsdp": 1}),
      devices=jax.devices()[:4])
  ref = _train(mesh)
  val = _validate(0, 1)
  assert set(val) >= {"val_dice_mean", "val_dice_ET"}
  ref.update(val)
  assert set(ref) == set(p0)
  for k in ref:
    np.testing.assert_allclose(p0[k], ref[k], rtol=1e-5, atol=1e-6,
                               err_msg=k)


def _cfg(**kw):
  from bsf_jax.run import distributed  # pylint: disable=g-import-not-at-top
  cfg = distributed.default_config()
  cfg.update(kw)
  return cfg


_SLURM = {"SLURM_JOB_ID": "1234", "SLURM_STEP_NODELIST": "gpu[003-004]",
          "SLURM_NTASKS": "16", "SLURM_STEP_NUM_NODES": "2",
          "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}


def test_resolve_single_host_is_noop():
  from bsf_jax.run import distributed  # pylint: disable=g-import-not-at-top
  assert distributed.resolve(_cfg(), env={}) is None
  distributed.initialize(_cfg())  # safe: nothing set in the test env
  assert distributed.resolve(_cfg(), env={"SLURM_JOB_ID": "5"}) is None
  assert distributed.resolve(_cfg(), env={**_SLURM, "SLURM_NTASKS": "1"}
                             ) is None


def test_resolve_slurm_process_per_gpu_and_per_node():
  from bsf_jax.run import distributed  # pylint: disable=g-import-not-at-top
  plan = distributed.resolve(_cfg(), env=_SLURM)
  port = 1234 % 4096 + 65535 - 4096 + 1
  assert plan == distributed.Plan(f"gpu003:{port}", 16, 9, (1,), "slurm")
  per_node = distributed.resolve(
      _cfg(), env={**_SLURM, "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
                   "SLURM_LOCALID": "0"})
  assert per_node.local_device_ids is None and per_node.num_processes == 2
  gpus_per_task = distributed.resolve(
      _cfg(), env={**_SLURM, "CUDA_VISIBLE_DEVICES": "5"})
  assert gpus_per_task.local_device_ids is None
  forced = distributed.resolve(_cfg(local_device_ids="0,1"), env=_SLURM)
  assert forced.local_device_ids == (0, 1)


def test_resolve_errors_name_the_problem():
  from bsf_jax.run import distributed  # pylint: disable=g-import-not-at-top
  half = {k: v for k, v in _SLURM.items() if k != "SLURM_STEP_NODELIST"}
  with pytest.raises(ValueError, match="SLURM_STEP_NODELIST missing"):
    distributed.resolve(_cfg(), env=half)
  with pytest.raises(ValueError, match="num_processes=-1"):
    distributed.resolve(_cfg(coordinator_address="h:1"), env={})
  with pytest.raises(ValueError, match="without coordinator_address"):
    distributed.resolve(_cfg(num_processes=2, process_id=0), env={})
  explicit = distributed.resolve(
      _cfg(), env={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
                   "JAX_PROCESS_ID": "1", **_SLURM})
  assert explicit == distributed.Plan("h:1", 2, 1, None, "env")
  with pytest.raises(ValueError, match="SLURM_PROCID='x'"):
    distributed.resolve(_cfg(), env={**_SLURM, "SLURM_PROCID": "x"})


def _scanner(process_id, port, root, tmp):
  """One process of a 2-process run without a datalist (`run_datalist`).

  Writes what it saw to TMP/scanner{process_id}.json, not to stdout: XLA's
  CPU collectives (Gloo, used by `run_datalist`'s broadcast) print "[Gloo]
  Rank N is connected to ..." to stdout from their own threads, in several
  writes when stdout is unbuffered (PYTHONUNBUFFERED), so a line printed
  here can land in the middle of theirs.
  """
  import json  # pylint: disable=g-import-not-at-top
  from bsf_jax.data import DataError, atomic_io, datalists, pipeline  # pylint: disable=g-import-not-at-top
  _join(process_id, port)
  real_scan = datalists.scan

  def scan(cfg):  # Every scan leaves a line naming its process.
    with open(os.path.join(tmp, "scans.log"), "a") as f:
      f.write(f"{process_id}\n")
    return real_scan(cfg)

  datalists.scan = scan
  cfg = pipeline.default_config()
  cfg.update(dict(dataset="ukb", root=root, min_slices=50))
  # Process 0's scan fails: every process raises, none waits forever.
  empty = cfg.copy_and_resolve_references()
  empty.root = os.path.join(tmp, "empty")
  outcome = {"error": None}
  try:
    datalists.run_datalist(empty, os.path.join(tmp, "wd_empty"))
  except DataError as e:
    outcome["error"] = str(e)
  cfg.datalist = datalists.run_datalist(cfg, os.path.join(tmp, "wd"))
  outcome["records"] = list(datalists.load_datalist(cfg))
  atomic_io.write_text(os.path.join(tmp, f"scanner{process_id}.json"),
                       json.dumps(outcome))


def test_two_processes_scan_once(tmp_path):
  """Without a datalist, process 0 scans and writes it; process 1 reads it."""
  import json  # pylint: disable=g-import-not-at-top
  from bsf_jax.data import datalists, demo, pipeline  # pylint: disable=g-import-not-at-top
  root = demo.write_demo_cohort(str(tmp_path / "cohort"), subjects=3, seed=0,
                                small=True, datasets=("ukb",))["ukb"]["root"]
  os.makedirs(tmp_path / "empty")
  logs = _run_two("scanner", root, tmp_path)
  with open(tmp_path / "scans.log") as f:
    assert f.read().split() == ["0", "0"]  # the failed scan, the good one
  outcomes = []
  for i in range(2):
    with open(tmp_path / f"scanner{i}.json") as f:
      outcomes.append(json.load(f))
  assert "no ukb subjects found" in str(outcomes[0]["error"]), logs[0][-3000:]
  # Process 1 says why too: process 0 leaves its reason beside the datalist.
  assert "process 0 could not scan" in str(outcomes[1]["error"]), logs[1][-3000:]
  assert "no ukb subjects found" in str(outcomes[1]["error"]), logs[1][-3000:]
  records = [o["records"] for o in outcomes]
  cfg = pipeline.default_config()
  cfg.update(dict(dataset="ukb", root=root, min_slices=50))
  assert records[0] == records[1] == json.loads(json.dumps(
      datalists.load_datalist(cfg)))
  assert os.path.isfile(tmp_path / "wd" / datalists.RUN_DATALIST)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  if len(sys.argv) == 5 and sys.argv[1] == "worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
  elif len(sys.argv) == 6 and sys.argv[1] == "scanner":
    _scanner(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
  else:
    sys.exit(f"usage: {sys.argv[0]} worker|scanner PROCESS_ID PORT ARGS...")
