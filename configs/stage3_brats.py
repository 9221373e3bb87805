r"""Stage 3: fine-tune SwinUNETR on BraTS 2021, fold k held out (paper 2.5.3).

  python -m bsf_jax.main --config=configs/stage3_brats.py:fold=0 \
      --config.init_from=runs/s2_brats \
      --config.data.datalist=/data/brats/brats21_folds.json --workdir=runs/s3_f0
Few-shot (paper Table 9): `:fraction=0.1,repeat=3`. T1 only: `:modality=t1`.
"""

from bsf_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="tiny", modality="all", fold=0,
                             fraction=1.0, repeat=0, runlocal=False)
  config = config_lib.base_config("finetune")
  config.model = config_lib.model_config("swin_unetr", arg.size)
  # TC, WT, ET sigmoid channels (SPEC section 5).
  config.model.out_channels = 3
  config.data.dataset = "brats"
  config.data.modalities = config_lib.MODALITY_SETS["brats"][arg.modality]
  config.data.label_format = "brats"
  config.data.fold = arg.fold
  # Few-shot: this fraction of the training folds, drawn with this seed.
  config.data.fraction = arg.fraction
  config.data.repeat_seed = arg.repeat
  config.data.augment = True
  # The BSF BraTS runs use z-scored non-zero voxels and 128^3 crops.
  config.data.intensity = "zscore_nonzero"
  config.data.roi = (128, 128, 128)
  # Batch 2 (paper Table 3), one crop per volume.
  config.data.num_samples = 1
  config.data.batch_size = 2
  # lr 1e-4, 50,000 steps (paper Table 3 / section 2.5.3).
  config.optim.lr = 1e-4
  config.train.num_steps = 50_000
  config.train.eval_every = 2_500
  config.train.ckpt_every = 1_000
  # Stage 2 had the same 4 channels; from stage 1 they are mapped by name.
  config.init_adapt_channels = True
  if arg.runlocal:
    config_lib.runlocal(config)
    config.data.num_samples = 1
  return config
