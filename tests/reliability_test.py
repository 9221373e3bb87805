"""Reliability of the main job on the CPU (docs/reliability.md).

- Checkpoint safety: SIGKILL during an asynchronous save loses at most that
  save; the next start restores the last complete step.
- Exact resume: a run killed (SIGKILL at two points, SIGTERM once) and
  restarted with the same command ends bit-identical to an uninterrupted run,
  also when its newest checkpoint was truncated in between; a second run on
  a workdir in use refuses.
- Non-finite guard: a NaN batch is skipped (params untouched, counted,
  logged) or halts the run with the last good checkpoint intact.
- A killed Grain worker gives an error within a bounded time, not a hang.
- Cluster faults: the workdir lock, the SLURM script's requeue (fake
  `srun`/`scontrol`), atomic exports, one-line errors for corrupt steps, and
  two processes agreeing on the step they fall back to.

Training runs are real `python -m bsf_jax.main` subprocesses of the tiny
`runlocal` stage-1 model. They share one persistent XLA compilation cache so
only the first pays the full compile.
"""

import os
import re
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
    from bsf_jax.run import checkpointing
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
  from bsf_jax.run import checkpointing
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
    # The child may have finished that save and started more during the
    # sleep (a fast disk): the save in flight is the last one it announced.
    for later in proc.stdout.read().splitlines():
      if later.startswith("SAVING"):
        line = later
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

# Kills one of two Grain workers at the moment that used to hang the trainer
# for good: both workers idle, i.e. blocked halfway through writing a 512 KiB
# batch into their pipes (workers.py). Then the next `next()` must raise.
# argv: datalist, then "exit" (a normal exit follows the error) or "killed"
# (the trainer itself is SIGKILLed after the error: its other worker must exit
# on its own instead of living on as an orphan).
_WORKER_KILLER = textwrap.dedent("""
    import faulthandler, os, signal, sys, time
    import psutil
    from absl import flags
    from bsf_jax.data import pipeline

    HANG_S = 300

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
      print("WORKERS", *[f"{w.pid}:{w.create_time()}" for w in workers], flush=True)
      # Wait until both workers' buffers are full and they sit blocked in a
      # write (no CPU used for a second); the kill works at any moment, this
      # is only the moment that used to hang.
      idle, t0 = 0, time.monotonic()
      while idle < 4 and time.monotonic() - t0 < 120:
        before = [sum(w.cpu_times()[:2]) for w in workers]
        time.sleep(0.25)
        idle = idle + 1 if before == [sum(w.cpu_times()[:2]) for w in workers] else 0
      os.kill(workers[0].pid, signal.SIGKILL)
      # A hang ends here: every thread's stack, then exit code 1. Nothing
      # legitimate takes minutes: the error comes within a second or so.
      faulthandler.dump_traceback_later(HANG_S, exit=True)
      try:
        for _ in range(1000):
          next(it)
      except Exception as e:
        print(f"ERROR {type(e).__name__}: {e}", flush=True)
        if sys.argv[2] == "killed":
          os.kill(os.getpid(), signal.SIGKILL)
        sys.exit(3)
      print("NO ERROR", flush=True)

    if __name__ == "__main__":
      main()
""")


def test_killed_data_worker_errors_instead_of_hanging(tmp_path, cohort):
  """The error comes instead of a hang; no worker outlives the trainer,
  whether it exits normally after the error or is killed."""
  import psutil
  script = tmp_path / "kill_worker.py"
  script.write_text(_WORKER_KILLER)
  # The script bounds the hang itself (HANG_S after the kill, with a stack
  # dump); the outer timeout only bounds a start-up that never ends.
  procs = {mode: subprocess.Popen(
      [sys.executable, str(script), cohort["ukb"]["datalist"], mode], env=_env(),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for mode in ("exit", "killed")}
  for mode, proc in procs.items():
    try:
      out, err = proc.communicate(timeout=900)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    assert proc.returncode == (3 if mode == "exit" else -signal.SIGKILL), (
        mode, "a hang dumps every thread's stack here:", out, err[-6000:])
    lines = out.strip().splitlines()
    assert lines[-1].startswith("ERROR"), (mode, out)
    # Ours, or Grain's own when it saw the death first: either names it.
    assert ("WorkerDiedError: data worker" in lines[-1] and "SIGKILL" in lines[-1]) or (
        "Worker process was terminated unexpectedly" in lines[-1]), lines[-1]
    workers = [tuple(w.split(":")) for w in lines[0].split()[1:]]
    # They exit within a second of their parent; a minute is for a loaded
    # machine. An orphan stays blocked forever.
    deadline = time.monotonic() + 60
    while _running(workers) and time.monotonic() < deadline:
      time.sleep(0.2)
    assert not _running(workers), (mode, "workers outlived the trainer")


def _running(workers):
  """The (pid, start time) of `workers` still running (a zombie has exited;
  another start time is another process that got the PID)."""
  import psutil
  running = []
  for pid, start in workers:
    try:
      process = psutil.Process(int(pid))
      if (process.create_time() == float(start) and
          process.status() != psutil.STATUS_ZOMBIE):
        running.append(pid)
    except psutil.NoSuchProcess:
      pass
  return running


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
  from bsf_jax.run import checkpoint_reads
  params, _, got = checkpoint_reads.restore_params(workdir, step)
  return {"/".join(str(k.key) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}, got


def _kill_then_resume(cmd, workdir, xla_cache, tmp_path, at_step, sig,
                      truncate=False):
  """Runs `cmd`, sends `sig` once checkpoint `at_step` exists, reruns it
  (after cutting the newest checkpoint's biggest file if `truncate`)."""
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
  if truncate:
    assert _truncate_newest(workdir) == interrupted_at
    interrupted_at = _steps(workdir)[-2]  # Where the resume must start.
  log2 = str(tmp_path / f"{os.path.basename(workdir)}_2.log")
  return rc, text, interrupted_at, _start(cmd, xla_cache, log2), log2


def test_exact_resume_after_sigkill_and_sigterm(cohort, xla_cache, tmp_path):
  """Killed (SIGKILL) and preempted (SIGTERM): resumed runs end
  bit-identical to an uninterrupted one. The killed run also finds its
  newest checkpoint truncated, resumes from the step before and takes over
  its stale lock. A second run started on the reference's workdir refuses,
  and the reference ends unharmed."""
  from bsf_jax.run import workdir_lock
  datalist = cohort["ukb"]["datalist"]
  ref = str(tmp_path / "ref")
  ref_proc = _start(_train_cmd(ref, datalist), xla_cache,
                    str(tmp_path / "ref.log"))
  deadline = time.monotonic() + 300
  while not os.path.exists(workdir_lock.lock_path(ref)):
    assert ref_proc.poll() is None and time.monotonic() < deadline
    time.sleep(0.05)
  second = _start(_train_cmd(ref, datalist), xla_cache,
                  str(tmp_path / "second.log"))
  rc, text = _finish(second, str(tmp_path / "second.log"))
  assert rc == 1, text[-3000:]
  refusal = [l for l in text.splitlines() if l.startswith("error:")]
  assert len(refusal) == 1 and "is in use by another run" in refusal[0], text
  assert f"PID {ref_proc.pid}" in refusal[0], refusal
  rc, text = _finish(ref_proc, str(tmp_path / "ref.log"))
  assert rc == 0, text[-3000:]
  expected, step = _params(ref)
  assert step == NUM_STEPS
  assert not os.path.exists(workdir_lock.lock_path(ref))  # Released.

  # The interrupted runs go side by side; each reuses the cache.
  cases = {"kill5": (5, signal.SIGKILL, True),
           "term3": (3, signal.SIGTERM, False)}
  resumed = {}
  for name, (at, sig, truncate) in cases.items():
    workdir = str(tmp_path / name)
    rc, text, interrupted_at, proc, log = _kill_then_resume(
        _train_cmd(workdir, datalist), workdir, xla_cache, tmp_path, at, sig,
        truncate)
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
    assert "Resumed from" in text and f"step {interrupted_at}" in text, (
        name, text[-3000:])
    # A killed run leaves its lock; the restart sees the PID gone.
    assert ("Took over the stale lock" in text) == (name != "term3"), name
    if cases[name][2]:
      # The cut step is reported in one line and moved aside, not deleted.
      aside = os.listdir(os.path.join(workdir, "corrupt_checkpoints"))
      assert len(aside) == 1 and int(aside[0]) > interrupted_at, aside
      assert f"checkpoint step {aside[0]} (" in text and (
          "cannot be restored" in text), text[-3000:]
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
    import runpy
    import sys
    import numpy as np
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
      # `python -m bsf_jax.main` in this process (a tool's flags are absl's
      # only when it runs as the program: bsf_jax/tool_flags.py).
      runpy.run_module("bsf_jax.main", run_name="__main__")
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
  from bsf_jax.run import workdir_lock as wl
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


# --- Cluster faults: corrupt checkpoints, atomic exports ---------------------


def _digest(root):
  import hashlib
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def _truncate_newest(workdir):
  """Cuts the biggest file of the newest step in half; returns the step."""
  step = _steps(workdir)[-1]
  state = os.path.join(workdir, "checkpoints", str(step), "state")
  files = [os.path.join(d, f) for d, _, fs in os.walk(state) for f in fs]
  biggest = max(files, key=os.path.getsize)
  os.truncate(biggest, os.path.getsize(biggest) // 2)
  return step


@pytest.fixture(scope="module")
def ssl_run(tmp_path_factory):
  """A stage-1 workdir (runlocal SSL head, zero params) at steps 1 and 2."""
  import jax
  import jax.numpy as jnp
  from bsf_jax.run import checkpointing, config_lib
  from bsf_jax.infer import contract as contract_lib
  from bsf_jax import models
  config = config_lib.load_file(os.path.join(ROOT, "configs", "stage1.py"),
                                "runlocal")
  model = models.from_config(config)
  x = jnp.zeros((1, *config.data.roi, len(config.data.modalities)))
  params = jax.tree.map(
      lambda a: np.zeros(a.shape, a.dtype),
      jax.eval_shape(lambda k: model.init({"params": k, "dropout": k}, x),
                     jax.random.key(0))["params"])
  workdir = str(tmp_path_factory.mktemp("ssl") / "run")
  manager = checkpointing.make_manager(workdir, async_save=False)
  for step in (1, 2):
    checkpointing.save(manager, step, {"params": params, "step": step}, None,
                       dict(contract=contract_lib.input_contract(config)), force=True)
  manager.close()
  return workdir


def test_export_into_new_nested_folders_is_atomic(ssl_run, tmp_path,
                                                  monkeypatch):
  import errno
  import torch
  from bsf_jax.data import atomic_io
  from bsf_jax.weights import export
  out = tmp_path / "a" / "b" / "encoder.pt"
  line = export.export(ssl_run, str(out), "monai")
  assert "step 2" in line and str(out) in line
  n = len(torch.load(out, weights_only=True))
  assert n > 0 and os.listdir(out.parent) == ["encoder.pt"]
  st = tmp_path / "c" / "d" / "s1.safetensors"
  export.export(ssl_run, str(st), "safetensors", 1)
  from safetensors import safe_open
  with safe_open(st, "np") as f:  # The whole SSL head, under its own keys.
    assert f.metadata()["step"] == "1" and len(f.keys()) > n

  # An export interrupted mid-write (Ctrl-C) leaves no file at the target;
  # a full disk is one clear line and the earlier export stays as it was.
  real_save = torch.save

  def interrupted(error):
    def save(obj, f):
      real_save(obj, f)
      f.truncate(f.tell() // 2)
      raise error
    return save

  fresh = tmp_path / "e" / "never.pt"
  monkeypatch.setattr(torch, "save", interrupted(KeyboardInterrupt()))
  with pytest.raises(KeyboardInterrupt):
    export.export(ssl_run, str(fresh), "monai")
  assert os.listdir(fresh.parent) == []
  before = out.read_bytes()
  monkeypatch.setattr(torch, "save", interrupted(
      OSError(errno.ENOSPC, "No space left on device")))
  with pytest.raises(atomic_io.OutputError) as info:
    export.export(ssl_run, str(out), "monai")
  assert "No space left" in str(info.value)
  assert f"the earlier {out} is unchanged" in str(info.value)
  assert out.read_bytes() == before and os.listdir(out.parent) == [
      "encoder.pt"]


def test_corrupt_newest_checkpoint_gives_one_line_errors(ssl_run, tmp_path):
  """export (CLI), predict and evaluate name the step and suggest --step."""
  import ml_collections
  import shutil
  from bsf_jax.run import checkpointing
  from bsf_jax.weights import prediction
  from bsf_jax.weights import evaluation
  workdir = str(tmp_path / "run")
  shutil.copytree(ssl_run, workdir)
  bad = _truncate_newest(workdir)
  before = _digest(workdir)
  out = tmp_path / "missing" / "folder" / "s1.pt"
  cmd = [sys.executable, "-m", "bsf_jax.export", f"--workdir={workdir}"]
  procs = [subprocess.Popen(cmd + extra, cwd=ROOT, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for extra in ([f"--out={tmp_path / 'x.pt'}"],
                         [f"--out={out}", "--step=1"])]
  (_, err), (ok, err_ok) = [p.communicate(timeout=300) for p in procs]
  assert procs[0].returncode == 1
  errors = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, err[-3000:]
  # Only that line: Orbax's INFO/WARNING chatter stays hidden without
  # --verbosity.
  assert err.strip() == errors[0], err[-3000:]
  assert f"checkpoint step {bad} (" in errors[0], errors[0]
  assert "--step (kept: [1])" in errors[0], errors[0]
  assert procs[1].returncode == 0 and "step 1" in ok, err_ok[-3000:]
  assert out.exists() and not (tmp_path / "x.pt").exists()
  needle = f"checkpoint step {bad} ("
  with pytest.raises(checkpointing.CheckpointError, match=re.escape(needle)):
    prediction.predict_subjects(workdir, "unused", str(tmp_path / "p"), "latest")
  config = ml_collections.ConfigDict({"data": {"label_format": "brats2021"}})
  with pytest.raises(checkpointing.CheckpointError, match="--step"):
    evaluation.evaluate_run(workdir, config, str(tmp_path / "ev"), "latest")
  assert _digest(workdir) == before  # Read-only tools move nothing.


_AGREE = textwrap.dedent("""
    import os, sys
    import numpy as np
    from bsf_jax.run import distributed
    pid, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    cfg = distributed.default_config()
    cfg.update(dict(coordinator_address=f"localhost:{port}", num_processes=2,
                    process_id=pid, initialization_timeout=60))
    distributed.initialize(cfg)
    import grain, jax, jax.numpy as jnp
    from jax.experimental import multihost_utils
    from bsf_jax.run import checkpointing
    sh = jax.sharding.NamedSharding(jax.make_mesh((4,), ("data",)),
                                    jax.sharding.PartitionSpec("data"))
    def data():
      return iter(grain.MapDataset.range(100).seed(pid).shuffle().repeat()
                  .to_iter_dataset())
    manager = checkpointing.make_manager(workdir, async_save=False)
    it = data()
    for step in (1, 2):
      next(it)
      w = jax.make_array_from_callback(
          (8,), sh, lambda idx: np.full((8,), step, np.float32)[idx])
      checkpointing.save(manager, step, {"w": w}, it, {"contract": {}},
                         force=True)
    if pid == 1:  # A file of step 2 that only process 1 reads.
      with open(os.path.join(workdir, "checkpoints", "2", "data",
                             "process_1-of-2.json"), "w") as f:
        f.write("{")
    multihost_utils.sync_global_devices("cut")
    abstract = {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=sh)}
    state, _, step = checkpointing.restore_newest(manager, abstract, data(), {})
    print("RESTORED", step, float(state["w"].addressable_data(0)[0]),
          sorted(manager.all_steps()), flush=True)
    jax.distributed.shutdown()
""")


def test_processes_agree_on_the_fallback_step(tmp_path):
  """Step 2 fails on process 1 only: both resume from step 1, no hang."""
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  workdir = str(tmp_path / "w")
  env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  env.pop("SLURM_JOB_ID", None)
  procs = [subprocess.Popen(
      [sys.executable, "-c", _AGREE, str(i), str(port), workdir], env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    logs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
    assert "RESTORED 1 1.0 [1]" in log, log[-3000:]
  assert "process_1-of-2.json) cannot be restored" in logs[1], logs[1][-3000:]
  assert "failed to restore on another process" in logs[0], logs[0][-3000:]
  assert os.listdir(os.path.join(workdir, "corrupt_checkpoints")) == ["2"]
