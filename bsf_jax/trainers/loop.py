"""The training loop shared by every trainer.

A trainer (pretrain.py, finetune.py) builds a `Job`: a model, a loss
function, the data, an evaluation function and how to rank checkpoints. This
module runs it: sharded state, resume, the jitted step, logging, evaluation,
checkpoints, preemption and the non-finite guard. One place, so the two
trainers cannot drift apart in how they save or resume.

Resume order (as big_vision): the workdir's latest checkpoint, else
`config.init_from` (a previous stage, weights only), else from scratch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from bsf_jax.data import datalists, pipeline
from bsf_jax.infer import contract as contract_lib
from bsf_jax.run import checkpointing, config_lib, kinds, metric_writers, preflight, workdir_lock
from bsf_jax.step import sharding, train_state
from bsf_jax.step import train_step as train_step_lib
from bsf_jax.weights import transfer


class NonFiniteError(RuntimeError):
  """Training stopped because a step's loss or gradients were not finite."""


@dataclasses.dataclass
class Job:
  """What a trainer hands to `run`.

  Attributes:
    model: the flax module being trained.
    loss_fn: `(params, batch, rng) -> (loss, metrics)`, see train_step.py.
    kind: the kind of run (`kinds.SSL` or `kinds.SEG`): its data pipeline,
      whether batches are labelled, and the metric of `evaluate`'s output
      that ranks checkpoints.
    evaluate: `(params, step) -> dict of floats` with validation metrics
      (host values), or None.
    images: optional `(params, step) -> dict name -> [N,H,W,C] images`.
  """
  model: Any
  loss_fn: Callable[..., Any]
  kind: kinds.RunKind
  evaluate: Callable[[Any, int], dict[str, float]] | None
  images: Callable[[Any, int], dict[str, np.ndarray]] | None = None


class _Preemption:
  """Turns SIGTERM into a flag that the loop checks at step boundaries.

  SLURM and cloud schedulers send SIGTERM some time before SIGKILL. The
  handler only records it; the loop then makes a final synchronous save and
  exits cleanly. On several hosts every process must agree to stop at the
  same step (a save is collective), so the flag is all-gathered.
  """

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: will save and exit at the next step.")
    self.requested = True

  def should_stop(self, check_others: bool) -> bool:
    if jax.process_count() == 1 or not check_others:
      return self.requested
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.any(flags))

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def _write_config(config, workdir):
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, config_lib.RUN_CONFIG), "w") as f:
      f.write(config_lib.to_json(config))


def run(config: ml_collections.ConfigDict, workdir: str, job: Job,
        mesh: jax.sharding.Mesh) -> Any:
  """Trains `job` according to `config` on `mesh`; returns the final state.

  The run holds the workdir's lock throughout (workdir_lock.py): a second
  run on the same workdir refuses before it reads or writes anything there.
  """
  # Before anything touches the workdir: a bad config leaves a run intact.
  config_lib.validate(config, inference_devices=sum(
      d.process_index == jax.process_index() for d in mesh.devices.flat))
  with workdir_lock.hold(workdir):
    return _run(config, workdir, job, mesh)


def _run(config: ml_collections.ConfigDict, workdir: str, job: Job,
         mesh: jax.sharding.Mesh) -> Any:
  # --- Data.
  global_batch = config.data.batch_size
  if global_batch % mesh.size:
    # The batch is split over every mesh axis (data x fsdp).
    raise ValueError(
        f"config.data.batch_size={global_batch} is not divisible by the "
        f"{mesh.size} devices of the mesh {dict(mesh.shape)}")

  contract = contract_lib.input_contract(config)
  if os.path.isdir(checkpointing.checkpoint_dir(workdir)):
    # A resume's input contract first, read-only (metadata only, nothing is
    # written), so that a mismatched config fails in seconds, before the
    # compile below.
    reader = checkpointing.make_manager(workdir, read_only=True)
    try:
      checkpointing.newest_step_checked(reader, contract)
    finally:
      reader.close()

  # --- Pre-flight: the step is compiled for this mesh, from abstract state
  # and batch, before any data is read or a checkpoint written; a step that
  # cannot fit stops here (preflight.py). The run executes this program.
  rng = jax.random.key(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  train_step, abstract, _, optimizer = train_step_lib.compile_step(
      config, job.model, job.loss_fn, job.kind.labelled, mesh, step_rng)
  preflight_report = preflight.check(train_step, mesh.devices.flat[0], config)
  for line in preflight_report:
    logging.info("%s", line)

  if not config.data.datalist and not config.data.get("store"):
    # One directory scan per run: process 0 writes it to the workdir, every
    # process (and every evaluation) reads it from there.
    config.data.datalist = datalists.run_datalist(config.data, workdir)
  train_iter = pipeline.make_train_iter(
      config.data, task=job.kind.task, seed=config.seed)

  # --- Checkpoints.
  manager = checkpointing.make_manager(
      workdir, keep_last=config.train.keep_last,
      keep_best=config.train.keep_best, best_metric=job.kind.best_metric,
      best_mode=job.kind.best_mode)
  meta = dict(contract=contract,
              inference=contract_lib.inference_settings(config))
  step0 = checkpointing.newest_step_checked(manager, contract)

  state = _restore_or_init(config, job, mesh, manager, step0, abstract,
                           optimizer, train_iter, contract, init_rng)

  if config.dry_run:
    preflight.print_dry_run(config, mesh, state, preflight_report,
                            next(train_iter))
    return state
  return _train(config, workdir, job, mesh, state, train_iter, train_step,
                step_rng, manager, meta)


def _restore_or_init(config, job, mesh, manager, step0, abstract, optimizer,
                     train_iter, contract, init_rng):
  """The run's state: resumed from the workdir, else fresh (maybe `init_from`)."""
  # Resume into the abstract state (no init is materialised), else a fresh
  # sharded state on device, maybe from a previous stage.
  if step0 is not None:
    # The newest step that restores; unreadable newer ones are moved aside.
    state, _, step0 = checkpointing.restore_newest(manager, abstract,
                                                   train_iter, contract)
    logging.info("Resumed from %s step %d", manager.directory, step0)
    return state
  sample_shape = (1, *config.data.roi, contract["model"]["in_channels"])
  state, _ = train_state.create_train_state(
      job.model, optimizer, init_rng, sample_shape, mesh,
      fsdp=config.mesh.fsdp != 1)
  if config.init_from:
    # Straight into the state's shardings: no host holds the whole tree.
    state = state.replace(
        params=transfer.load_into(config, job.model, state.params))
  return state


def _train(config, workdir, job, mesh, state, train_iter, train_step, step_rng,
           manager, meta):
  """Steps from the state's step to `config.train.num_steps`: logs, evaluates, saves."""
  data_sharding = sharding.data_sharding(mesh)
  num_steps = config.train.num_steps
  start = int(jax.device_get(state.step))
  # Only now, after the resume/contract/init_from checks passed: a run that
  # fails them must not overwrite the config.json of the run it found.
  _write_config(config, workdir)
  # --- Logging: only process 0 writes summaries; others just log.
  writer = metric_writers.MetricWriter(
      workdir, write_files=jax.process_index() == 0)
  if start == 0:
    writer.write_hparams(contract_lib.json_clean(_flat(config.to_dict())))
  batch = None
  progress = metric_writers.Progress(
      num_steps, start, flops_per_step=preflight.step_flops(train_step),
      peak_flops=preflight.peak_flops(config.model.dtype))
  preemption = _Preemption()
  pending: list[tuple[int, Any]] = []
  step = start
  try:
    while step < num_steps:
      if batch is None:
        batch = pipeline.to_global_batch(next(train_iter), data_sharding)
      state, metrics = train_step(state, batch, step_rng)
      batch = None
      step += 1
      pending.append((step, metrics))
      last = step == num_steps
      if step % config.train.log_every == 0 or last:
        _flush_metrics(writer, pending, config.train.nonfinite, manager)
        writer.write_scalars(step, progress.report(step))
        pending = []
      stop = preemption.should_stop(
          check_others=step % config.train.log_every == 0)
      evaluate_now = job.evaluate is not None and (
          last or (config.train.eval_every > 0 and
                   step % config.train.eval_every == 0))
      metrics_for_ckpt = None
      if evaluate_now:
        metrics_for_ckpt = job.evaluate(state.params, step)
        writer.write_scalars(step, metrics_for_ckpt)
        logging.info("step %d validation: %s", step, metrics_for_ckpt)
      if job.images is not None and config.train.image_every and (
          step % config.train.image_every == 0 or last):
        writer.write_images(step, job.images(state.params, step))
      if (step % config.train.ckpt_every == 0 or last or stop or
          metrics_for_ckpt is not None):
        if config.train.nonfinite == "halt" and pending:
          # Check the unlogged steps first: under "halt" no checkpoint may
          # contain updates made after a non-finite step.
          _flush_metrics(writer, pending, config.train.nonfinite, manager)
          pending = []
        checkpointing.save(manager, step, state, train_iter, meta,
                           metrics=metrics_for_ckpt, force=True)
      if stop:
        logging.warning("Preempted: saved step %d, exiting.", step)
        break
  finally:
    # Every process joins the final (synchronous) wait, even on errors, so a
    # checkpoint in flight is never left half-written by a clean exit.
    manager.wait_until_finished()
    writer.close()
    preemption.restore()
  manager.close()
  return state


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out


def _flush_metrics(writer, pending, nonfinite_mode, manager):
  """One device_get for a window of steps; writes their mean."""
  steps, metrics = zip(*pending)
  host = jax.device_get(list(metrics))
  bad = [s for s, m in zip(steps, host) if m.get("nonfinite", 0)]
  if bad:
    logging.warning("Non-finite loss/gradients at steps %s: those updates "
                    "were skipped.", bad)
    if nonfinite_mode == "halt":
      manager.wait_until_finished()
      raise NonFiniteError(
          f"Non-finite loss or gradients at step {bad[0]} (train.nonfinite="
          f"'halt'). Params were not updated by that step; the last good "
          f"checkpoint is step {manager.latest_step()} in {manager.directory}.")
  mean = {f"train_{k}": float(np.mean([m[k] for m in host]))
          for k in host[0]}
  writer.write_scalars(steps[-1], mean)
