r"""Stage 3: fine-tune SwinUNETR on ATLAS v2.0 stroke lesions (paper 2.5.3).

  python -m bsf_jax.main --config=configs/stage3_atlas.py \
      --config.init_from=runs/s2_atlas --config.data.root=/data/atlas --workdir=runs/s3_atlas
"""

from bsf_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="tiny", runlocal=False)
  config = config_lib.base_config("finetune")
  config.model = config_lib.model_config("swin_unetr", arg.size)
  # One sigmoid lesion channel.
  config.model.out_channels = 1
  # Dropout 0.1 (paper section 2.5.3, ATLAS fine-tuning).
  config.model.drop_rate = 0.1
  config.data.dataset = "atlas"
  config.data.modalities = ("t1",)
  config.data.label_format = "atlas"
  config.data.augment = True
  config.data.intensity = "zscore_nonzero"
  config.data.roi = (96, 96, 96)
  config.data.num_samples = 1
  # Batch 4 (paper Table 3).
  config.data.batch_size = 4
  # lr 1e-4 with cosine annealing (paper section 2.5.3).
  config.optim.lr = 1e-4
  config.train.num_steps = 20_000
  config.train.eval_every = 1_000
  config.train.ckpt_every = 1_000
  config.init_adapt_channels = True
  if arg.runlocal:
    config_lib.runlocal(config)
    config.data.num_samples = 1
  return config
