r"""Export a run's weights for PyTorch users.

  python -m bsf_jax.export --workdir runs/s3 --best --format monai --out swin_unetr.pt
  python -m bsf_jax.export --workdir runs/s1 --format bsf --out bsf_stage1.pt
  python -m bsf_jax.export --workdir runs/s1 --step 2000 --format safetensors --out s1.safetensors

Formats:
  monai        a `SwinUNETR` state_dict (fine-tuning runs) that
               `monai.networks.nets.SwinUNETR(...).load_state_dict(sd, strict=True)`
               accepts; from a pretraining run, the encoder under `swinViT.*`,
               which `SwinUNETR.swinViT.load_state_dict(..., strict=True)` accepts
               after stripping the prefix, as BSF's fine-tuning scripts do.
  bsf          BrainSegFounder's checkpoint: {"state_dict": {"module.<key>": ...},
               "global_step": step, "epoch": 0} with the reference SSL head's keys.
  safetensors  the run's own keys (monai or ssl_head naming), no pickle, with
               the input contract as metadata.

Every file records the run's patch-merging order and the export says which
MONAI computes the same function; a monai file of a run with the pre-2025 order
(only MONAI 0.9-1.4 computes it) needs --monai_before_1_5.
"""

from __future__ import annotations

import sys

from absl import app, flags

from bsf_jax import tool_flags
from bsf_jax.run import checkpointing
from bsf_jax.data import atomic_io
from bsf_jax.weights.export import export

FLAGS = tool_flags.flag_values(__name__)
flags.DEFINE_string("workdir", None, "Run directory (or its checkpoints dir).",
                    flag_values=FLAGS)
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).",
                     flag_values=FLAGS)
flags.DEFINE_bool("best", False, "Export the best checkpoint by validation.",
                  flag_values=FLAGS)
flags.DEFINE_enum("format", "monai", ["monai", "bsf", "safetensors"],
                  "Output format.", flag_values=FLAGS)
flags.DEFINE_string("out", None, "Output file.", flag_values=FLAGS)
flags.DEFINE_bool("monai_before_1_5", False,
                  "Write a --format monai file of a run trained with the pre-2025 "
                  "patch-merging order, for MONAI 0.9-1.4 (which computes that order).",
                  flag_values=FLAGS)
flags.mark_flags_as_required(["workdir", "out"], flag_values=FLAGS)


def main(argv=None):
  """The command line (module docstring); argv: the words after the program name."""
  tool_flags.parse(FLAGS, argv)
  checkpointing.quiet_tool_logs()
  if FLAGS.best and FLAGS.step is not None:
    raise app.UsageError("--best and --step are exclusive")
  which = "best" if FLAGS.best else (FLAGS.step if FLAGS.step is not None
                                     else "latest")
  try:
    print(export(FLAGS.workdir, FLAGS.out, FLAGS.format, which,
                 FLAGS.monai_before_1_5))
  except (FileNotFoundError, ValueError, atomic_io.OutputError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  tool_flags.run(main)
