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

A complete step can still be unreadable: a truncated copy of a run directory,
a full disk, a bad block. `restore_newest` then reports the step in one line
(step, file, reason), moves it aside to `workdir/corrupt_checkpoints/` (never
deleting it) and resumes from the newest step that restores; all processes
try each step and agree on the outcome before going on. The read-only
reads of export, predict, evaluate and stage transfer
(`checkpoint_reads.restore_params`) name the failed step and the kept steps
to pick with `--step` instead.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from bsf_jax.run import kinds

CKPT_SUBDIR = "checkpoints"
# Where steps that fail to restore are moved (beside CKPT_SUBDIR, where
# Orbax neither lists nor cleans them).
CORRUPT_SUBDIR = "corrupt_checkpoints"


class ContractError(ValueError):
  """A checkpoint was made for different inputs than the ones given now."""


class CheckpointError(ValueError):
  """A checkpoint step exists but its files cannot be read."""


def quiet_tool_logs() -> None:
  """Only errors from the libraries in the one-shot tools (export, predict,
  evaluate), unless `--verbosity` was given.

  Orbax logs every manager's options and each read at INFO, and warns about
  read-only managers; the tools print their own results and one-line errors.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  if "verbosity" in flags.FLAGS and not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.ERROR)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CKPT_SUBDIR)


def make_manager(workdir: str, *, keep_last: int = 2, keep_best: int = 1,
                 best_metric: str = kinds.SSL.best_metric,
                 best_mode: str = kinds.SSL.best_mode,
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


def _restore_items(directory: str, step: int, abstract_state: Any,
                   data_iter: Any | None) -> Any:
  """Restores state (and the data iterator) of one step, on this process.

  Through the item handlers, not `CheckpointManager.restore`: the manager's
  checkpointer ends a restore with a barrier of all processes, so a process
  whose read fails (a truncated file read only by its own shards) would
  leave the others waiting there forever. Here every process returns, and
  `restore_newest` gathers the outcomes.
  """
  items = dict(state=ocp.args.StandardRestore(abstract_state))
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  handler = ocp.CompositeCheckpointHandler()
  try:
    return handler.restore(epath.Path(directory) / str(step),
                           args=ocp.args.Composite(**items)).state
  finally:
    handler.close()


def _reason(error: BaseException) -> str:
  """The innermost message of an error chain, on one line.

  TensorStore read errors surface as a bare `Exception` whose message is a
  page-long spec; the useful line ("Truncated Zstd-compressed stream",
  "Requested byte range ... not valid") is in its `__cause__`.
  """
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  text = " ".join(str(error).split()) or type(error).__name__
  return text if len(text) <= 300 else text[:297] + "..."


def _culprit(step_dir: str, error: BaseException) -> str:
  """The file (or array) of `step_dir` that failed to restore, if known."""
  chain = []
  while error is not None:
    chain.append(str(error))
    error = error.__cause__ or error.__context__
  for text in chain:
    m = re.search(r'Error reading "([^"]+)" in OCDBT database at local file '
                  r'"([^"]+)"', text)
    if m:  # The array's key inside the step's state directory.
      return f"{m.group(2).rstrip('/')} (array {m.group(1)})"
  for text in chain:
    m = re.search(r"(/\S+)", text)
    if m and m.group(1).startswith(step_dir):
      return m.group(1).rstrip(".,:'\"")
  # JSON decode errors do not name their file: find the one that is cut.
  for path in sorted(glob.glob(os.path.join(step_dir, "**", "*"),
                               recursive=True)):
    name = os.path.basename(path)
    if os.path.isfile(path) and (name in ("_CHECKPOINT_METADATA", "_METADATA",
                                          "_sharding", "metadata") or
                                 name.endswith(".json")):
      try:
        with open(path) as f:
          json.load(f)
      except (ValueError, UnicodeDecodeError):
        return path
  return step_dir


def describe_failure(directory: str, step: int, error: BaseException) -> str:
  """One line: the step, the file that failed to restore, and why."""
  step_dir = os.path.join(str(directory), str(step))
  return (f"checkpoint step {step} ({_culprit(step_dir, error)}) cannot be "
          f"restored: {_reason(error)}")


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

  Raises:
    CheckpointError: one line naming the step, the file and the reason.
  """
  meta = read_meta(manager, step)
  try:
    state = _restore_items(str(manager.directory), step, abstract_state,
                           data_iter)
  # Orbax and TensorStore raise bare `Exception`s (and ValueError, KeyError,
  # OSError) for truncated files and for structure mismatches alike.
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise CheckpointError(
        f"Checkpoint {manager.directory}/{step} cannot be restored "
        f"({_culprit(os.path.join(str(manager.directory), str(step)), e)}: "
        f"{_reason(e)}): its files are truncated/corrupt or it was made for "
        f"a different model size, channels or optimizer") from e
  return state, meta


def newest_step_checked(manager: ocp.CheckpointManager,
                        contract: dict[str, Any]) -> int | None:
  """The step a resume starts from, after checking its input contract.

  Runs before the (costly) state init so that a mismatched config fails in
  seconds. Steps whose metadata does not read are passed over here;
  `restore_newest` reports them.

  Returns:
    None when the workdir has no checkpoint, else the newest step.

  Raises:
    ContractError: the newest readable step was made for other inputs.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  for step in steps:
    try:
      saved = read_meta(manager, step)
    except (FileNotFoundError, ValueError):
      continue
    check_contract(saved.get("contract", {}), contract,
                   f"{manager.directory}/{step}")
    break
  return steps[0] if steps else None


def _all_agree(ok: bool) -> bool:
  """True when `ok` holds on every process (a collective on several)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def restore_newest(manager: ocp.CheckpointManager, abstract_state: Any,
                   data_iter: Any | None, contract: dict[str, Any]
                   ) -> tuple[Any, dict[str, Any], int]:
  """Restores the newest step that restores on every process.

  Steps are tried newest first. Every process tries each step and the
  outcomes are all-gathered, so all processes go on from the same step.
  Steps that failed are reported in one line each and, once an older step
  has restored, moved by process 0 to `workdir/corrupt_checkpoints/` (never
  deleted); the manager is then reloaded so that it no longer lists them and
  the run can save those step numbers again.

  Args:
    manager: the workdir's (writable) manager.
    abstract_state, data_iter: as `restore`.
    contract: this run's input contract; each step's is checked.

  Returns:
    (state, meta, step).

  Raises:
    CheckpointError: no step restores. Nothing is moved or deleted then.
    ContractError: a step was made for other inputs (not a corruption).
  """
  directory = str(manager.directory)
  failed: list[tuple[int, str]] = []
  for step in sorted(manager.all_steps(), reverse=True):
    error = None
    try:
      meta = read_meta(manager, step)
    except (FileNotFoundError, ValueError) as e:
      error = e
    if error is None:
      check_contract(meta.get("contract", {}), contract, f"{directory}/{step}")
      try:
        state = _restore_items(directory, step, abstract_state, data_iter)
      except Exception as e:  # pylint: disable=broad-exception-caught
        error = e  # See `restore`: corruption has no narrower type.
    line = (describe_failure(directory, step, error) if error is not None else
            f"checkpoint step {step} failed to restore on another process "
            "(see its log)")
    if _all_agree(error is None):
      break
    logging.error("%s", line)
    failed.append((step, line))
  else:
    lines = "; ".join(line for _, line in failed) or "no steps"
    raise CheckpointError(
        f"No checkpoint in {directory} restores: {lines}. Nothing was moved "
        f"or deleted; repair or move those step directories, or start the "
        f"run in a new --workdir")
  if failed:
    _move_aside(manager, [s for s, _ in failed], step)
  return state, meta, step


def _move_aside(manager: ocp.CheckpointManager, steps: list[int],
                resumed: int) -> None:
  directory = str(manager.directory)
  aside_root = os.path.join(os.path.dirname(directory), CORRUPT_SUBDIR)
  if jax.process_index() == 0:
    os.makedirs(aside_root, exist_ok=True)
    for step in steps:
      target = os.path.join(aside_root, str(step))
      n = 1
      while os.path.exists(target):  # Keep earlier casualties too.
        n += 1
        target = os.path.join(aside_root, f"{step}.{n}")
      os.rename(os.path.join(directory, str(step)), target)
      logging.warning("Moved unreadable checkpoint step %d to %s; resuming "
                      "from step %d.", step, target, resumed)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("bsf_jax:corrupt_steps_moved")
  manager.reload()


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
