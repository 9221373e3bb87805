r"""Entry point: `python -m bsf_jax.main --config=configs/stage1.py --workdir=DIR`.

Intentionally short (as the flax examples): parse flags, start multi-host JAX,
log the topology, and hand the config to the trainer it names. Rerunning the
same command resumes from the workdir's latest checkpoint.

Config files are Python code and are executed; only run configs you trust.
"""

import importlib
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from bsf_jax import tool_flags
from bsf_jax.run import checkpointing, distributed, workdir_lock
from bsf_jax.data import store

FLAGS = tool_flags.flag_values(__name__)
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/stage1.py:size=small.",
    lock_config=True, flag_values=FLAGS)
flags.DEFINE_string("workdir", None, "Checkpoints, logs and the resolved "
                    "config go here; rerunning resumes from it.",
                    flag_values=FLAGS)
flags.DEFINE_bool("dry_run", False, "Print mesh, per-device batch, params, "
                  "compiled peak memory and the first batch; do not train.",
                  flag_values=FLAGS)
flags.mark_flags_as_required(["config", "workdir"], flag_values=FLAGS)

_TRAINERS = ("pretrain", "finetune", "demo")


def main(argv=None):
  """The command line (module docstring); argv: the words after the program name."""
  tool_flags.parse(FLAGS, argv)
  config = FLAGS.config
  if config.trainer not in _TRAINERS:
    raise app.UsageError(f"config.trainer={config.trainer!r} is not one of "
                         f"{_TRAINERS}")
  if FLAGS.dry_run:
    config.dry_run = True
  # Counter-based RNG that partitions without communication (big_vision).
  jax.config.update("jax_threefry_partitionable", True)
  distributed.initialize(config.distributed)
  logging.info("JAX process %d / %d, local devices %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  trainer = importlib.import_module(f"bsf_jax.trainers.{config.trainer}")
  try:
    trainer.train_and_evaluate(config, FLAGS.workdir)
  except (workdir_lock.WorkdirLockedError, checkpointing.CheckpointError,
          store.StoreError) as e:
    # Another run holds the workdir, no checkpoint step restores, or the
    # data store is not this config's: one line saying which, not a traceback.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  tool_flags.run(main)
