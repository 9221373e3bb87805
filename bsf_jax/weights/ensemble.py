"""Several fine-tuned checkpoints as one predictor: fold ensembles and mirroring.

  members = ensemble.load(ensemble.resolve_checkpoints(["runs/folds"]))
  model = ensemble.Ensemble(members, config, mirror="xyz")
  probs = np.asarray(model.predict(image))   # [H, W, D, K]

`load` restores each checkpoint's params and checks that all of them read
their inputs the same way and mean the same by each output channel
(`contract.input_mismatch`): a mismatch is one line naming the two
checkpoints and the field. `Ensemble` stacks the params of members with the
same architecture and runs every member and every flip in one jitted program
(`inference.make_ensemble_predictor`); the result is the mean sigmoid
probability, thresholded afterwards like a single model's.

`predict` and `evaluate` share this module; one checkpoint without mirroring
is the single-model prediction.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import jax
import ml_collections
import numpy as np

from bsf_jax.run import checkpoint_reads, checkpointing, config_lib, kinds
from bsf_jax.infer import inference
from bsf_jax import models
from bsf_jax.infer import contract as contract_lib

T = TypeVar("T")
# The command-line flag that overrides each recorded inference setting.
SETTING_FLAGS = {"threshold": "--threshold", "sw_overlap": "--overlap",
                 "sw_batch_size": "--sw_batch_size", "sw_mode": "--sw_mode"}


@dataclasses.dataclass(frozen=True)
class Member:
  """One restored checkpoint: where it is from and its host params."""
  checkpoint: str
  step: int
  params: Any
  meta: dict

  @property
  def contract(self) -> dict:
    return self.meta.get("contract") or {}


def _is_checkpoint(path: str) -> bool:
  """A workdir, its checkpoints dir or a step dir (`checkpoint_reads.restore_params`)."""
  return (os.path.isdir(os.path.join(path, checkpointing.CKPT_SUBDIR))
          or os.path.isdir(os.path.join(path, "state"))
          or os.path.basename(os.path.normpath(path)) == checkpointing.CKPT_SUBDIR)


def resolve_checkpoints(specs: Sequence[str]) -> list[str]:
  """The checkpoints named by `--checkpoint` values, in order.

  Each value is a run's workdir (or its checkpoints dir, or one step dir), or
  a folder of runs such as `launch/sweep.sh folds` writes: its sub-folders
  that hold checkpoints, sorted by name. A checkpoint given twice counts
  twice.
  """
  out = []
  for spec in specs:
    if _is_checkpoint(spec):
      out.append(spec)
      continue
    if not os.path.isdir(spec):
      raise FileNotFoundError(f"--checkpoint {spec}: no such folder")
    runs = sorted(d for d in glob.glob(os.path.join(spec, "*"))
                  if os.path.isdir(d) and _is_checkpoint(d))
    if not runs:
      raise FileNotFoundError(
          f"--checkpoint {spec}: neither a run (no {checkpointing.CKPT_SUBDIR}/ "
          "folder) nor a folder of runs")
    out.extend(runs)
  if not out:
    raise ValueError("no checkpoint given")
  return out


def load(checkpoints: Sequence[str], which: str | int = "best") -> list[Member]:
  """Restores every checkpoint's params; all must share the input contract.

  Args:
    checkpoints: paths (`resolve_checkpoints`).
    which: "best" (by validation mean Dice), "latest" or a step, for each.

  Raises:
    checkpointing.ContractError: two checkpoints differ in a contract field
      (one line naming both and the field), or one cannot segment.
  """
  members = []
  for path in checkpoints:
    params, meta, step = checkpoint_reads.restore_params(
        path, which, metric=kinds.SEG.best_metric, mode=kinds.SEG.best_mode)
    member = Member(path, step, params, meta)
    contract = member.contract
    if not contract or "model" not in contract:
      raise checkpointing.ContractError(f"{path}: checkpoint has no input contract")
    if contract["model"]["name"] != "swin_unetr":
      raise checkpointing.ContractError(
          f"{path}: a {contract['model']['name']} checkpoint cannot segment; use "
          "a fine-tuning (stage 3) run")
    if members:
      check_same_inputs(members[0].checkpoint, members[0].contract, path, contract)
    members.append(member)
  return members


def check_same_inputs(name_a: str, a: dict, name_b: str, b: dict) -> None:
  """One line naming both sources and the field when two contracts differ."""
  field = contract_lib.input_mismatch(a, b)
  if field is not None:
    raise checkpointing.ContractError(
        f"{name_a} and {name_b} differ in {field}: {a.get(field)!r} vs "
        f"{b.get(field)!r}; checkpoints predicted together must share the "
        "input contract")


def inference_settings(members: Sequence[Member],
                       overrides: dict) -> tuple[dict, str]:
  """The `config.seg` inference fields to predict with, and their source.

  Each checkpoint's recorded settings (`contract.inference_settings`); every
  setting not given as a flag (a non-None override) must be the same for all
  checkpoints.
  """
  given = {k: v for k, v in overrides.items() if v is not None}
  chosen = None
  for member in members:
    recorded = member.meta.get("inference")
    missing = [k for k in contract_lib.INFERENCE_KEYS if k not in (recorded or {})]
    if missing:
      raise checkpointing.ContractError(
          f"{member.checkpoint}: checkpoint metadata has no inference settings "
          f"{missing}")
    settings = {k: recorded[k] for k in contract_lib.INFERENCE_KEYS}
    if chosen is None:
      chosen, first = settings, member.checkpoint
      continue
    for key in contract_lib.INFERENCE_KEYS:
      if key not in given and settings[key] != chosen[key]:
        raise ValueError(
            f"{first} and {member.checkpoint} differ in inference setting "
            f"{key}: {chosen[key]!r} vs {settings[key]!r}; choose one with "
            f"{SETTING_FLAGS[key]}")
  source = "checkpoint"
  if given:
    chosen.update(given)
    source += " + flags " + ", ".join(sorted(given))
  if not 0 <= chosen["threshold"] <= 1:
    raise ValueError(f"threshold must be in [0, 1], got "
                     f"{chosen['threshold']} (from {source})")
  return chosen, source


def inference_config(contract: dict, settings: dict) -> ml_collections.ConfigDict:
  """What `Ensemble` needs beyond the checkpoints, for tools without a run config.

  The roi comes from the contract, the `seg` inference fields from `settings`
  (`inference_settings`) and how the model runs (dtype, kernels) from the
  defaults; the model itself is rebuilt from each checkpoint's contract.
  """
  config = ml_collections.ConfigDict()
  config.model = config_lib.model_config("swin_unetr")
  config.data = ml_collections.ConfigDict(dict(roi=tuple(contract["roi"])))
  config.seg = config_lib.seg_config()
  config.seg.update(settings)
  return config


def group_members(members: Sequence[Member]) -> list[list[Member]]:
  """Members with the same model contract, in order of first appearance."""
  groups: dict[str, list[Member]] = {}
  for member in members:
    key = json.dumps(member.contract["model"], sort_keys=True)
    groups.setdefault(key, []).append(member)
  return list(groups.values())


class Ensemble:
  """Every member and every flip, averaged on the device in one program.

  Attributes:
    members: the checkpoints, in the order given.
    groups: the members by architecture (each group's params are stacked).
    flips: the mirrorings averaged (`inference.flip_combinations`).
  """

  def __init__(self, members: Sequence[Member],
               config: ml_collections.ConfigDict, mirror: str = "",
               mesh=None, models_per_step: int | None = None):
    """Builds the models and puts the stacked params on the devices.

    Args:
      members: `load`'s result.
      config: `data.roi`, `seg` and how the model runs (`config.model`'s
        dtype and kernels; `inference_config` for tools without a run).
      mirror: axes to mirror over, e.g. "xyz"; "" for none.
      mesh: optional mesh whose data axis splits each step's windows
        (`inference.window_mesh`).
      models_per_step: members run at once (`make_ensemble_predictor`).
    """
    self.members = list(members)
    self.groups = group_members(self.members)
    self.mirror = mirror
    self.flips = inference.flip_combinations(mirror)
    devices = None if mesh is None else list(mesh.devices.flat)
    model_list = [models.from_architecture(g[0].contract["model"], config.model,
                                           devices=devices) for g in self.groups]
    stacked = []
    for group in self.groups:
      try:
        stacked.append(inference.stack_members([m.params for m in group]))
      except ValueError as e:
        raise checkpointing.ContractError(
            f"{group[0].checkpoint} and the other checkpoints of its model "
            f"({', '.join(m.checkpoint for m in group[1:])}): {e}") from None
    placement = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
                 if mesh is not None else jax.local_devices()[0])
    self._params = jax.device_put(tuple(stacked), placement)
    self._predict = inference.make_ensemble_predictor(
        model_list, config, mirror, mesh, models_per_step)

  @property
  def passes(self) -> int:
    """Sliding-window passes per volume: members x flips."""
    return len(self.members) * len(self.flips)

  def predict(self, image) -> jax.Array:
    """Mean probabilities [H, W, D, K] of a normalised image [H, W, D, C].

    Returns without waiting for the device (JAX dispatch is asynchronous).
    """
    return self._predict(self._params, image)

  def stream(self, items: Iterable[T], image: Callable[[T], Any]
             ) -> Iterator[tuple[T, np.ndarray]]:
    """(item, probabilities) for each item, in order.

    Item i+1 is sent to the device before item i's probabilities are fetched,
    so the caller's host work on item i (scoring, writing) runs while the
    device predicts the next one.
    """
    pending = None
    for item in items:
      out = self.predict(image(item))
      if pending is not None:
        yield pending[0], np.asarray(pending[1])
      pending = (item, out)
    if pending is not None:
      yield pending[0], np.asarray(pending[1])

  def describe(self) -> dict:
    """What was averaged, for result files and printouts."""
    return {
        "checkpoints": [{"checkpoint": m.checkpoint, "step": m.step}
                        for m in self.members],
        "mirror": self.mirror, "flips": len(self.flips),
        "architectures": len(self.groups),
    }

  def summary(self) -> str:
    """One line: members, groups, flips and passes per volume."""
    n = len(self.members)
    text = f"{n} checkpoint{'s' if n > 1 else ''}"
    if len(self.groups) > 1:
      text += f" ({len(self.groups)} architectures)"
    if len(self.flips) > 1:
      text += f" x {len(self.flips)} flips (mirror {self.mirror})"
    return text + f": {self.passes} sliding-window pass{'es' if self.passes > 1 else ''} per volume"
