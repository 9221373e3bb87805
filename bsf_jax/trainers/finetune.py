"""Stage 3: Dice fine-tuning of SwinUNETR, whole-volume validation.

The encoder starts from a stage-1/2 run or a PyTorch BSF/MONAI checkpoint
(`config.init_from`). Training uses random roi crops with the fine-tuning
augmentations (flips, intensity scale and shift), applied by default inside
the jitted step (`data.augment_on="device"`): each crop draws from the step's
key folded with its index in the global batch, so the draws do not depend on
the number of devices, and a resumed run repeats them exactly. Validation
runs jitted sliding-window inference over whole volumes and reports per-class
Dice (TC/WT/ET for BraTS, lesion metrics for ATLAS). The best checkpoint is
the one with the highest mean Dice.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bsf_jax.step import losses, seg_augment, sharding
from bsf_jax.infer import inference, scoring
from bsf_jax import models
from bsf_jax.run import kinds
from bsf_jax.weights import transfer
from bsf_jax.data import pipeline
from bsf_jax.trainers import loop


def augment_batch(batch, rng):
  """Inside the step: `seg_augment.seg_augment` of this device's crops, crop r
  of the global batch keyed by `fold_in(rng, r)` (`sharding.row_keys`)."""
  image, label = batch["image"], batch["label"]
  keys = sharding.row_keys(rng, image.shape[0])
  image, label = seg_augment.seg_augment(keys, image, label)
  return {**batch, "image": image, "label": label}


def make_loss_fn(model, seg: ml_collections.ConfigDict, augment_on_device=False):
  """Per-device sigmoid Dice (or Dice + BCE) on channels-last logits and labels.

  MONAI's DiceLoss (batch=False) averages per-sample Dice terms, so the mean
  over devices of their means is the loss of the global batch. With
  `augment_on_device`, the crops are flipped, scaled and shifted first
  (`augment_batch`).
  """
  loss = losses.dice_ce_loss if seg.loss == "dice_ce" else losses.dice_loss
  if seg.loss not in ("dice", "dice_ce"):
    raise ValueError(f"config.seg.loss={seg.loss!r}: expected dice or dice_ce")

  def loss_fn(params, batch, rng):
    k_dropout, k_augment = jax.random.split(rng)
    if augment_on_device:
      batch = augment_batch(batch, k_augment)
    # Per device (train_step.sharded_value_and_grad): each device draws its
    # own dropout masks, as each GPU of a DDP run does.
    key = jax.random.fold_in(k_dropout, sharding.shard_index())
    logits = model.apply({"params": params}, batch["image"],
                         deterministic=False, rngs={"dropout": key})
    value = loss(logits, batch["label"], sigmoid=True,
                 squared_pred=seg.squared_pred, smooth_nr=seg.smooth_nr,
                 smooth_dr=seg.smooth_dr)
    return value, {"loss": value}

  return loss_fn


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  logging.info("%s", transfer.resolve_patch_merging(config))
  mesh = sharding.create_mesh(config.mesh)
  return loop.run(config, workdir, make_job(config, mesh), mesh)


def make_job(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> loop.Job:
  """Stage 3 on `mesh`: SwinUNETR, its Dice loss and whole-volume validation.

  A frozen encoder (`config.seg.freeze_encoder`) is set in `config.optim`.
  """
  if config.seg.freeze_encoder:
    config.optim.freeze = "^swinViT/"
  model = models.from_config(config, devices=list(mesh.devices.flat))
  local_mesh = sharding.process_local_mesh(mesh)
  predict = inference.make_volume_predictor(model, config, local_mesh)
  # Each process predicts its own volumes with whole params on its devices.
  to_local = sharding.gather_to_process(mesh, local_mesh)
  keys = scoring.volume_metric_keys(config.data.label_format,
                                    config.model.out_channels)

  def evaluate(params, step):
    del step
    params = to_local(params)
    per_volume = []
    for i, item in enumerate(pipeline.make_eval_iter(config.data, task=kinds.SEG.task)):
      if 0 <= config.train.eval_batches <= i:
        break
      if not bool(item.get("mask", True)):
        per_volume.append(None)  # A padding placeholder (keeps processes in step).
        continue
      probs = np.asarray(predict(params, jnp.asarray(item["image"])))
      per_volume.append(scoring.volume_metrics(
          probs, np.asarray(item["label"]), config.data.label_format,
          config.seg.threshold))
    return scoring.mean_volume_metrics(per_volume, keys)

  on_device = pipeline.seg_augmentation(config.data) == "device"
  return loop.Job(model=model, loss_fn=make_loss_fn(model, config.seg, on_device),
                  kind=kinds.SEG, evaluate=evaluate)
