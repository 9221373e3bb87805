"""The two kinds of run: self-supervised pretraining and segmentation.

A run's kind decides its data pipeline (`pipeline.make_train_iter(task=...)`),
whether its batches carry labels, the model its checkpoints hold, and the
validation metric that ranks those checkpoints ("best"): SSL runs by
reconstruction loss, as BrainSegFounder's pretraining does, segmentation runs
by mean Dice. Trainers, checkpoints, export, evaluate and predict read them
here.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RunKind:
  """One kind of run.

  Attributes:
    task: the data pipeline's task ("ssl" or "seg").
    model: the model a checkpoint's contract names (`contract.model.name`).
    labelled: whether its batches carry a "label".
    best_metric: the validation metric that ranks its checkpoints.
    best_mode: "min" or "max": which end of `best_metric` is best.
  """
  task: str
  model: str
  labelled: bool
  best_metric: str
  best_mode: str


SSL = RunKind(task="ssl", model="ssl_head", labelled=False, best_metric="val_rec",
              best_mode="min")
SEG = RunKind(task="seg", model="swin_unetr", labelled=True, best_metric="val_dice_mean",
              best_mode="max")
KINDS = (SSL, SEG)


def of_task(task: str) -> RunKind:
  """The kind whose data pipeline task is `task`."""
  for kind in KINDS:
    if kind.task == task:
      return kind
  raise ValueError(f"task={task!r}; expected one of {[k.task for k in KINDS]}")


def of_model(name: str | None) -> RunKind:
  """The kind of run that trains the model `name` (a checkpoint's contract.model.name)."""
  for kind in KINDS:
    if kind.model == name:
      return kind
  raise ValueError(f"checkpoint metadata has no model name (contract.model.name={name!r})")
