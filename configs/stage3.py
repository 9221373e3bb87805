r"""Stage 3: fine-tune SwinUNETR on the target dataset (paper 2.5.3).

  python -m bsf_jax.main --config=configs/stage3.py:dataset=brats2021,fold=0 \
      --config.init_from=runs/s2_brats \
      --config.data.datalist=/data/brats/brats21_folds.json --workdir=runs/s3_f0
  python -m bsf_jax.main --config=configs/stage3.py:dataset=brats2023,fold=0 \
      --config.init_from=runs/s2_brats23 \
      --config.data.root=/data/ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData \
      --workdir=runs/s3_brats23_f0
  python -m bsf_jax.main --config=configs/stage3.py:dataset=atlas \
      --config.init_from=runs/s2_atlas --config.data.root=/data/atlas --workdir=runs/s3_atlas

BraTS: fold k held out; few-shot (paper Table 9) `:fraction=0.1,repeat=3`;
T1 only `:modality=t1`. The label convention (`config.data.label_format`,
bsf_jax/data/labels.py) is stored in the checkpoint, so predictions are
written with the training data's labels (ET 4 in 2021, 3 in 2023+). A new
dataset is one `DATASETS` entry.
"""

from bsf_jax.run import config_lib

# Per dataset: config.data fields, output channels, dropout, crop, batch,
# schedule (paper Table 3, section 2.5.3).
_BRATS = dict(out_channels=3, drop_rate=0.0, roi=(128, 128, 128), batch_size=2,
              num_steps=50_000, eval_every=2_500)
DATASETS = {
    # TC, WT, ET sigmoid channels; z-scored non-zero voxels
    # and 128^3 crops as the BSF BraTS runs; batch 2, lr 1e-4, 50,000 steps.
    "brats2021": dict(data=dict(dataset="brats", label_format="brats2021"), **_BRATS),
    "brats2023": dict(data=dict(dataset="brats", label_format="brats2023"), **_BRATS),
    # One sigmoid lesion channel; dropout 0.1 (section 2.5.3); batch 4.
    "atlas": dict(data=dict(dataset="atlas", label_format="atlas"), out_channels=1,
                  drop_rate=0.1, roi=(96, 96, 96), batch_size=4, num_steps=20_000,
                  eval_every=1_000),
}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, dataset="brats2021", size="tiny",
                             modality="all", fold=0, fraction=1.0, repeat=0,
                             runlocal=False)
  if arg.dataset not in DATASETS:
    raise ValueError(f"dataset={arg.dataset!r}; expected one of {list(DATASETS)}")
  ds = DATASETS[arg.dataset]
  config = config_lib.base_config("finetune")
  config.model = config_lib.model_config("swin_unetr", arg.size)
  # bfloat16 compute on accelerators (params, optimizer state, norms, softmax
  # and losses stay float32); `:runlocal` and the demo compute in float32.
  config.model.dtype = "bfloat16"
  config.model.out_channels = ds["out_channels"]
  config.model.drop_rate = ds["drop_rate"]
  config.data.update(ds["data"])
  config.data.modalities = config_lib.MODALITY_SETS[config.data.dataset][arg.modality]
  config.data.fold = arg.fold
  # Few-shot: this fraction of the training records, drawn with this seed.
  config.data.fraction = arg.fraction
  config.data.repeat_seed = arg.repeat
  config.data.augment = True
  config.data.intensity = "zscore_nonzero"
  config.data.roi = ds["roi"]
  # One crop per volume.
  config.data.num_samples = 1
  config.data.batch_size = ds["batch_size"]
  # lr 1e-4 with cosine annealing (paper section 2.5.3).
  config.optim.lr = 1e-4
  config.train.num_steps = ds["num_steps"]
  config.train.eval_every = ds["eval_every"]
  config.train.ckpt_every = 1_000
  # Channels are mapped by modality name from a stage-1/2 checkpoint.
  config.init_adapt_channels = True
  if arg.runlocal:
    config_lib.runlocal(config)
    config.data.num_samples = 1
  return config
