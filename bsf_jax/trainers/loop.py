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
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from bsf_jax import checkpointing, config_lib, metric_writers, optim
from bsf_jax import sharding, train_state
from bsf_jax import train_step as train_step_lib
from bsf_jax import transfer, workdir_lock
from bsf_jax.data import pipeline


class NonFiniteError(RuntimeError):
  """Training stopped because a step's loss or gradients were not finite."""


@dataclasses.dataclass
class Job:
  """What a trainer hands to `run`.

  Attributes:
    model: the flax module being trained.
    loss_fn: `(params, batch, rng) -> (loss, metrics)`, see train_step.py.
    task: "ssl" or "seg" (selects the data pipeline).
    evaluate: `(params, step) -> dict of floats` with validation metrics
      (host values), or None.
    best_metric: key of `evaluate`'s output that ranks checkpoints.
    best_mode: "min" or "max".
    images: optional `(params, step) -> dict name -> [N,H,W,C] images`.
  """
  model: Any
  loss_fn: Callable[..., Any]
  task: str
  evaluate: Callable[[Any, int], dict[str, float]] | None
  best_metric: str
  best_mode: str
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


def model_in_channels(config: ml_collections.ConfigDict) -> int:
  return len(config.data.modalities)


def input_contract(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a checkpoint's weights expect of their inputs."""
  contract = dict(pipeline.input_contract(config.data))
  contract["model"] = dict(
      name=config.model.name, depths=list(config.model.depths),
      num_heads=list(config.model.num_heads),
      feature_size=config.model.feature_size,
      in_channels=model_in_channels(config),
      out_channels=config.model.out_channels)
  return json_clean(contract)


# The `config.seg` fields that turn a segmentation model's logits into the
# masks it was validated with. Saved beside the contract (not in it: changing
# them on resume is legitimate), so `bsf_jax.predict` segments new subjects
# the way validation did.
INFERENCE_KEYS = ("threshold", "sw_overlap", "sw_batch_size", "sw_mode")


def inference_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json_clean({k: config.seg[k] for k in INFERENCE_KEYS})


def json_clean(value: Any) -> Any:
  """Tuples to lists, numpy scalars to Python, recursively (JSON-stable)."""
  if isinstance(value, dict):
    return {str(k): json_clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_clean(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def _write_config(config, workdir):
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(config))


def build_model(config: ml_collections.ConfigDict, devices=None) -> Any:
  """The flax module named by `config.model` for this config's modalities.

  `config.model.impl="auto"` resolves against `devices` (a run's mesh
  devices; None: `jax.devices()`, the devices a mesh is built from).
  """
  from bsf_jax import models  # Heavy import, deferred.

  cfg = config.model
  kwargs = dict(
      in_channels=model_in_channels(config), feature_size=cfg.feature_size,
      depths=tuple(cfg.depths), num_heads=tuple(cfg.num_heads),
      dropout_path_rate=cfg.dropout_path_rate, drop_rate=cfg.drop_rate,
      attn_drop_rate=cfg.attn_drop_rate, dtype=jnp.dtype(cfg.dtype),
      remat=cfg.remat, impl=cfg.impl, attention=cfg.attention, devices=devices)
  if cfg.name == "ssl_head":
    return models.SSLHead(upsample=cfg.upsample, **kwargs)
  if cfg.name == "swin_unetr":
    if cfg.out_channels <= 0:
      raise ValueError("config.model.out_channels must be > 0 for swin_unetr")
    return models.SwinUNETR(out_channels=cfg.out_channels, **kwargs)
  raise ValueError(f"config.model.name={cfg.name!r}: expected 'ssl_head' or "
                   "'swin_unetr'")


def run(config: ml_collections.ConfigDict, workdir: str, job: Job,
        mesh: jax.sharding.Mesh) -> Any:
  """Trains `job` according to `config` on `mesh`; returns the final state.

  The run holds the workdir's lock throughout (workdir_lock.py): a second
  run on the same workdir refuses before it reads or writes anything there.
  """
  # Before anything touches the workdir: a bad config leaves a run intact.
  config_lib.validate(config)
  with workdir_lock.hold(workdir):
    return _run(config, workdir, job, mesh)


def _run(config: ml_collections.ConfigDict, workdir: str, job: Job,
         mesh: jax.sharding.Mesh) -> Any:
  # --- Data.
  data_sharding = sharding.data_sharding(mesh)
  global_batch = config.data.batch_size
  if global_batch % mesh.size:
    # The batch is split over every mesh axis (data x fsdp).
    raise ValueError(
        f"config.data.batch_size={global_batch} is not divisible by the "
        f"{mesh.size} devices of the mesh {dict(mesh.shape)}")
  train_iter = pipeline.make_train_iter(
      config.data, task=job.task, seed=config.seed)

  # --- Checkpoints: a resume's input contract is checked before the
  # (costly) state init, so a mismatched config fails in seconds.
  manager = checkpointing.make_manager(
      workdir, keep_last=config.train.keep_last,
      keep_best=config.train.keep_best, best_metric=job.best_metric,
      best_mode=job.best_mode)
  contract = input_contract(config)
  meta = dict(contract=contract, inference=inference_settings(config))
  step0 = checkpointing.newest_step_checked(manager, contract)

  # --- Model, optimizer, sharded state created on device.
  num_steps = config.train.num_steps
  optimizer = optim.make_optimizer(config.optim, num_steps)
  rng = jax.random.key(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  sample_shape = (global_batch, *config.data.roi, model_in_channels(config))
  state, state_sharding = train_state.create_train_state(
      job.model, optimizer, init_rng, sample_shape, mesh,
      fsdp=config.mesh.fsdp != 1)

  # --- Resume, else start from a previous stage.
  if step0 is not None:
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        state, state_sharding)
    # The newest step that restores; unreadable newer ones are moved aside.
    state, _, step0 = checkpointing.restore_newest(manager, abstract,
                                                   train_iter, contract)
    logging.info("Resumed from %s step %d", manager.directory, step0)
  elif config.init_from:
    params = transfer.load_into(
        config, job.model, jax.device_get(state.params))
    state = state.replace(params=jax.device_put(params, state_sharding.params))

  train_step = train_step_lib.make_train_step(
      job.loss_fn, optimizer, mesh, state_sharding,
      nonfinite=config.train.nonfinite)
  start = int(jax.device_get(state.step))

  if config.dry_run:
    _dry_run(config, mesh, state, train_step, train_iter, data_sharding,
             step_rng)
    return state
  # Only now, after the resume/contract/init_from checks passed: a run that
  # fails them must not overwrite the config.json of the run it found.
  _write_config(config, workdir)
  # --- Logging: only process 0 writes summaries; others just log.
  writer = metric_writers.MetricWriter(
      workdir, write_files=jax.process_index() == 0)
  if start == 0:
    writer.write_hparams(json_clean(_flat(config.to_dict())))
  batch = None
  if start < num_steps:
    # Compile once ahead of time so the step's FLOPs are known for MFU; the
    # compiled executable is then what every step calls.
    batch = pipeline.to_global_batch(next(train_iter), data_sharding)
    train_step = train_step.lower(state, batch, step_rng).compile()
  progress = metric_writers.Progress(
      num_steps, start, flops_per_step=_flops(train_step),
      peak_flops=_peak_flops(config.model.dtype))
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


def _flops(compiled) -> float | None:
  """FLOPs of one step from XLA's cost analysis, when available."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # Not every backend/executable offers it.
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


# Dense matmul peaks per chip (vendor specs), for the console's MFU.
_PEAK_TFLOPS = {"h100": (989.0, 67.0), "h200": (989.0, 67.0),
                "a100": (312.0, 19.5), "v100": (125.0, 15.7)}


def _peak_flops(dtype: str) -> float | None:
  kind = jax.devices()[0].device_kind.lower()
  for name, (bf16, fp32) in _PEAK_TFLOPS.items():
    if name in kind:
      peak = bf16 if dtype == "bfloat16" else fp32
      return peak * 1e12 * jax.device_count()
  return None


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


def _dry_run(config, mesh, state, train_step, train_iter, data_sharding, rng):
  """Prints what a real run would do, without training."""
  batch = next(train_iter)
  global_batch = pipeline.to_global_batch(batch, data_sharding)
  compiled = train_step.lower(state, global_batch, rng).compile()
  memory = compiled.memory_analysis()
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  per_device = config.data.batch_size // mesh.size
  lines = [
      f"mesh: {dict(mesh.shape)} over {jax.device_count()} devices "
      f"({jax.process_count()} processes, {jax.devices()[0].device_kind})",
      f"global batch {config.data.batch_size}, per device {per_device}, "
      f"roi {tuple(config.data.roi)}",
      f"params: {n_params:,}",
  ]
  if memory is not None:
    peak = (memory.temp_size_in_bytes + memory.argument_size_in_bytes +
            memory.output_size_in_bytes - memory.alias_size_in_bytes)
    lines.append(f"compiled peak memory per device: {peak / 2**30:.2f} GiB")
  for key, value in batch.items():
    value = np.asarray(value)
    if value.dtype.kind == "f":
      lines.append(f"first batch {key}: shape {value.shape} {value.dtype} "
                   f"min {value.min():.3f} max {value.max():.3f} "
                   f"mean {value.mean():.3f}")
    else:
      lines.append(f"first batch {key}: shape {value.shape} {value.dtype}")
  for line in lines:
    print(line)
