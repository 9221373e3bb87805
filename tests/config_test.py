"""Configs: every stage config loads, typed arguments, runlocal, overrides."""

import os

import pytest

from bsf_jax.run import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("stage1", "stage2", "stage3", "demo")
DATASETS = ("brats2021", "brats2023", "atlas")


def load(name, arg=None):
  return config_lib.load_file(os.path.join(ROOT, "configs", name + ".py"), arg)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads(name):
  config = load(name)
  assert config.trainer in ("pretrain", "finetune", "demo")


@pytest.mark.parametrize("dataset", DATASETS)
def test_stage2_and_stage3_take_a_dataset(dataset):
  s2, s3 = load("stage2", f"dataset={dataset}"), load("stage3", f"dataset={dataset}")
  brats = dataset.startswith("brats")
  for c in (s2, s3):
    assert c.data.dataset == ("brats" if brats else "atlas")
    assert c.data.modalities == (("flair", "t1ce", "t1", "t2") if brats else ("t1",))
  assert s2.data.label_format == "none" and s3.data.label_format == dataset
  assert s3.model.out_channels == (3 if brats else 1)
  # The paper's per-dataset settings (Table 3, section 2.5.3).
  assert (s2.optim.lr, s2.data.batch_size) == ((1e-4, 4) if brats else (3e-3, 8))
  assert s3.data.roi == ((128,) * 3 if brats else (96,) * 3)
  assert s3.model.drop_rate == (0.0 if brats else 0.1)
  with pytest.raises(ValueError, match="dataset='brats2019'"):
    load("stage3", "dataset=brats2019")


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
  config = load("stage3", "size=big,fold=3,fraction=0.1,repeat=2")
  assert config.model.depths == (2, 2, 18, 2)
  assert (config.data.fold, config.data.fraction, config.data.repeat_seed) == (3, 0.1, 2)
  assert load("stage1", "size=2-2-4-2").model.depths == (2, 2, 4, 2)


def test_runlocal_shrinks():
  config = load("stage3", "dataset=atlas,runlocal")
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


def _stage_config_names():
  return sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
                if f.startswith("stage") and f.endswith(".py"))


@pytest.mark.parametrize("name", _stage_config_names())
def test_stage_configs_compute_in_bf16_and_runlocal_in_fp32(name):
  # bf16 pays on accelerators; on CPUs it is slower, so runlocal stays fp32.
  assert load(name).model.dtype == "bfloat16"
  assert load(name).model.impl == "auto"
  assert load(name, "runlocal").model.dtype == "float32"


def test_demo_computes_in_fp32():
  demo = load("demo")
  assert [demo[s].model.dtype for s in ("stage1", "stage2", "stage3")] == ["float32"] * 3


@pytest.mark.parametrize("key, value, message", [
    ("impl", "tpu", "config.model.impl='tpu'"),
    ("attention", "flash", "config.model.attention='flash'"),
    ("remat", "sometimes", "config.model.remat='sometimes'"),
    ("attention", "cudnn", "config.model.attention='cudnn' needs dtype='bfloat16'"),
])
def test_model_choices_are_validated(key, value, message):
  config = load("stage1", "runlocal")
  config.model[key] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_sw_batch_size_must_split_over_each_processes_devices():
  config = load("stage3", "dataset=brats2021,runlocal")
  config.seg.sw_batch_size = 3
  with pytest.raises(ValueError, match=r"sw_batch_size=3 must be divisible by "
                     r"the 2 devices of each process"):
    config_lib.validate(config, inference_devices=2)
  config_lib.validate(config, inference_devices=3)
  config_lib.validate(config)  # not checked without a device count
