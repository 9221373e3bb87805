r"""Evaluate fine-tuned runs, alone or as an ensemble: Dice table and figure.

  python -m bsf_jax.evaluate --workdir runs/s3_f0 [--step N] \
      [--convention monai|brats2023|atlas|isles22]
  python -m bsf_jax.evaluate --workdir runs/folds/fold0 --checkpoint runs/folds \
      --mirror --datalist held_out.json --output evals/ensemble_mirror

Restores the best checkpoint (by validation mean Dice), predicts every
validation volume with sliding-window inference, and writes
`evaluation.md` / `evaluation.csv` / `evaluation.json` (per-volume and mean
scores per region) and `evaluation.png` (a slice of the input with
ground-truth and predicted overlays) into the workdir.

`--checkpoint` (several, or a folder of runs) scores an ensemble instead,
`--mirror` adds test-time flips and `--postprocess` named post-processing,
as `bsf_jax.predict` does; `--datalist` scores the labelled entries of a
datalist's validation and test sections instead of the run's validation
split (an ensemble of folds has seen every other fold's validation split).
The workdir's `config.json` gives the data pipeline and inference settings;
every checkpoint must share its input contract. Anything but the run itself
on its own split is written to `--output`, so the run's own evaluation files
stay the single model's; `bsf_jax.report` sets them side by side.

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

from bsf_jax import tool_flags
from bsf_jax.data import atomic_io
from bsf_jax.run import checkpointing, kinds
from bsf_jax.weights import ensemble
from bsf_jax.infer import inference, metrics
from bsf_jax.infer import contract as contract_lib
from bsf_jax.infer import postprocess as postprocess_lib
from bsf_jax.infer import scoring
from bsf_jax.data import datalists
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


FLAGS = tool_flags.flag_values(__name__)
flags.DEFINE_string("workdir", None, "A fine-tuning run's workdir: its "
                    "config.json sets the data and inference settings.",
                    flag_values=FLAGS)
flags.DEFINE_string("step", "best", "Checkpoint: best, latest or a step.",
                    flag_values=FLAGS)
flags.DEFINE_enum("convention", "monai", list(CONVENTION_NAMES),
                  "Scoring conventions (docs/evaluation.md).",
                  flag_values=FLAGS)
flags.DEFINE_multi_string(
    "checkpoint", None, "Checkpoints to score as an ensemble (runs, step "
    "dirs or folders of runs; --checkpoint A B or repeated); default: the "
    "workdir's.", flag_values=FLAGS)
flags.DEFINE_bool("mirror", False, "Also average over the flips of "
                  "--mirror_axes (test-time mirroring).", flag_values=FLAGS)
flags.DEFINE_string("mirror_axes", inference.AXIS_NAMES, "Axes --mirror "
                    "flips: letters of xyz.", flag_values=FLAGS)
flags.DEFINE_string("datalist", None, "Score the labelled validation and "
                    "test entries of this datalist instead of the run's "
                    "validation split.", flag_values=FLAGS)
flags.DEFINE_string("postprocess", None, "Named post-processing, "
                    "NAME=VALUE[,...] (bsf_jax.infer.postprocess).",
                    flag_values=FLAGS)
flags.DEFINE_string("output", None, "Folder for the evaluation files "
                    "(default: the workdir, only when scoring the run "
                    "itself on its own validation split).", flag_values=FLAGS)
flags.mark_flags_as_required(["workdir"], flag_values=FLAGS)


def output_dir(workdir: str, output: str | None, checkpoints: list[str],
               mirror: bool, datalist: str | None,
               postprocess: str | None) -> str:
  """Where the evaluation goes: `output`, or the workdir for the run alone.

  The workdir's evaluation files are the single model's on its own
  validation split (what `bsf_jax.report` tables as that run); anything else
  needs a folder of its own.
  """
  if output:
    return output
  itself = (not checkpoints or [os.path.abspath(c) for c in checkpoints]
            == [os.path.abspath(workdir)])
  if itself and not mirror and not datalist and not postprocess:
    return workdir
  raise ValueError("--output is required for an ensemble, mirrored, "
                   "post-processed or --datalist evaluation (the workdir's "
                   "evaluation files stay the run's own)")


def main(argv=None):
  """The command line (module docstring); argv: the words after the program name."""
  argv = tool_flags.parse(FLAGS, argv, positional=True)
  if argv and not FLAGS.checkpoint:
    raise app.UsageError(f"Unexpected arguments: {argv}")
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
  # `--checkpoint A B C`: the words after the flag are more checkpoints.
  checkpoints = (FLAGS.checkpoint or []) + argv
  try:
    out = output_dir(FLAGS.workdir, FLAGS.output, checkpoints, FLAGS.mirror,
                     FLAGS.datalist, FLAGS.postprocess)
    print(evaluate_run(FLAGS.workdir, config, out, FLAGS.step,
                       FLAGS.convention, checkpoints or None,
                       FLAGS.mirror_axes if FLAGS.mirror else "",
                       FLAGS.datalist, FLAGS.postprocess))
  except (FileNotFoundError, ValueError, atomic_io.OutputError) as e:
    # One line: the step that fails to read (and the other kept steps to
    # pick with --step), or the two sources and the contract field they
    # differ in; not a traceback. Contract, checkpoint and data errors are
    # ValueErrors.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def _tuples(config):
  """JSON turned tuples into lists; restore the tuple-valued fields."""
  config.data.roi = tuple(config.data.roi)
  config.data.modalities = tuple(config.data.modalities)
  config.model.depths = tuple(config.model.depths)
  config.model.num_heads = tuple(config.model.num_heads)


if __name__ == "__main__":
  tool_flags.run(main)
