"""Read-only reads of a run's checkpoints: metadata, the step to use, params.

Stage transfer (`weights/transfer.py`), export, predict and evaluate need a
run's weights, not its optimizer state or the mesh that wrote them. Here
they open the run's checkpoints read-only (a workdir, its `checkpoints` dir
or one step dir), choose a step ("latest", "best" by the run's own metric,
or a number) and restore its params alone, on the host or straight into the
shardings the caller gives.

Nothing here writes or moves a file. A step that cannot be read is named in
one line (step, file, reason) with the kept steps to pick with `--step`
instead; moving a corrupt step aside is left to the training resume
(`checkpointing.restore_newest`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from bsf_jax.run import kinds
from bsf_jax.run.checkpointing import (CKPT_SUBDIR, CheckpointError,
                                       describe_failure, read_meta)


def best_metric_of(meta: dict[str, Any]) -> tuple[str, str]:
  """(metric, mode) that ranks the checkpoints of the run `meta` belongs to."""
  kind = kinds.of_model(meta.get("contract", {}).get("model", {}).get("name"))
  return kind.best_metric, kind.best_mode


def best_step(manager: ocp.CheckpointManager, metric: str,
              mode: str = "min") -> int | None:
  """The kept step with the best validation `metric`, or None if none has it."""
  scored = []
  for step in manager.all_steps():
    try:
      meta = read_meta(manager, step)
    except (FileNotFoundError, ValueError) as e:
      # An unreadable step cannot be the best one to use; say so and rank
      # the others.
      logging.warning("Not ranking checkpoint step %d: %s", step, e)
      continue
    value = meta.get("metrics", {}).get(metric)
    if value is not None:
      scored.append((value if mode == "min" else -value, step))
  return min(scored)[1] if scored else None


def resolve_step(manager: ocp.CheckpointManager, which: str | int | None,
                 metric: str = kinds.SSL.best_metric,
                 mode: str = kinds.SSL.best_mode) -> int:
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


def _open_read_only(path: str, which: str | int | None
                    ) -> tuple[ocp.CheckpointManager, str, str | int | None]:
  """A read-only manager for a workdir, its checkpoints dir or a step dir."""
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
  return manager, path, which


def run_meta(path: str) -> dict[str, Any]:
  """The metadata of the newest kept step whose metadata reads.

  Every step of a run has the same contract (a resume checks it), so any
  readable step tells what was trained; used before a step is chosen.
  """
  manager, path, _ = _open_read_only(path, None)
  try:
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"No complete checkpoint in {path}")
    errors = []
    for step in steps:
      try:
        return read_meta(manager, step)
      except (FileNotFoundError, ValueError) as e:
        errors.append(str(e))
    raise CheckpointError(f"No checkpoint step in {path} has readable "
                          f"metadata: {'; '.join(errors)}")
  finally:
    manager.close()


def restore_params(path: str, which: str | int | None = "latest",
                   metric: str | None = None,
                   mode: str | None = None,
                   placement: Callable[[str, Any], Any] | None = None
                   ) -> tuple[Any, dict[str, Any], int]:
  """Loads only the params of a workdir's checkpoint, on the host or placed.

  Used by stage transfer, export and prediction, which need weights but not
  the optimizer state or the mesh of the run that wrote them.

  Args:
    path: a workdir, its `checkpoints` dir, or one step dir inside it.
    which: "latest", "best" or a step (ignored when `path` is a step dir).
    metric, mode: how "best" is ranked (default: the run's own, `kinds.RunKind`).
    placement: None (every param on the host), or `(name, metadata) ->
      sharding`, per "/"-joined param name: a `jax.sharding.Sharding` restores
      that param straight into it (each host reads only its shards), None
      leaves it unread, as a `jax.ShapeDtypeStruct`.

  Returns:
    (params as numpy arrays, or as `placement` says; meta, step).
  """
  if which == "best" and metric is None:
    metric, mode = best_metric_of(run_meta(path))
  manager, path, which = _open_read_only(path, which)
  step = resolve_step(manager, which, metric, mode)
  try:
    meta = read_meta(manager, step)
    state_dir = os.path.join(path, str(step), "state")
    params = (_host_params(state_dir) if placement is None
              else _placed_params(state_dir, placement))
  except Exception as e:  # pylint: disable=broad-exception-caught
    # As in `checkpointing.restore`: corrupt files raise anything from
    # KeyError to bare Exception. One line, and the way out: another kept
    # step.
    others = sorted(s for s in manager.all_steps() if s != step)
    hint = (f"choose another kept step with --step (kept: {others})" if others
            else "no other step is kept")
    raise CheckpointError(f"{describe_failure(path, step, e)}; {hint}") from e
  finally:
    manager.close()
  return params, meta, step


def _host_params(state_dir: str) -> Any:
  tree = ocp.StandardCheckpointer().metadata(state_dir)
  tree = getattr(tree, "item_metadata", tree)
  # The whole state is restored on the host (no mesh needed) and only the
  # params are kept; the optimizer state is ~2x params, small next to
  # activations.
  abstract = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(state_dir, abstract)
  return jax.device_get(restored["params"])


def _placed_params(state_dir: str, placement: Callable[[str, Any], Any]) -> Any:
  """The params of a saved state, each restored into the sharding `placement` gives it."""
  tree = ocp.StandardCheckpointer().metadata(state_dir)
  tree = getattr(tree, "item_metadata", tree)
  flat = traverse_util.flatten_dict(dict(tree["params"]), sep="/")
  wanted, unread = {}, {}
  for name, m in flat.items():
    target = placement(name, m)
    if target is None:
      unread[name] = jax.ShapeDtypeStruct(m.shape, m.dtype)
    else:
      wanted[name] = jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=target)
  restored = {}
  if wanted:
    # Only the wanted params are read (partial restore): no optimizer state,
    # and no array is assembled on one host unless its sharding says so.
    item = {"params": traverse_util.unflatten_dict(wanted, sep="/")}
    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape,
                                       dtype=s.dtype), item)
    with ocp.PyTreeCheckpointer() as ckptr:
      out = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True))
    restored = traverse_util.flatten_dict(dict(out["params"]), sep="/")
  return traverse_util.unflatten_dict({**unread, **restored}, sep="/")

