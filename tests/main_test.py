"""End to end through the real entry points on the small demo cohort.

2 steps, then a resume that continues from step 2; a stage-1 -> stage-2
transfer with channel expansion (2 -> 4 modalities by name) from stage 1's
best checkpoint; stage 3 from a BrainSegFounder release file with the pre-2025
merging order, and export -> strict MONAI load with equal logits.
"""

import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bsf_jax.run import checkpoint_reads, checkpointing, config_lib
from bsf_jax.trainers import finetune, pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=""):
  return config_lib.load_file(os.path.join(ROOT, "configs", name + ".py"), arg)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  from bsf_jax.data import demo
  out = str(tmp_path_factory.mktemp("cohort"))
  demo.write_demo_cohort(out, subjects=5, seed=0, small=True)
  return out


def _tiny(config, datalist, steps):
  config.data.datalist = datalist
  config.data.root = os.path.dirname(datalist)
  config.data.roi = (64, 64, 32) if config.trainer == "pretrain" else (32, 32, 32)
  config.data.workers = 0
  config.mesh.num_devices = 1
  config.model.update(feature_size=12, depths=(1, 1, 1, 1),
                      num_heads=(1, 1, 1, 1))
  config.train.num_steps = steps
  config.train.eval_every = 2
  config.train.ckpt_every = 2
  config.train.eval_batches = 1
  return config


def _datalist(cohort, pattern):
  return sorted(glob.glob(os.path.join(cohort, pattern)))[0]


def test_pretrain_resume_transfer_finetune_export(cohort, tmp_path, caplog):
  ukb = _datalist(cohort, "ukb/*.json")
  brats = _datalist(cohort, "brats/*folds*.json")

  # Stage 1: two steps, then the same command with 4 steps resumes at 2.
  s1 = str(tmp_path / "s1")
  state = pretrain.train_and_evaluate(
      _tiny(load_config("stage1", "runlocal=True"), ukb, 2), s1)
  assert int(jax.device_get(state.step)) == 2
  manager = checkpointing.make_manager(s1, read_only=True)
  assert manager.latest_step() == 2
  meta = checkpointing.read_meta(manager, 2)
  assert meta["contract"]["modalities"] == ["t1", "flair"]
  assert "val_rec" in meta["metrics"]

  caplog.set_level("INFO")
  config = _tiny(load_config("stage1", "runlocal=True"), ukb, 4)
  state = pretrain.train_and_evaluate(config, s1)
  assert int(jax.device_get(state.step)) == 4
  assert "step 2" in " ".join(r.getMessage() for r in caplog.records
                              if "Resumed from" in r.getMessage())
  with open(os.path.join(s1, "config.json")) as f:
    assert json.load(f)["train"]["num_steps"] == 4
  manager = checkpointing.make_manager(s1, read_only=True)
  assert 4 in manager.all_steps()

  # Stage 2 (BraTS, 4 channels) from stage 1 (2 channels): mapped by name.
  s2 = str(tmp_path / "s2")
  config = _tiny(load_config("stage2", "dataset=brats2021,runlocal=True"), brats, 2)
  config.init_from = s1
  config.train.eval_every = 0
  caplog.clear()
  state = pretrain.train_and_evaluate(config, s2)
  # init_from_step="best" (the default) ranks stage 1 by its own metric.
  best = checkpoint_reads.best_step(checkpointing.make_manager(s1, read_only=True), "val_rec")
  assert f"init_from: {s1} step {best} (best by val_rec)" in caplog.text
  kernel = np.asarray(jax.device_get(
      state.params["swinViT"]["patch_embed"]["proj"]["kernel"]))
  assert kernel.shape[-2] == 4

  # Stage 3 under FSDP from a BrainSegFounder release (init_from lands in
  # sharded params): the {"state_dict": {"module.*"}, "epoch", ...} layout of a
  # reference SSL head trained with MONAI's pre-2025 merging order, which
  # "auto" picks up; then export to MONAI, strictly loadable, equal logits.
  torch = pytest.importorskip("torch")
  monai_nets = pytest.importorskip("monai.networks.nets")
  import legacy_merging  # pylint: disable=g-import-not-at-top
  from bsf_jax.reference.ssl_head import TorchSSLHead  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  released = legacy_merging.with_duplicated_neighbours(TorchSSLHead(
      4, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)))
  release_file = str(tmp_path / "model_weights_BRATS-pretrain.pt")
  torch.save({"state_dict": {f"module.{k}": v for k, v in released.state_dict().items()},
              "epoch": 3, "global_step": 40, "optimizer": {"state": {}, "param_groups": []}},
             release_file)
  s3 = str(tmp_path / "s3")
  config = _tiny(load_config("stage3", "dataset=brats2021,runlocal=True"), brats, 2)
  config.init_from = release_file
  config.train.eval_every = 0
  config.data.num_samples = 1
  config.mesh.update(num_devices=2, data=1, fsdp=2)
  state = finetune.train_and_evaluate(config, s3)
  assert config.model.patch_merging == "duplicated_neighbours"
  decoder = state.params["decoder5"]["conv_block"]["conv1"]["kernel"]
  assert "fsdp" in str(decoder.sharding.spec), decoder.sharding
  # Two AdamW steps move each weight by about 2 lr: the release's encoder
  # arrived (a fresh init would be O(0.1) away).
  released_kernel = released.swinViT.patch_embed.proj.weight.detach().numpy().transpose(2, 3, 4, 1, 0)
  moved = np.abs(np.asarray(jax.device_get(
      state.params["swinViT"]["patch_embed"]["proj"]["kernel"])) - released_kernel)
  assert moved.max() <= 3 * 2 * config.optim.lr, moved.max()
  meta = checkpointing.read_meta(checkpointing.make_manager(s3, read_only=True), 2)
  assert meta["contract"]["model"]["patch_merging"] == "duplicated_neighbours"

  out = str(tmp_path / "s3.pt")
  export = [sys.executable, "-m", "bsf_jax.export", f"--workdir={s3}", "--format=monai",
            f"--out={out}"]
  # MONAI >= 1.5 (installed here) would compute another function: refused, nothing written.
  result = subprocess.run(export, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and "--monai_before_1_5" in result.stderr, result.stderr
  assert len(result.stderr.strip().splitlines()) == 1 and not os.path.exists(out)
  result = subprocess.run(export + ["--monai_before_1_5"], capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr
  assert "MONAI 0.9 to 1.4.x computes the same function" in result.stdout
  net = monai_nets.SwinUNETR(in_channels=4, out_channels=3, feature_size=12,
                             depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
  net.load_state_dict(torch.load(out, weights_only=True), strict=True)
  legacy_merging.with_duplicated_neighbours(net).eval()  # what MONAI 1.4 computes
  # 64^3: at 32^3 MONAI's InstanceNorm rejects the 1^3 bottleneck.
  x = np.random.default_rng(0).normal(size=(1, 64, 64, 64, 4)).astype(np.float32)
  from bsf_jax import models
  model = models.from_config(config)
  ours = np.asarray(model.apply({"params": jax.device_get(state.params)}, x))
  with torch.no_grad():
    theirs = net(torch.from_numpy(x).permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1).numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_cli_dry_run_prints_plan(cohort, tmp_path):
  ukb = _datalist(cohort, "ukb/*.json")
  result = subprocess.run(
      [sys.executable, "-m", "bsf_jax.main", "--config=configs/stage1.py:runlocal",
       f"--workdir={tmp_path / 'dry'}", "--dry_run",
       f"--config.data.datalist={ukb}", "--config.data.workers=0",
       "--config.mesh.num_devices=1"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  for needle in ("mesh:", "per device", "params:", "first batch image"):
    assert needle in result.stdout, result.stdout
  # A dry run trains nothing and saves nothing.
  assert not os.path.exists(tmp_path / "dry" / "checkpoints" / "1")
