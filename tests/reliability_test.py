"""Reliability of the main job (issue 7, items 1-3 and 6), on the CPU.

- Checkpoint safety: SIGKILL during an asynchronous save loses at most that
  save; the next start restores the last complete step.
- Exact resume: a run killed (SIGKILL at two points, SIGTERM once) and
  restarted with the same command ends bit-identical to an uninterrupted run.
- Non-finite guard: a NaN batch is skipped (params untouched, counted,
  logged) or halts the run with the last good checkpoint intact.
- A killed Grain worker gives an error within a bounded time, not a hang.

Training runs are real `python -m bsf_jax.main` subprocesses of the tiny
`runlocal` stage-1 model. They share one persistent XLA compilation cache so
only the first pays the full compile.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
  env = dict(os.environ)
  env.update(PYTHONPATH=ROOT, **extra)
  return env


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  """The small demo cohort, written once for this module."""
  from bsf_jax.data import demo
  out = str(tmp_path_factory.mktemp("cohort"))
  return demo.write_demo_cohort(out, subjects=3, seed=0, small=True)


# --- Checkpoint safety --------------------------------------------------------

_SAVER = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from bsf_jax import checkpointing
    workdir, n = sys.argv[1], int(sys.argv[2])
    manager = checkpointing.make_manager(workdir, keep_last=100)
    step = (manager.latest_step() or 0) + 1
    while True:
      # ~128 MB per save: long enough for the parent to kill it mid-write.
      state = {"w": jnp.full((n,), float(step), jnp.float32),
               "step": jnp.asarray(step)}
      checkpointing.save(manager, step, state, None, {"note": "test"},
                         force=True)
      print("SAVING", step, flush=True)
      manager.wait_until_finished()
      print("SAVED", step, flush=True)
      step += 1
""")


def _read_until(proc, prefix):
  """Reads the child's stdout until a line starting with `prefix`."""
  while True:
    line = proc.stdout.readline()
    if not line:
      raise AssertionError(f"child exited before printing {prefix!r}: "
                           f"{proc.stderr.read()[-3000:]}")
    if line.startswith(prefix):
      return line


def test_kill_during_async_save_keeps_last_complete(tmp_path):
  """SIGKILL mid-save, three times at different delays, then restore."""
  import jax
  from bsf_jax import checkpointing
  n = 32 * 2**20
  workdir = str(tmp_path / "w")
  ckpt_dir = checkpointing.checkpoint_dir(workdir)
  rng = np.random.default_rng(0)
  killed_mid_save = 0
  for attempt in range(3):
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVER, workdir, str(n)], env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
      _read_until(proc, "SAVED")  # At least one complete save this round.
      line = _read_until(proc, "SAVING")
      time.sleep(rng.uniform(0.0, 0.2))
      proc.send_signal(signal.SIGKILL)
      proc.wait(timeout=60)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    in_progress = int(line.split()[1])
    entries = os.listdir(ckpt_dir)
    partial = [e for e in entries if not e.isdigit()]
    if str(in_progress) not in entries:
      killed_mid_save += 1
      assert partial, f"no partial dir for step {in_progress}: {entries}"

    # The next start: the partial save is gone, the last complete one loads.
    manager = checkpointing.make_manager(workdir, keep_last=100)
    latest = manager.latest_step()
    assert latest in (in_progress - 1, in_progress), (latest, in_progress)
    abstract = {"w": jax.ShapeDtypeStruct((n,), np.float32,
                                          sharding=_single_device()),
                "step": jax.ShapeDtypeStruct((), np.int32,
                                             sharding=_single_device())}
    state, meta = checkpointing.restore(manager, latest, abstract, None)
    assert int(state["step"]) == latest
    w = np.asarray(state["w"])
    assert w.min() == w.max() == float(latest)
    assert meta["note"] == "test"
    manager.close()
    assert not [e for e in os.listdir(ckpt_dir) if not e.isdigit()], (
        "partial checkpoint dirs were not cleaned up")
  # The test is only meaningful if some kill really hit a save in flight.
  assert killed_mid_save >= 1


def _single_device():
  import jax
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


# --- A killed data worker -----------------------------------------------------

_WORKER_KILLER = textwrap.dedent("""
    import os, signal, sys, time
    import psutil
    from absl import flags
    from bsf_jax.data import pipeline

    def main():
      flags.FLAGS(sys.argv[:1])  # Grain reads absl flags in its workers.
      cfg = pipeline.default_config()
      cfg.update(dict(dataset="ukb", datalist=sys.argv[1], roi=(32, 32, 32),
                      batch_size=2, num_samples=2, workers=2,
                      modalities=("t1", "flair")))
      it = pipeline.make_train_iter(cfg, task="ssl", seed=0, process_index=0,
                                    process_count=1)
      next(it)
      workers = [c for c in psutil.Process().children()
                 if "resource_tracker" not in " ".join(c.cmdline())]
      assert len(workers) == 2, workers
      os.kill(workers[0].pid, signal.SIGKILL)
      t0 = time.monotonic()
      try:
        for _ in range(1000):
          next(it)
      except Exception as e:
        print(f"ERROR after {time.monotonic() - t0:.1f}s: "
              f"{type(e).__name__}: {e}", flush=True)
        sys.exit(3)
      print("NO ERROR", flush=True)

    if __name__ == "__main__":
      main()
""")


def test_killed_data_worker_errors_instead_of_hanging(tmp_path, cohort):
  script = tmp_path / "kill_worker.py"
  script.write_text(_WORKER_KILLER)
  # The hard timeout is what the test is about: a hang fails it here.
  result = subprocess.run(
      [sys.executable, str(script), cohort["ukb"]["datalist"]], env=_env(),
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 3, (result.stdout, result.stderr[-3000:])
  line = result.stdout.strip().splitlines()[-1]
  assert "Worker process was terminated unexpectedly" in line, line
  assert float(line.split()[2].rstrip("s:")) < 30, line


# --- Training runs through the real CLI --------------------------------------

NUM_STEPS = 8


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
  """One persistent compilation cache for every training subprocess."""
  return str(tmp_path_factory.mktemp("xla_cache"))


def _train_cmd(workdir, datalist, *extra):
  return [sys.executable, "-m", "bsf_jax.main",
          "--config=configs/stage1.py:runlocal", f"--workdir={workdir}",
          f"--config.data.datalist={datalist}",
          f"--config.train.num_steps={NUM_STEPS}",
          # A checkpoint every step: the kill can land anywhere, mid-save too.
          "--config.train.ckpt_every=1", "--config.train.keep_last=2",
          "--config.train.eval_every=0", *extra]


def _start(cmd, xla_cache, log):
  # 2 CPU devices: the runlocal batch of 2 splits over a real 2-way mesh.
  env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_COMPILATION_CACHE_DIR=xla_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  out = open(log, "w")
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out,
                          stderr=subprocess.STDOUT)


def _finish(proc, log, timeout=900):
  try:
    proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:  # Timed out: leave no training process behind.
      proc.kill()
      proc.wait()
  with open(log) as f:
    return proc.returncode, f.read()


def _steps(workdir):
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(e) for e in os.listdir(path) if e.isdigit()) if (
      os.path.isdir(path)) else []


def _params(workdir, step="latest"):
  import jax
  from bsf_jax import checkpointing
  params, _, got = checkpointing.restore_params(workdir, step)
  return {"/".join(str(k.key) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}, got


def _kill_then_resume(cmd, workdir, xla_cache, tmp_path, at_step, sig):
  """Runs `cmd`, sends `sig` once checkpoint `at_step` exists, reruns it."""
  log = str(tmp_path / f"{os.path.basename(workdir)}_1.log")
  proc = _start(cmd, xla_cache, log)
  try:
    deadline = time.monotonic() + 900
    while not [s for s in _steps(workdir) if s >= at_step]:
      assert proc.poll() is None, open(log).read()[-3000:]
      assert time.monotonic() < deadline, "no checkpoint within 900 s"
      time.sleep(0.02)
    proc.send_signal(sig)
    rc, text = _finish(proc, log)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  interrupted_at = max(_steps(workdir))
  # Otherwise the run finished before the signal and nothing was tested.
  assert interrupted_at < NUM_STEPS, (interrupted_at, text[-3000:])
  log2 = str(tmp_path / f"{os.path.basename(workdir)}_2.log")
  return rc, text, interrupted_at, _start(cmd, xla_cache, log2), log2


def test_exact_resume_after_sigkill_and_sigterm(cohort, xla_cache, tmp_path):
  """Killed at two steps (SIGKILL) and preempted once (SIGTERM): resumed
  runs end bit-identical to an uninterrupted one."""
  datalist = cohort["ukb"]["datalist"]
  ref = str(tmp_path / "ref")
  rc, text = _finish(_start(_train_cmd(ref, datalist), xla_cache,
                            str(tmp_path / "ref.log")), str(tmp_path / "ref.log"))
  assert rc == 0, text[-3000:]
  expected, step = _params(ref)
  assert step == NUM_STEPS

  # The three interrupted runs go side by side; each reuses the cache.
  cases = {"kill2": (2, signal.SIGKILL), "kill5": (5, signal.SIGKILL),
           "term3": (3, signal.SIGTERM)}
  resumed = {}
  for name, (at, sig) in cases.items():
    workdir = str(tmp_path / name)
    rc, text, interrupted_at, proc, log = _kill_then_resume(
        _train_cmd(workdir, datalist), workdir, xla_cache, tmp_path, at, sig)
    if sig == signal.SIGKILL:
      assert rc == -signal.SIGKILL, text[-3000:]
    else:
      # Preemption: a final save, then a clean exit.
      assert rc == 0, text[-3000:]
      assert "SIGTERM received" in text and "Preempted: saved step" in text
    resumed[name] = (workdir, interrupted_at, proc, log)
  for name, (workdir, interrupted_at, proc, log) in resumed.items():
    rc, text = _finish(proc, log)
    assert rc == 0, (name, text[-3000:])
    assert f"Resumed from" in text and f"step {interrupted_at}" in text, (
        name, text[-3000:])
    got, step = _params(workdir)
    assert step == NUM_STEPS
    assert got.keys() == expected.keys()
    different = [k for k in expected if not np.array_equal(expected[k], got[k])]
    assert not different, (name, interrupted_at, different[:5])


# --- Non-finite guard ---------------------------------------------------------

# The injection mechanism: the real CLI's main(), with the one function that
# turns host batches into device arrays wrapped so that the BAD_STEP-th
# training batch (eval batches carry a "mask") is all NaN. The NaN then flows
# through the real model, loss, gradients and guard.
_POISONED_MAIN = textwrap.dedent("""
    import sys
    import numpy as np
    from absl import app
    from bsf_jax import main as main_lib
    from bsf_jax.data import pipeline

    BAD_STEP = int(sys.argv.pop(1))
    _real = pipeline.to_global_batch
    _train_batches = [0]

    def _poisoned(batch, sharding):
      if "mask" not in batch:
        _train_batches[0] += 1
        if _train_batches[0] == BAD_STEP:
          batch = dict(batch, image=np.full_like(batch["image"], np.nan))
      return _real(batch, sharding)

    pipeline.to_global_batch = _poisoned

    if __name__ == "__main__":
      app.run(main_lib.main)
""")


def test_nonfinite_skip_and_halt(cohort, xla_cache, tmp_path):
  script = tmp_path / "poisoned_main.py"
  script.write_text(_POISONED_MAIN)
  datalist = cohort["ukb"]["datalist"]
  bad = 3
  runs = {}
  for mode in ("skip", "halt"):
    workdir = str(tmp_path / mode)
    cmd = _train_cmd(workdir, datalist, f"--config.train.nonfinite={mode}",
                     "--config.train.keep_last=20",
                     # Logged every 2 steps: "halt" must still never save
                     # a checkpoint after the bad step.
                     "--config.train.log_every=2")
    cmd[1:3] = [str(script), str(bad)]  # `-m bsf_jax.main` -> the wrapper.
    log = str(tmp_path / f"{mode}.log")
    runs[mode] = (workdir, _start(cmd, xla_cache, log), log)

  workdir, proc, log = runs["skip"]
  rc, text = _finish(proc, log)
  assert rc == 0, text[-3000:]
  assert f"Non-finite loss/gradients at steps [{bad}]" in text, text[-3000:]
  assert _steps(workdir)[-1] == NUM_STEPS
  before, _ = _params(workdir, bad - 1)
  after, _ = _params(workdir, bad)
  later, _ = _params(workdir, bad + 1)
  # The bad step changed nothing; the next good one trained again.
  assert all(np.array_equal(before[k], after[k]) for k in before)
  assert not all(np.array_equal(after[k], later[k]) for k in after)

  workdir, proc, log = runs["halt"]
  rc, text = _finish(proc, log)
  assert rc != 0, text[-3000:]
  assert "NonFiniteError" in text and f"at step {bad}" in text, text[-3000:]
  assert f"last good checkpoint is step {bad - 1}" in text, text[-3000:]
  assert _steps(workdir)[-1] == bad - 1, _steps(workdir)
  params, step = _params(workdir)  # Intact and restorable.
  assert step == bad - 1
  assert all(np.isfinite(v).all() for v in params.values())


# --- Cluster faults: one writer per workdir -----------------------------------


def _write_lock(path, record):
  import json
  with open(path, "w") as f:
    json.dump(record, f)


def test_workdir_lock_refuses_a_live_holder_and_takes_over_stale_ones(
    tmp_path, monkeypatch, caplog):
  import logging
  import socket
  from bsf_jax import workdir_lock as wl
  monkeypatch.delenv("SLURM_JOB_ID", raising=False)
  monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
  workdir = str(tmp_path / "w")
  path = wl.lock_path(workdir)
  lock = wl.acquire(workdir)
  with pytest.raises(wl.WorkdirLockedError) as info:
    wl.acquire(workdir)
  message = str(info.value)
  assert f"host {socket.gethostname()}, PID {os.getpid()}" in message, message
  assert path in message and "\n" not in message
  lock.release()
  assert not os.path.exists(path)

  # Stale on this host: the holder's process is gone, or its PID now belongs
  # to a later process (here: this one, with another start time).
  gone = subprocess.Popen(["true"])
  gone.wait()
  for name, record in {
      "gone": dict(wl.holder_record(), pid=gone.pid, token="gone"),
      "pid reused": dict(wl.holder_record(), pid_start_ticks=1,
                         token="reused")}.items():
    _write_lock(path, record)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      lock = wl.acquire(workdir)
    assert "Took over the stale lock" in caplog.text, name
    assert lock.record["token"] in open(path).read(), name
    lock.release()

  # Another host: a requeue of the same SLURM job supersedes its earlier
  # incarnation; a different job cannot be checked and is refused.
  monkeypatch.setenv("SLURM_JOB_ID", "4242")
  monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
  _write_lock(path, dict(host="node-a", pid=7, slurm_job_id="4242",
                         slurm_restart_count=0, token="old"))
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    wl.acquire(workdir).release()
  assert "SLURM job 4242 was requeued" in caplog.text
  foreign = dict(host="node-b", pid=7, slurm_job_id="999",
                 slurm_restart_count=0, started="then", token="other")
  _write_lock(path, foreign)
  before = open(path).read()
  with pytest.raises(wl.WorkdirLockedError,
                     match="host node-b, PID 7, SLURM job 999"):
    wl.acquire(workdir)
  assert open(path).read() == before


# --- Cluster faults: automatic requeue at the SLURM time limit ---------------

_FAKE_SRUN = """#!/bin/bash
echo "srun $*" >> "$FAKE_LOG"
[[ -n ${FAKE_DONE:-} ]] && exit 0
trap 'echo "srun: SIGTERM" >> "$FAKE_LOG"; sleep 0.2; echo "srun: saved" >> "$FAKE_LOG"; exit ${FAKE_TERM_STATUS:-0}' TERM
while :; do sleep 0.05; done
"""


def test_slurm_script_requeues_itself_at_the_time_limit(tmp_path):
  """launch/slurm_stage1.sbatch with fake `srun` and `scontrol` on PATH."""
  fake_bin = tmp_path / "bin"
  fake_bin.mkdir()
  (fake_bin / "srun").write_text(_FAKE_SRUN)
  (fake_bin / "scontrol").write_text(
      '#!/bin/bash\necho "scontrol $*" >> "$FAKE_LOG"\n')
  for f in fake_bin.iterdir():
    f.chmod(0o755)

  def run(name, signal_it, **env):
    log = tmp_path / f"{name}.log"
    log.write_text("")
    proc = subprocess.Popen(
        ["bash", "launch/slurm_stage1.sbatch", "runs/s1", "--config.seed=3"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=_env(PATH=f"{fake_bin}:{os.environ['PATH']}",
                            FAKE_LOG=str(log), SLURM_JOB_ID="4242", **env))
    try:
      if signal_it:
        deadline = time.monotonic() + 30
        while "srun" not in log.read_text():
          assert time.monotonic() < deadline and proc.poll() is None
          time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)  # What --signal=B:USR1@300 sends.
      out = proc.communicate(timeout=30)[0]
    finally:
      if proc.poll() is None:
        proc.kill()
    return proc.returncode, log.read_text().splitlines(), out

  # The time limit: the run is told to save, ends, then the job requeues.
  rc, calls, out = run("limit", True)
  assert rc == 0, out
  assert calls[0].startswith("srun --kill-on-bad-exit=1 python -m bsf_jax.main")
  assert "--workdir=runs/s1 --config.seed=3" in calls[0]
  assert calls[1:] == ["srun: SIGTERM", "srun: saved",
                       "scontrol requeue 4242"], (calls, out)
  # A run that ends on its own is not requeued.
  rc, calls, out = run("done", False, FAKE_DONE="1")
  assert rc == 0 and not [c for c in calls if "scontrol" in c], (calls, out)
  # Nor one that failed while saving, nor one past BSF_MAX_REQUEUES.
  rc, calls, out = run("failed", True, FAKE_TERM_STATUS="3")
  assert rc == 3 and "not requeued" in out
  assert not [c for c in calls if "scontrol" in c], (calls, out)
  rc, calls, out = run("max", True, SLURM_RESTART_COUNT="20")
  assert rc == 0 and "already restarted 20 times" in out
  assert not [c for c in calls if "scontrol" in c], (calls, out)
