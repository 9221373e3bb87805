r"""Stage 2: SSL pretraining on BraTS 2021, starting from stage 1 (paper 2.5.2).

  python -m bsf_jax.main --config=configs/stage2_brats.py \
      --config.init_from=runs/s1 --config.data.datalist=/data/brats/brats21_folds.json \
      --workdir=runs/s2_brats
Input channels go from UKB's (t1, flair) to BraTS's 4: matching channels keep
their weights, t1ce and t2 are new (init_adapt_channels, SPEC section 5).
"""

from bsf_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="tiny", modality="all", fold=0,
                             runlocal=False)
  config = config_lib.base_config("pretrain")
  config.model = config_lib.model_config("ssl_head", arg.size)
  config.data.dataset = "brats"
  # BSF's channel order [flair, t1ce, t1, t2]; "t1" for the T1-only ablation.
  config.data.modalities = config_lib.MODALITY_SETS["brats"][arg.modality]
  # Stage 2 pretrains on the training folds only, never on fold k's volumes.
  config.data.fold = arg.fold
  config.data.roi = (96, 96, 96)
  # Batch 2 (paper Table 3) x num_samples 2 crops.
  config.data.batch_size = 4
  # lr 1e-4, 50,000 steps (paper Table 3).
  config.optim.lr = 1e-4
  config.train.num_steps = 50_000
  config.train.eval_every = 1_000
  config.train.ckpt_every = 1_000
  config.train.eval_batches = 16
  # Stage 1 -> 2 changes the input channels, mapped by modality name.
  config.init_adapt_channels = True
  if arg.runlocal:
    config_lib.runlocal(config)
  return config
