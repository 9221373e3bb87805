"""Scores a fine-tuned run's checkpoints, alone or as an ensemble, on labelled volumes.

`evaluate_run` predicts every volume of the run's validation split (or of a
datalist) by sliding window, scores it with the chosen convention
(`bsf_jax.infer.scoring`) and writes `evaluation.md` / `.csv` / `.json` and
`evaluation.png`. `python -m bsf_jax.evaluate` and the demo trainer call it.
"""

from __future__ import annotations

import csv
import json
import os

import jax.numpy as jnp
import ml_collections
import numpy as np

from bsf_jax.data import atomic_io, datalists, labels, pipeline
from bsf_jax.infer import contract as contract_lib
from bsf_jax.infer import inference, metrics, scoring
from bsf_jax.infer import postprocess as postprocess_lib
from bsf_jax.run import kinds
from bsf_jax.weights import ensemble


# What each `--convention` is, for the table's first line.
CONVENTION_NAMES = {
    "monai": "MONAI DiceMetric, the training validation's",
    "brats2023": "BraTS 2023+ global and lesion-wise Dice/HD95",
    "atlas": "ATLAS R2.0 challenge scoring",
    "isles22": "ISLES'22 challenge scoring",
}


def evaluate_run(run_dir: str, config: ml_collections.ConfigDict,
                 out_dir: str, which: str | int = "best",
                 convention: str = "monai", checkpoints=None,
                 mirror: str = "", datalist: str | None = None,
                 postprocess: str | None = None) -> str:
  """Evaluates `run_dir`'s checkpoint, or an ensemble; returns the markdown table.

  Args:
    run_dir: the run whose `config` this is (data pipeline, inference).
    config: its resolved config.
    out_dir: where the evaluation files go.
    which: "best", "latest" or a step, for every checkpoint.
    convention: a `scoring.CONVENTIONS` name.
    checkpoints: `--checkpoint` values (`ensemble.resolve_checkpoints`);
      None: `run_dir` alone.
    mirror: axes to mirror over (`inference.flip_combinations`).
    datalist: score this datalist's labelled validation and test entries
      instead of the run's validation split.
    postprocess: named post-processing (`bsf_jax.infer.postprocess`).
  """
  if convention not in scoring.CONVENTIONS:
    raise ValueError(f"--convention {convention!r}; expected one of "
                     f"{scoring.CONVENTIONS}")
  regions = list(labels.get(config.data.label_format).regions)
  steps = postprocess_lib.parse(postprocess, regions)
  members = ensemble.load(
      ensemble.resolve_checkpoints(checkpoints or [run_dir]), which)
  expected = contract_lib.input_contract(config)
  for m in members:
    ensemble.check_same_inputs(os.path.join(run_dir, "config.json"), expected,
                               m.checkpoint, m.contract)
  model = ensemble.Ensemble(
      members, config, mirror=mirror,
      mesh=inference.window_mesh(config.seg.sw_batch_size))
  records, data = None, "the run's validation split"
  if datalist:
    records = datalists.labelled_records(datalist, config.data.dataset,
                                         config.data.modalities)
    data = f"{os.path.basename(datalist)} (validation and test entries)"
  items = (item for item in pipeline.make_eval_iter(config.data, task=kinds.SEG.task,
                                                    records=records)
           if bool(item.get("mask", True)))
  rows, figure_item = [], None
  threshold = config.seg.threshold
  for item, probs in model.stream(items, lambda it: jnp.asarray(it["image"])):
    pred = postprocess_lib.apply(metrics.binarize(probs, threshold), steps,
                                 regions)
    if convention == "monai":
      scores = scoring.volume_metrics(pred, np.asarray(item["label"]),
                                      config.data.label_format, threshold)
    else:
      spacing = np.linalg.norm(np.asarray(item["affine"])[:3, :3], axis=0)
      scores = scoring.score_regions(
          pred, metrics.binarize(np.asarray(item["label"])), regions,
          convention, tuple(spacing))
    rows.append({"volume": os.path.basename(str(item["path"])), **scores})
    if figure_item is None:
      figure_item = (item, pred)
  if not rows:
    raise ValueError(f"{run_dir}: no volumes to evaluate in {data}")
  keys = [k for k in rows[0] if k != "volume"]
  mean = {"volume": "mean", **{k: float(np.nanmean([r[k] for r in rows]))
                               for k in keys}}
  if len(members) == 1 and len(model.flips) == 1:
    what = f"{members[0].checkpoint} (step {members[0].step})"
  else:
    what = f"an ensemble of {model.summary()}"
  if steps:
    what += ", post-processed " + ", ".join(f"{k}={v}" for k, v in steps)
  # Each file is complete or absent (atomic_io): a full disk keeps the
  # previous evaluation's file.
  with atomic_io.open_atomic(os.path.join(out_dir, "evaluation.csv"), "w",
                             newline="") as f:
    writer = csv.DictWriter(f, ["volume", *keys])
    writer.writeheader()
    writer.writerows([*rows, mean])
  lines = [f"Evaluation of {what} on {data}, {len(rows)} volumes, scored "
           f"with the {convention} convention ({CONVENTION_NAMES[convention]})",
           "", "| volume | " + " | ".join(keys) + " |",
           "|---" * (len(keys) + 1) + "|"]
  for r in [*rows, mean]:
    lines.append(f"| {r['volume']} | " +
                 " | ".join(f"{r[k]:.4f}" for k in keys) + " |")
  table = "\n".join(lines)
  atomic_io.write_text(os.path.join(out_dir, "evaluation.md"), table + "\n")
  with atomic_io.open_atomic(os.path.join(out_dir, "evaluation.json")) as f:
    json.dump({"step": members[0].step, "convention": convention,
               "workdir": os.path.abspath(run_dir),
               "data": {"datalist": (os.path.abspath(datalist) if datalist
                                     else None), "description": data},
               "inference": {**model.describe(), "postprocess": dict(steps)},
               "mean": mean, "volumes": rows}, f, indent=2)
  save_figure(os.path.join(out_dir, "evaluation.png"), *figure_item,
              threshold=threshold)
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
