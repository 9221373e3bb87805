"""Configs: every stage config loads, typed arguments, runlocal, overrides."""

import os

import pytest

from bsf_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("stage1", "stage2_brats", "stage2_atlas", "stage3_brats",
           "stage3_atlas", "demo")


def load(name, arg=None):
  return config_lib.load_file(os.path.join(ROOT, "configs", name + ".py"), arg)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads(name):
  config = load(name)
  assert config.trainer in ("pretrain", "finetune", "demo")


def test_stage1_matches_paper_table3():
  config = load("stage1")
  assert config.model.depths == (2, 2, 2, 2)
  assert config.data.modalities == ("t1", "flair")
  assert config.data.roi == (96, 96, 96)
  assert config.optim.warmup_steps == 500
  assert config.optim.weight_decay == 0.1
  assert config.data.intensity == "ct_window"


def test_arguments_select_size_modality_and_fold():
  config = load("stage1", "size=small,modality=t1")
  assert config.model.depths == (2, 2, 6, 2)
  assert config.data.modalities == ("t1",)
  config = load("stage3_brats", "size=big,fold=3,fraction=0.1,repeat=2")
  assert config.model.depths == (2, 2, 18, 2)
  assert (config.data.fold, config.data.fraction, config.data.repeat_seed) == (3, 0.1, 2)
  assert load("stage1", "size=2-2-4-2").model.depths == (2, 2, 4, 2)


def test_runlocal_shrinks():
  config = load("stage3_atlas", "runlocal")
  assert config.data.roi == (32, 32, 32)
  assert config.train.num_steps <= 10
  assert config.model.feature_size < 48


@pytest.mark.parametrize("arg, message", [
    ("sise=small", "Unknown config argument 'sise'"),
    ("runlocal=maybe", "not a boolean"),
    ("size=huge", "four dash-separated depths"),
])
def test_bad_arguments_are_named(arg, message):
  with pytest.raises(ValueError, match=message):
    load("stage1", arg)


def test_parse_arg_types():
  arg = config_lib.parse_arg("n=3,lr=0.5,name=x,flag", n=1, lr=1.0, name="",
                             flag=False)
  assert (arg.n, arg.lr, arg.name, arg.flag) == (3, 0.5, "x", True)
  with pytest.raises(ValueError, match="is not a int"):
    config_lib.parse_arg("n=three", n=1)
