"""Evaluate a fine-tuned run on its validation split: Dice table and figure.

  python -m bsf_jax.evaluate --workdir runs/s3_f0 [--step N] \
      [--convention monai|brats2023|atlas|isles22]

Restores the best checkpoint (by validation mean Dice), predicts every
validation volume with sliding-window inference, and writes
`evaluation.md` / `evaluation.csv` / `evaluation.json` (per-volume and mean
scores per region) and `evaluation.png` (a slice of the input with
ground-truth and predicted overlays) into the workdir.

`--convention` picks the scoring rules (docs/evaluation.md has the table and
the official sources): `monai` (default) is the training validation's Dice
(MONAI DiceMetric; ATLAS runs add the challenge's lesion metrics);
`brats2023` the BraTS 2023+ global and lesion-wise Dice and HD95; `atlas`
ATLAS R2.0; `isles22` ISLES'22. The table's first line names it.
"""

from __future__ import annotations

import csv
import json
import os
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from bsf_jax.run import checkpointing, kinds
from bsf_jax.data import atomic_io
from bsf_jax.infer import inference, metrics, scoring
from bsf_jax import models
from bsf_jax.infer import contract as contract_lib
from bsf_jax.data import labels
from bsf_jax.data import pipeline

# What each `--convention` is, for the table's first line.
CONVENTION_NAMES = {
    "monai": "MONAI DiceMetric, the training validation's",
    "brats2023": "BraTS 2023+ global and lesion-wise Dice/HD95",
    "atlas": "ATLAS R2.0 challenge scoring",
    "isles22": "ISLES'22 challenge scoring",
}


def evaluate_run(run_dir: str, config: ml_collections.ConfigDict,
                 out_dir: str, which: str | int = "best",
                 convention: str = "monai") -> str:
  """Evaluates `run_dir`'s checkpoint; returns the markdown table."""
  if convention not in scoring.CONVENTIONS:
    raise ValueError(f"--convention {convention!r}; expected one of "
                     f"{scoring.CONVENTIONS}")
  regions = list(labels.get(config.data.label_format).regions)
  params, meta, step = checkpointing.restore_params(
      run_dir, which, metric=kinds.SEG.best_metric, mode=kinds.SEG.best_mode)
  checkpointing.check_contract(meta.get("contract", {}),
                               contract_lib.input_contract(config), run_dir)
  model = models.from_config(config)
  predict = inference.make_volume_predictor(model, config)
  rows, figure_item = [], None
  for item in pipeline.make_eval_iter(config.data, task=kinds.SEG.task):
    if not bool(item.get("mask", True)):
      continue
    probs = np.asarray(predict(params, jnp.asarray(item["image"])))
    if convention == "monai":
      scores = scoring.volume_metrics(probs, np.asarray(item["label"]),
                                      config.data.label_format,
                                      config.seg.threshold)
    else:
      spacing = np.linalg.norm(np.asarray(item["affine"])[:3, :3], axis=0)
      scores = scoring.score_regions(
          metrics.binarize(probs, config.seg.threshold),
          metrics.binarize(np.asarray(item["label"])), regions, convention,
          tuple(spacing))
    rows.append({"volume": os.path.basename(str(item["path"])), **scores})
    if figure_item is None:
      figure_item = (item, probs)
  if not rows:
    raise ValueError(f"{run_dir}: no validation volumes to evaluate")
  keys = [k for k in rows[0] if k != "volume"]
  mean = {"volume": "mean", **{k: float(np.nanmean([r[k] for r in rows]))
                               for k in keys}}
  # Each file is complete or absent (atomic_io): a full disk keeps the
  # previous evaluation's file.
  with atomic_io.open_atomic(os.path.join(out_dir, "evaluation.csv"), "w",
                             newline="") as f:
    writer = csv.DictWriter(f, ["volume", *keys])
    writer.writeheader()
    writer.writerows([*rows, mean])
  lines = [f"Validation of {run_dir} (step {step}), {len(rows)} volumes, "
           f"scored with the {convention} convention ({CONVENTION_NAMES[convention]})",
           "", "| volume | " + " | ".join(keys) + " |",
           "|---" * (len(keys) + 1) + "|"]
  for r in [*rows, mean]:
    lines.append(f"| {r['volume']} | " +
                 " | ".join(f"{r[k]:.4f}" for k in keys) + " |")
  table = "\n".join(lines)
  atomic_io.write_text(os.path.join(out_dir, "evaluation.md"), table + "\n")
  with atomic_io.open_atomic(os.path.join(out_dir, "evaluation.json")) as f:
    json.dump({"step": step, "convention": convention, "mean": mean,
               "volumes": rows}, f, indent=2)
  save_figure(os.path.join(out_dir, "evaluation.png"), *figure_item,
              threshold=config.seg.threshold)
  return table


def save_figure(path: str, item: dict, probs: np.ndarray,
                threshold: float) -> None:
  """Input slice, ground truth and prediction overlays at the largest lesion."""
  import matplotlib
  matplotlib.use("Agg")  # No display on clusters.
  import matplotlib.pyplot as plt

  image = np.asarray(item["image"])[..., 0]
  gt = metrics.binarize(np.asarray(item["label"]))
  pred = metrics.binarize(probs, threshold)
  # Axial slice (last spatial axis in RAS) where the ground truth is largest.
  z = int(np.argmax(gt.any(-1).sum((0, 1)))) if gt.any() else image.shape[2] // 2
  fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
  titles = ("input", "ground truth", "prediction")
  for ax, title, mask in zip(axes, titles, (None, gt, pred)):
    ax.imshow(np.rot90(image[:, :, z]), cmap="gray")
    if mask is not None:
      colours = np.zeros((*mask.shape[:2], 4))
      for k, rgb in enumerate(((1, 1, 0), (0, 1, 0), (1, 0, 0))[:mask.shape[-1]]):
        colours[mask[:, :, z, k]] = (*rgb, 0.45)
      ax.imshow(np.rot90(colours))
    ax.set_title(title)
    ax.axis("off")
  fig.suptitle(f"{os.path.basename(str(item['path']))}, axial slice {z} "
               "(yellow TC, green WT, red ET)" if pred.shape[-1] == 3 else
               f"{os.path.basename(str(item['path']))}, axial slice {z}")
  fig.tight_layout()
  with atomic_io.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=80)
  plt.close(fig)


FLAGS = flags.FLAGS


def _define_flags():
  # Defined only when run as a script: the demo imports this module inside
  # `bsf_jax.main`, which has its own --workdir flag.
  flags.DEFINE_string("workdir", None, "A fine-tuning run's workdir.")
  flags.DEFINE_string("step", "best", "Checkpoint: best, latest or a step.")
  flags.DEFINE_enum("convention", "monai", list(CONVENTION_NAMES),
                    "Scoring conventions (docs/evaluation.md).")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  checkpointing.quiet_tool_logs()
  config_path = os.path.join(FLAGS.workdir, "config.json")
  if not os.path.exists(config_path):
    print(f"error: {config_path} not found (not a bsf_jax workdir?)",
          file=sys.stderr)
    sys.exit(1)
  with open(config_path) as f:
    # JSON data, never code: the resolved config written by the run.
    config = ml_collections.ConfigDict(json.load(f))
  _tuples(config)
  try:
    print(evaluate_run(FLAGS.workdir, config, FLAGS.workdir, FLAGS.step,
                       FLAGS.convention))
  except (FileNotFoundError, checkpointing.CheckpointError,
          checkpointing.ContractError, atomic_io.OutputError) as e:
    # One line naming the step (and, for a corrupt one, the other kept
    # steps to pick with --step), not a TensorStore traceback.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def _tuples(config):
  """JSON turned tuples into lists; restore the tuple-valued fields."""
  config.data.roi = tuple(config.data.roi)
  config.data.modalities = tuple(config.data.modalities)
  config.model.depths = tuple(config.model.depths)
  config.model.num_heads = tuple(config.model.num_heads)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
