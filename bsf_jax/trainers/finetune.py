"""Stage 3: Dice fine-tuning of SwinUNETR, whole-volume validation.

The encoder starts from a stage-1/2 run or a PyTorch BSF/MONAI checkpoint
(`config.init_from`). Training uses random roi crops with the SPEC section 5
augmentations; validation runs jitted sliding-window inference over whole
volumes and reports per-class Dice (TC/WT/ET for BraTS, lesion metrics for
ATLAS). The best checkpoint is the one with the highest mean Dice.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bsf_jax import inference, losses, metrics, sharding
from bsf_jax.data import pipeline
from bsf_jax.trainers import loop


def make_loss_fn(model, seg: ml_collections.ConfigDict):
  """Per-device sigmoid Dice (or Dice + BCE) on channels-last logits and labels.

  MONAI's DiceLoss (batch=False) averages per-sample Dice terms, so the mean
  over devices of their means is the loss of the global batch.
  """
  loss = losses.dice_ce_loss if seg.loss == "dice_ce" else losses.dice_loss
  if seg.loss not in ("dice", "dice_ce"):
    raise ValueError(f"config.seg.loss={seg.loss!r}: expected dice or dice_ce")

  def loss_fn(params, batch, rng):
    # Per device (train_step.sharded_value_and_grad): each device draws its
    # own dropout masks, as each GPU of a DDP run does.
    key = jax.random.fold_in(rng, sharding.shard_index())
    logits = model.apply({"params": params}, batch["image"],
                         deterministic=False, rngs={"dropout": key})
    value = loss(logits, batch["label"], sigmoid=True,
                 squared_pred=seg.squared_pred, smooth_nr=seg.smooth_nr,
                 smooth_dr=seg.smooth_dr)
    return value, {"loss": value}

  return loss_fn


def make_predict_volume(model, config: ml_collections.ConfigDict, mesh=None):
  """Returns `predict(params, image [H,W,D,C]) -> probabilities [H,W,D,K]`."""
  seg = config.seg

  @jax.jit
  def probabilities(params, image):
    logits = inference.sliding_window_inference(
        image[None], tuple(config.data.roi), model.apply,
        overlap=seg.sw_overlap, mode=seg.sw_mode,
        sw_batch_size=seg.sw_batch_size, predictor_args=({"params": params},),
        mesh=mesh)
    return jax.nn.sigmoid(logits[0])

  return probabilities


def volume_metrics(probs: np.ndarray, label: np.ndarray, label_format: str,
                   threshold: float) -> dict[str, float]:
  """Per-volume Dice (and ATLAS lesion metrics) from probabilities."""
  pred = metrics.binarize(probs, threshold)
  gt = metrics.binarize(label)
  if label_format.startswith("brats"):  # any BraTS convention: TC/WT/ET
    return {f"dice_{k}": float(v) for k, v in
            metrics.brats_region_dice(pred, gt).items()}
  result = metrics.atlas_metrics(pred[..., 0], gt[..., 0])
  out = {f"atlas_{k}": float(v) for k, v in result.items()}
  out["dice_mean"] = out["atlas_dice"]
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  mesh = sharding.create_mesh(config.mesh)
  if config.seg.freeze_encoder:
    config.optim.freeze = "^swinViT/"
  model = loop.build_model(config)
  predict = make_predict_volume(model, config, mesh)

  def evaluate(params, step):
    del step
    per_volume = []
    for i, item in enumerate(pipeline.make_eval_iter(config.data, task="seg")):
      if 0 <= config.train.eval_batches <= i:
        break
      if not bool(item.get("mask", True)):
        continue  # A padding placeholder (keeps processes in step).
      probs = np.asarray(predict(params, jnp.asarray(item["image"])))
      per_volume.append(volume_metrics(probs, np.asarray(item["label"]),
                                       config.data.label_format,
                                       config.seg.threshold))
    if not per_volume:
      raise ValueError("The validation split is empty: check config.data "
                       "(fold / datalist)")
    # nanmean: a volume without (say) ET has an undefined ET Dice, as MONAI's
    # DiceMetric(ignore_empty=True) reports it.
    return {f"val_{k}": float(np.nanmean([m[k] for m in per_volume]))
            for k in per_volume[0]}

  job = loop.Job(model=model, loss_fn=make_loss_fn(model, config.seg),
                 task="seg", evaluate=evaluate, best_metric="val_dice_mean",
                 best_mode="max")
  return loop.run(config, workdir, job, mesh)
