r"""Segment new subjects with fine-tuned checkpoints and write NIfTI labels.

  python -m bsf_jax.predict --checkpoint runs/s3_f0 --input /data/BraTS2021_00001 --output preds/
  python -m bsf_jax.predict --checkpoint runs/s3_f0 --input flair.nii.gz,t1ce.nii.gz,t1.nii.gz,t2.nii.gz --output preds/
  python -m bsf_jax.predict --checkpoint runs/s3_f0 --input brats21_folds.json --output preds/
  python -m bsf_jax.predict --checkpoint runs/folds/fold* --mirror --input /data/test --output preds/ \
      [--save_probabilities] [--postprocess et_to_necrosis_below=500]

The checkpoint carries its input contract (modality names and order,
orientation, intensity normalisation, roi). Inputs are matched to it by
modality name: a subject directory is searched for one file per modality, and
explicit file lists must name the files in the contract's order (checked
against the file names where they carry a modality). Wrong channel order is
the most common silent failure of the original, so a mismatch is an error.

Several checkpoints (`--checkpoint A B C`, or a folder of runs such as
`launch/sweep.sh folds` writes) are an ensemble: all must share the input
contract (a mismatch names the two checkpoints and the field), their sigmoid
probabilities are averaged on the device, then thresholded. `--mirror` also
averages over the flips of the spatial axes (`--mirror_axes`, default all
three: 8 flips), as nnU-Net predicts. Every member and flip runs in one
jitted program per volume shape (`bsf_jax.weights.ensemble`).

The sigmoid threshold and the sliding-window settings (overlap, windows per
batch, blending) are the ones the run validated with, recorded in the
checkpoint; `--threshold`, `--overlap`, `--sw_batch_size` and `--sw_mode`
override them (an ensemble's checkpoints must agree on the others).

Subject folders may use the BraTS 2018-2021 names (`_flair`, `_t1ce`, `_t1`,
`_t2`) or the 2023+ ones (`-t2f`, `-t1c`, `-t1n`, `-t2w`): both are the same
four scans, matched by canonical name.

Predictions are written in the input's own orientation with its affine and
header, so they overlay the input in any viewer. Labels are written in the
training data's convention, recorded in the checkpoint's contract (BraTS
2018-2021: ET 4; 2023+: ET 3), or in `--labels`; the convention used is
printed. ATLAS outputs are binary masks. `--save_probabilities` also writes
the averaged probabilities (`<subject>_prob.npz`, float16, same orientation
and affine; `bsf_jax.weights.prediction.load_probabilities` reads them back); `--postprocess` applies
named post-processing to the labels (`bsf_jax.infer.postprocess`).
"""

from __future__ import annotations

import sys

from absl import flags

from bsf_jax import tool_flags
from bsf_jax.data import atomic_io
from bsf_jax.infer import inference
from bsf_jax.run import checkpointing
from bsf_jax.weights import prediction

FLAGS = tool_flags.flag_values(__name__)
flags.DEFINE_multi_string(
    "checkpoint", None, "Fine-tuning workdir, step dir, or a folder of runs "
    "(all of its sub-folders with checkpoints); several (--checkpoint A B "
    "or repeated) predict as an ensemble.", flag_values=FLAGS)
flags.DEFINE_string("input", None, "Subject dir, folder of subject dirs, "
                    "comma-separated files, or a datalist json.",
                    flag_values=FLAGS)
flags.DEFINE_string("output", None, "Output folder.", flag_values=FLAGS)
flags.DEFINE_string("step", "best", "best, latest or a step number (for "
                    "every checkpoint).",
                    flag_values=FLAGS)
flags.DEFINE_float("threshold", None, "Sigmoid threshold (default: the "
                   "checkpoint's config.seg.threshold).",
                   flag_values=FLAGS)
flags.DEFINE_float("overlap", None, "Sliding-window overlap (default: the "
                   "checkpoint's config.seg.sw_overlap).",
                   flag_values=FLAGS)
flags.DEFINE_integer("sw_batch_size", None, "Windows per batch (default: "
                     "the checkpoint's config.seg.sw_batch_size).",
                     flag_values=FLAGS)
flags.DEFINE_enum("sw_mode", None, ["constant", "gaussian"], "Window "
                  "blending (default: the checkpoint's config.seg.sw_mode).",
                  flag_values=FLAGS)
flags.DEFINE_string("labels", None, "Label convention to write, e.g. "
                    "brats2023 (default: the training data's, from the "
                    "checkpoint).",
                    flag_values=FLAGS)
flags.DEFINE_bool("mirror", False, "Also average over the flips of "
                  "--mirror_axes (test-time mirroring).",
                  flag_values=FLAGS)
flags.DEFINE_string("mirror_axes", inference.AXIS_NAMES, "Axes --mirror "
                    "flips: letters of xyz (x left-right, y "
                    "posterior-anterior, z inferior-superior); all three "
                    "give 8 flips.",
                    flag_values=FLAGS)
flags.DEFINE_bool("save_probabilities", False, "Also write the averaged "
                  "probabilities, <subject>_prob.npz (float16).",
                  flag_values=FLAGS)
flags.DEFINE_string("postprocess", None, "Named post-processing of the "
                    "labels, NAME=VALUE[,...], e.g. et_to_necrosis_below=500 "
                    "(bsf_jax.infer.postprocess).",
                    flag_values=FLAGS)
flags.mark_flags_as_required(["checkpoint", "input", "output"], flag_values=FLAGS)

def main(argv=None):
  """The command line (module docstring); argv: the words after the program name."""
  argv = tool_flags.parse(FLAGS, argv, positional=True)
  checkpointing.quiet_tool_logs()
  try:
    # `--checkpoint A B C`: the words after the flag are more checkpoints
    # (a shell glob such as runs/folds/fold* expands to them).
    prediction.predict_subjects(FLAGS.checkpoint + argv, FLAGS.input, FLAGS.output,
             FLAGS.step,
             overrides=dict(threshold=FLAGS.threshold,
                            sw_overlap=FLAGS.overlap,
                            sw_batch_size=FLAGS.sw_batch_size,
                            sw_mode=FLAGS.sw_mode),
             label_format=FLAGS.labels,
             mirror=FLAGS.mirror_axes if FLAGS.mirror else "",
             save_probabilities=FLAGS.save_probabilities,
             postprocess=FLAGS.postprocess)
  except (prediction.InputError, FileNotFoundError, ValueError,
          atomic_io.OutputError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  tool_flags.run(main)
