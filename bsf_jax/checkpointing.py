"""One Orbax CheckpointManager per workdir: train state, data iterator, contract.

Each checkpoint step holds three items:
  state: the TrainState pytree (params, optimizer state, step, counters),
  data:  the Grain iterator state (indices only), so a resume continues at
         exactly the element it stopped at,
  meta:  JSON with the input contract (modalities and their order,
         orientation, intensity normalisation, roi), the model config, and the
         validation metrics of that step.

Retention: keep the newest `keep_last` steps (resume points) and the best
`keep_best` by validation metric. Orbax's `best_fn` alone would evict the
newest checkpoint whenever it is not among the best, which breaks resume, so
we combine a LatestN and a BestN preservation policy instead.

Orbax writes every step to a temporary directory and renames it only once all
items are complete, so a process killed mid-save loses at most that step; the
next start ignores (and cleans) the partial directory and restores the last
complete one.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

CKPT_SUBDIR = "checkpoints"


class ContractError(ValueError):
  """A checkpoint was made for different inputs than the ones given now."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CKPT_SUBDIR)


def make_manager(workdir: str, *, keep_last: int = 2, keep_best: int = 1,
                 best_metric: str = "val_rec", best_mode: str = "min",
                 async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """Creates the workdir's CheckpointManager.

  Args:
    workdir: the run's workdir; checkpoints go to `workdir/checkpoints`.
    keep_last: number of newest checkpoints kept.
    keep_best: number of best checkpoints kept (by `best_metric`).
    best_metric: key in the metrics passed to `save` that ranks checkpoints
      (validation reconstruction loss for SSL, as the reference does; mean
      Dice for fine-tuning).
    best_mode: "min" or "max".
    async_save: write in a background thread (the step loop goes on).
    read_only: open an existing directory for restore only (export, predict).

  Returns:
    An `ocp.CheckpointManager`. Every process must call `save` (Orbax
    coordinates the writes); only-process-0 saves deadlock multi-host runs.
  """
  sign = 1.0 if best_mode == "max" else -1.0
  policy = pp.AnyPreservationPolicy([
      pp.LatestN(n=keep_last),
      # Without keep_checkpoints_without_metrics=False every periodic save
      # (which has no validation metrics) would be kept forever.
      pp.BestN(get_metric_fn=lambda m: sign * float(m[best_metric]),
               n=keep_best, keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy,
      enable_async_checkpointing=async_save,
      read_only=read_only,
      create=not read_only,
      # A save interrupted by a kill leaves a tmp dir behind; remove it.
      cleanup_tmp_directories=not read_only,
  )
  path = checkpoint_dir(workdir)
  if read_only and not os.path.isdir(path):
    raise FileNotFoundError(f"No checkpoints in {path}")
  return ocp.CheckpointManager(path, options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         data_iter: Any | None, meta: dict[str, Any],
         metrics: dict[str, float] | None = None, force: bool = False) -> None:
  """Saves {state, data, meta} at `step` (asynchronously unless disabled)."""
  items = dict(state=ocp.args.StandardSave(state),
               meta=ocp.args.JsonSave(dict(meta, metrics=metrics or {})))
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
  manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
               force=force)


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """Reads only the JSON metadata of a checkpoint step."""
  path = os.path.join(str(manager.directory), str(step), "meta", "metadata")
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"Checkpoint step {step} in {manager.directory} "
                            f"has no metadata file {path}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"Checkpoint metadata {path} is corrupt: {e}") from None


def best_step(manager: ocp.CheckpointManager, metric: str,
              mode: str = "min") -> int | None:
  """The kept step with the best validation `metric`, or None if none has it."""
  scored = []
  for step in manager.all_steps():
    value = read_meta(manager, step).get("metrics", {}).get(metric)
    if value is not None:
      scored.append((value if mode == "min" else -value, step))
  return min(scored)[1] if scored else None


def resolve_step(manager: ocp.CheckpointManager, which: str | int | None,
                 metric: str = "val_rec", mode: str = "min") -> int:
  """Turns "latest", "best" or a step number into an existing step."""
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f"No complete checkpoint in {manager.directory}")
  if which in (None, "latest"):
    return max(steps)
  if which == "best":
    step = best_step(manager, metric, mode)
    if step is None:
      logging.warning("No checkpoint in %s has %r; using the latest.",
                      manager.directory, metric)
      return max(steps)
    return step
  step = int(which)
  if step not in steps:
    raise FileNotFoundError(
        f"Checkpoint step {step} not in {manager.directory}; kept steps: "
        f"{sorted(steps)}")
  return step


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iter: Any | None) -> tuple[Any, dict[str, Any]]:
  """Restores state (with the shardings of `abstract_state`) and data iter.

  Args:
    manager: the workdir's manager.
    step: an existing step.
    abstract_state: a pytree of `jax.ShapeDtypeStruct` with shardings, e.g.
      from `jax.eval_shape` plus the state shardings; restored arrays land
      directly on those devices.
    data_iter: the Grain iterator to set to the saved position, or None.

  Returns:
    (state, meta).
  """
  items = dict(state=ocp.args.StandardRestore(abstract_state),
               meta=ocp.args.JsonRestore())
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError) as e:
    # Orbax raises ValueError/KeyError both for a structure mismatch and for
    # a truncated or corrupt file (e.g. a cut JSON metadata file).
    raise ValueError(
        f"Checkpoint {manager.directory}/{step} cannot be restored: its "
        f"files are truncated/corrupt or it was made for a different model "
        f"size, channels or optimizer: {e}") from e
  return restored.state, restored.meta


def restore_params(path: str, which: str | int | None = "latest",
                   metric: str = "val_rec",
                   mode: str = "min") -> tuple[Any, dict[str, Any], int]:
  """Loads only the params of a workdir's checkpoint, on the host.

  Used by stage transfer, export and prediction, which need weights but not
  the optimizer state or the mesh of the run that wrote them.

  Args:
    path: a workdir, its `checkpoints` dir, or one step dir inside it.
    which: "latest", "best" or a step (ignored when `path` is a step dir).
    metric, mode: how "best" is ranked.

  Returns:
    (params as numpy arrays, meta, step).
  """
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "state")):  # A step dir.
    which = int(os.path.basename(path))
    path = os.path.dirname(path)
  elif os.path.isdir(os.path.join(path, CKPT_SUBDIR)):
    path = os.path.join(path, CKPT_SUBDIR)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No checkpoint directory at {path}")
  manager = ocp.CheckpointManager(
      path, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  step = resolve_step(manager, which, metric, mode)
  meta = read_meta(manager, step)
  state_dir = os.path.join(path, str(step), "state")
  tree = ocp.StandardCheckpointer().metadata(state_dir)
  tree = getattr(tree, "item_metadata", tree)
  # The whole state is restored on the host (no mesh needed) and only the
  # params are kept; the optimizer state is ~2x params, small next to
  # activations.
  abstract = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(state_dir, abstract)
  manager.close()
  return jax.device_get(restored["params"]), meta, step


def check_contract(saved: dict[str, Any], current: dict[str, Any],
                   source: str) -> None:
  """Fails loudly when a checkpoint's input contract differs from ours.

  Wrong modality order is the most common silent failure of the original:
  every permutation of BraTS channels but the trained one gives Dice ~0 with
  no error. So modalities, their order, orientation, normalisation and the
  roi must match exactly.
  """
  problems = []
  for key in sorted(set(saved) | set(current)):
    if saved.get(key) != current.get(key):
      problems.append(f"  {key}: checkpoint has {saved.get(key)!r}, "
                      f"this run has {current.get(key)!r}")
  if problems:
    raise ContractError(
        f"Input contract of {source} differs from this run's:\n" +
        "\n".join(problems) +
        "\nFix the config (e.g. config.data.modalities order) or, for a stage "
        "transfer, set config.init_adapt_channels=True to map channels by "
        "modality name.")
