"""The demo trainer: all three stages and the evaluation, one command.

Each stage is an ordinary run in its own sub-workdir (stage1/, stage2/,
stage3/) with `init_from` pointing at the previous one, so the demo exercises
exactly what a user runs on a cluster, and rerunning resumes each stage.
"""

from __future__ import annotations

import glob
import logging
import os
import time

import ml_collections

from bsf_jax.trainers import finetune, pretrain
from bsf_jax.weights import evaluation


def _cohort(config: ml_collections.ConfigDict, data_dir: str) -> dict[str, str]:
  """Writes the synthetic cohort once; returns the datalists of each layout."""
  marker = os.path.join(data_dir, "COMPLETE")
  if not os.path.exists(marker):
    from bsf_jax.data import demo
    start = time.time()
    demo.write_demo_cohort(data_dir, subjects=config.cohort.subjects,
                           seed=config.cohort.seed, small=config.cohort.small)
    with open(marker, "w") as f:
      f.write("ok\n")
    print(f"demo cohort written to {data_dir} in {time.time() - start:.1f}s")

  def one(pattern):
    found = sorted(glob.glob(os.path.join(data_dir, pattern)))
    if not found:
      raise FileNotFoundError(f"demo cohort has no {pattern} in {data_dir}")
    return found[0]

  return {"ukb": one("ukb/*.json"), "brats": one("brats/*folds*.json")}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  start = time.time()
  data_dir = os.path.join(workdir, "data")
  datalists = _cohort(config, data_dir)
  stages = [
      ("stage1", config.stage1, pretrain, datalists["ukb"], ""),
      ("stage2", config.stage2, pretrain, datalists["brats"], "stage1"),
      ("stage3", config.stage3, finetune, datalists["brats"], "stage2"),
  ]
  for name, stage, trainer, datalist, previous in stages:
    stage.data.datalist = datalist
    stage.data.root = os.path.dirname(datalist)
    stage.seed = config.seed
    if previous:
      stage.init_from = os.path.join(workdir, previous)
    t0 = time.time()
    print(f"=== {name}: {stage.trainer} on {stage.data.dataset}, "
          f"{stage.train.num_steps} steps")
    trainer.train_and_evaluate(stage, os.path.join(workdir, name))
    print(f"=== {name} done in {time.time() - t0:.0f}s")

  table = evaluation.evaluate_run(os.path.join(workdir, "stage3"),
                                  config.stage3, workdir)
  print(table)
  print(f"demo finished in {time.time() - start:.0f}s; results in {workdir}")
  logging.info("demo finished")
