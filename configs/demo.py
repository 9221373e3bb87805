r"""The demo: stage 1 -> stage 2 -> stage 3 -> evaluation on a synthetic cohort.

  python -m bsf_jax.main --config=configs/demo.py --workdir=runs/demo

Writes a small demo cohort (UKB, BraTS and ATLAS layouts, derived from the
MNI152 template) into WORKDIR/data, then runs the three stages of the paper
with a small model on the CPU, each stage starting from the previous one, and
ends with the per-class Dice table and a PNG of a slice with ground truth and
prediction. Each stage is the real stage config shrunk by its `runlocal`
argument; rerunning resumes where it stopped.
"""

import os

import ml_collections

from bsf_jax.run import config_lib, distributed


def _stage(name: str, arg: str) -> ml_collections.ConfigDict:
  """Loads a sibling config file (configs/NAME.py) with argument `arg`."""
  here = os.path.dirname(os.path.abspath(__file__))
  return config_lib.load_file(os.path.join(here, name + ".py"), arg)


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, subjects=8, cohort_seed=0, steps=60,
                             finetune_steps=150)
  config = ml_collections.ConfigDict()
  config.trainer = "demo"
  config.seed = 42
  config.dry_run = False
  config.distributed = distributed.default_config()
  # The synthetic cohort: subjects per dataset, its seed, downsampled volumes.
  config.cohort = ml_collections.ConfigDict(dict(
      subjects=arg.subjects, seed=arg.cohort_seed, small=True))

  small_model = dict(feature_size=12, depths=(1, 1, 1, 1),
                     num_heads=(1, 2, 2, 4))
  config.stage1 = _stage("stage1", "runlocal=True,ct_window=False")
  config.stage2 = _stage("stage2", "dataset=brats2021,runlocal=True")
  config.stage3 = _stage("stage3", "dataset=brats2021,runlocal=True")
  for stage, steps in ((config.stage1, arg.steps), (config.stage2, arg.steps),
                       (config.stage3, arg.finetune_steps)):
    stage.model.update(small_model)
    stage.data.workers = 0
    # SSL crops need >= 2 bottleneck tokens (one dim of 64); H == W.
    stage.data.roi = (64, 64, 32) if stage.trainer == "pretrain" else (32, 32, 32)
    stage.train.num_steps = steps
    stage.train.log_every = 10
    stage.train.eval_every = steps
    stage.train.ckpt_every = steps // 2
    stage.train.eval_batches = -1
    stage.optim.warmup_steps = max(1, steps // 10)
  # SSL stages learn faster at this tiny scale with a larger step.
  config.stage1.optim.lr = 2e-3
  config.stage2.optim.lr = 1e-3
  config.stage3.optim.lr = 3e-3
  config.stage3.data.batch_size = 2
  return config
