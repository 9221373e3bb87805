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

import os
import sys

from absl import app, flags

from bsf_jax import tool_flags
from bsf_jax.data import atomic_io
from bsf_jax.infer import inference
from bsf_jax.run import checkpointing, config_lib
from bsf_jax.weights.evaluation import CONVENTION_NAMES, evaluate_run

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
  try:
    config = config_lib.load_run_config(FLAGS.workdir)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
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


if __name__ == "__main__":
  tool_flags.run(main)
