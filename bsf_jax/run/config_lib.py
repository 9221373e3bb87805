"""Shared pieces of the Python configs in `configs/`.

Configs are code: `configs/*.py` files are executed by `--config=...`. Never load
a config from a checkpoint or from anywhere you do not trust; checkpoints store
the *resolved* config as JSON for reference only, and nothing reads it back as
code.

A config file looks like (big_vision style):

  def get_config(arg=None):
    arg = config_lib.parse_arg(arg, size="tiny", runlocal=False)
    config = config_lib.base_config(trainer="pretrain")
    ...
    if arg.runlocal:
      config_lib.runlocal(config)
    return config
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

# Modality sets by name, in the canonical order each dataset stores them.
MODALITY_SETS = {
    "ukb": {"t1": ("t1",), "t2": ("flair",), "flair": ("flair",),
            "t1t2": ("t1", "flair")},
    # BraTS channel order [flair, t1ce, t1, t2] is what BSF's released models
    # expect; a wrong order silently gives Dice ~0, hence the input contract.
    "brats": {"all": ("flair", "t1ce", "t1", "t2"), "t1": ("t1",),
              "t2": ("t2",), "flair": ("flair",), "t1t2": ("t1", "flair")},
    "atlas": {"t1": ("t1",), "all": ("t1",)},
}


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
  """Parses `key=value,key=value` config arguments against typed defaults.

  `--config=configs/stage1.py:size=small,runlocal=True` calls
  `get_config("size=small,runlocal=True")`. Every key must be declared in
  `spec`, and values are converted to the type of the default, so a typo is an
  error rather than a silently ignored argument.

  Args:
    arg: the string after the colon, or None.
    **spec: argument names and their defaults.

  Returns:
    A locked ConfigDict with one field per spec entry.
  """
  result = ml_collections.ConfigDict(dict(spec))
  if arg:
    for item in arg.split(","):
      if "=" not in item:
        # A bare name is a boolean flag: `:runlocal` == `:runlocal=True`.
        key, value = item.strip(), "True"
      else:
        key, value = (s.strip() for s in item.split("=", 1))
      if key not in spec:
        raise ValueError(
            f"Unknown config argument {key!r} in {arg!r}; known arguments: "
            f"{sorted(spec)}")
      result[key] = _convert(key, value, spec[key])
  result.lock()
  return result


def _convert(key: str, value: str, default: Any) -> Any:
  if isinstance(default, bool):
    if value.lower() in ("1", "true", "yes"):
      return True
    if value.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"Config argument {key}={value!r} is not a boolean")
  if isinstance(default, (int, float)):
    try:
      return type(default)(value)
    except ValueError:
      raise ValueError(f"Config argument {key}={value!r} is not a "
                       f"{type(default).__name__}") from None
  return value


def model_config(name: str, size: str = "tiny") -> ml_collections.ConfigDict:
  """The `config.model` block shared by all stages."""
  from bsf_jax.models import variants
  # Config arguments are comma-separated, so depths are written 2-2-4-2.
  try:
    depths = variants.decode_size(size.replace("-", ","))
  except ValueError:
    raise ValueError(f"model size {size!r} is not one of "
                     f"{sorted(variants.SIZES)} nor four dash-separated depths "
                     "like 2-2-4-2") from None
  return ml_collections.ConfigDict(dict(
      # "ssl_head" (stages 1-2) or "swin_unetr" (stage 3).
      name=name,
      # Tiny/Small/Big = depths 2-2-{2,6,18}-2 (paper Table 1).
      depths=depths,
      # Heads per stage, MONAI/BSF default.
      num_heads=variants.NUM_HEADS,
      # Embedding width of stage 0; 48 in the paper and MONAI.
      feature_size=48,
      # Segmentation outputs (stage 3): 3 for BraTS TC/WT/ET, 1 for ATLAS.
      out_channels=0,
      # SSL reconstruction decoder; "vae" is what BSF trains with.
      upsample="vae",
      # Stochastic depth, dropout, attention dropout: 0 in BSF pretraining.
      dropout_path_rate=0.0,
      drop_rate=0.0,
      attn_drop_rate=0.0,
      # Compute dtype ("float32" or "bfloat16"); params, optimizer state,
      # norms, softmax and losses stay float32. The stage configs use
      # bfloat16 (accelerators); runlocal and the demo use float32.
      dtype="float32",
      # Kernels: "auto" (from the run's devices), "xla" or "cpu"
      # (docs/models.md has the table).
      impl="auto",
      # Window attention: "einsum", "xla_dpa" or "cudnn" (bf16, NVIDIA GPUs).
      attention="einsum",
      # What the backward recomputes: "none", "block" (each Swin block and
      # conv block from its input) or a jax.checkpoint_policies name such as
      # "dots_saveable".
      remat="none",
      # The order patch merging concatenates each 2x2x2 block's voxels in:
      # "all_neighbours" (MONAI >= 1.5), "duplicated_neighbours" (MONAI
      # 0.9-1.4, what BrainSegFounder's released weights were trained with),
      # or "auto": config.init_from's order (all_neighbours without one).
      patch_merging="auto",
  ))


def train_config() -> ml_collections.ConfigDict:
  """The `config.train` block: loop lengths, cadence and checkpoint policy."""
  return ml_collections.ConfigDict(dict(
      # Total optimizer steps.
      num_steps=1000,
      # Host-side metric logging cadence (one device_get per this many steps).
      log_every=50,
      # Validation cadence in steps (0 = only at the end).
      eval_every=500,
      # Number of validation batches (SSL) or volumes (segmentation); -1 = all.
      eval_batches=-1,
      # Asynchronous checkpoint cadence in steps.
      ckpt_every=500,
      # Keep this many most recent checkpoints (resume points).
      keep_last=2,
      # Also keep the best this many by validation metric (never evicts latest).
      keep_best=1,
      # What to do when a step's loss or gradient is not finite: "skip" leaves
      # params untouched and counts it; "halt" stops with the last good
      # checkpoint intact.
      nonfinite="skip",
      # Image summaries (mid slices) every this many steps (0 = off).
      image_every=0,
  ))


def seg_config() -> ml_collections.ConfigDict:
  """The `config.seg` block: stage-3 loss and whole-volume validation."""
  from bsf_jax.infer import metrics  # Here, so configs/*.py import cheaply.
  return ml_collections.ConfigDict(dict(
      # "dice" (BSF: DiceLoss(sigmoid=True)) or "dice_ce" (Dice + BCE).
      loss="dice",
      # Squared prediction in the Dice denominator (BSF script option).
      squared_pred=False,
      # Dice smoothing as in the BSF fine-tuning script (0 and 1e-6).
      smooth_nr=0.0,
      smooth_dr=1e-6,
      # Sigmoid threshold for the TC/WT/ET masks: p >= threshold is
      # foreground (`metrics.binarize`, MONAI AsDiscrete).
      threshold=metrics.THRESHOLD,
      # Sliding-window validation: overlap 0.5 (BSF), windows per batch.
      sw_overlap=0.5,
      sw_batch_size=4,
      # "constant" (BSF/MONAI default) or "gaussian" blending.
      sw_mode="constant",
      # Freeze the pretrained Swin encoder (linear-probe style ablation).
      freeze_encoder=False,
  ))


def base_config(trainer: str) -> ml_collections.ConfigDict:
  """A complete config with every block at its default."""
  # Imported here so `configs/*.py` can import config_lib cheaply.
  from bsf_jax.run import distributed
  from bsf_jax.step import optim, sharding, ssl_step
  from bsf_jax.data import pipeline

  config = ml_collections.ConfigDict()
  # Which trainer runs: "pretrain" (stages 1-2), "finetune" (stage 3), "demo".
  config.trainer = trainer
  # Global seed: data order, augmentation and dropout keys all derive from it.
  config.seed = 42
  config.model = model_config("ssl_head" if trainer == "pretrain"
                              else "swin_unetr")
  config.data = pipeline.default_config()
  config.optim = optim.default_config()
  config.ssl = ssl_step.default_config()
  config.seg = seg_config()
  config.mesh = sharding.default_config()
  config.distributed = distributed.default_config()
  config.train = train_config()
  # Previous stage to start from: a workdir, a checkpoint step dir, or a
  # PyTorch/safetensors file (MONAI SwinUNETR, BSF SSL, model_swinvit.pt).
  config.init_from = ""
  # Which checkpoint of `init_from` when it is a workdir: "best" or "latest".
  config.init_from_step = "best"
  # Declares that input channels may differ from `init_from`'s: channels are
  # then mapped by modality name (as the paper describes stage transfer). Without it a channel
  # mismatch is an error.
  config.init_adapt_channels = False
  # Modalities of `init_from`'s channels, in order, when the source does not
  # record them (PyTorch files); e.g. ("t1", "flair") for BSF's UKB weights.
  config.init_from_modalities = ()
  # Only print mesh/batch/params/memory/first batch, then exit.
  config.dry_run = False
  return config


def runlocal(config: ml_collections.ConfigDict) -> None:
  """Shrinks a config in place so that it runs on a CPU in seconds."""
  config.model.depths = (1, 1, 1, 1)
  config.model.num_heads = (1, 1, 1, 1)
  config.model.feature_size = 12
  # bfloat16 is slower than float32 on CPUs.
  config.model.dtype = "float32"
  # The SSL head reads bottleneck tokens 0 and 1, so SSL crops need >= 2
  # tokens (a dim of 64); H == W for the rotations.
  config.data.roi = (64, 64, 32) if config.trainer == "pretrain" else (32, 32, 32)
  config.data.batch_size = 2
  config.data.num_samples = min(config.data.num_samples, 2)
  config.data.workers = 0
  config.train.num_steps = 4
  config.train.log_every = 1
  config.train.eval_every = 2
  config.train.eval_batches = 2
  config.train.ckpt_every = 2
  config.optim.warmup_steps = 1


def validate(config: ml_collections.ConfigDict,
             inference_devices: int | None = None) -> None:
  """Rejects a training config that would fail later with an obscure error.

  Checked before the workdir is touched, so a bad config never disturbs an
  existing run. Each problem names its config key and value.

  Args:
    config: a stage config (trainer "pretrain" or "finetune").
    inference_devices: devices of one process that split a validation
      volume's sliding windows (fine-tuning); None = not checked.

  Raises:
    ValueError: listing every problem found.
  """
  from bsf_jax.data import pipeline
  from bsf_jax.models import variants
  problems = []
  roi = tuple(config.data.roi)
  multiple = variants.INPUT_MULTIPLE
  if len(roi) != 3 or any(int(r) <= 0 or int(r) % multiple for r in roi):
    problems.append(
        f"config.data.roi={roi}: need 3 positive multiples of {multiple} (the "
        "patch embedding and 4 patch mergings each halve the crop)")
  batch, samples = config.data.batch_size, config.data.num_samples
  if samples <= 0 or batch <= 0 or batch % samples:
    problems.append(f"config.data.batch_size={batch} must be a positive "
                    f"multiple of config.data.num_samples={samples}")
  if (config.model.name == "ssl_head" and len(roi) == 3 and
      all(int(r) > 0 for r in roi) and
      (roi[0] // multiple) * (roi[1] // multiple) * (roi[2] // multiple) < 2):
    problems.append(
        f"config.data.roi={roi}: the SSL head reads bottleneck tokens 0 and 1, "
        f"so the roi needs >= 2 bottleneck tokens (one dim >= {2 * multiple})")
  problems.extend(_model_problems(config))
  try:
    pipeline.seg_augmentation(config.data)
  except ValueError as e:
    problems.append(f"config.{e}")
  seg = config.get("seg")
  if (inference_devices and config.trainer == "finetune" and seg is not None
      and seg.sw_batch_size % inference_devices):
    problems.append(
        f"config.seg.sw_batch_size={seg.sw_batch_size} must be divisible by "
        f"the {inference_devices} devices of each process, which split every "
        "validation volume's windows (the inference mesh's data axis)")
  if config.train.nonfinite not in ("skip", "halt"):
    problems.append(f"config.train.nonfinite={config.train.nonfinite!r}: "
                    "expected 'skip' or 'halt'")
  for key in ("num_steps", "log_every", "ckpt_every"):
    if config.train[key] <= 0:
      problems.append(f"config.train.{key}={config.train[key]} must be > 0")
  if problems:
    raise ValueError("Invalid config:\n  " + "\n  ".join(problems))


def _model_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Problems with `config.model`, found by building the model it names.

  The model's own settings (`SwinConfig`) hold every check of heads, kernels,
  remat and merging order; only what a run adds is checked here.
  """
  from bsf_jax import models
  problems = []
  model = config.model
  if model.dtype not in ("float32", "bfloat16"):
    problems.append(f"config.model.dtype={model.dtype!r}: expected 'float32' or 'bfloat16'")
  if model.patch_merging == "auto" and config.get("init_from"):
    # Resolved from the source when the run starts; any order checks the rest.
    config = config.copy_and_resolve_references()
    config.model.patch_merging = "all_neighbours"
  try:
    models.from_config(config)
  except ValueError as e:
    problems.append(f"config.model.{e}")
  return problems


def load_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Executes a config file (Python code: trusted files only) -> get_config(arg).

  What `--config=path:arg` does, for configs that compose others (demo.py)
  and for tests.
  """
  import importlib.util
  name = "bsf_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} not found")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# A run's resolved config, written into its workdir when training starts.
RUN_CONFIG = "config.json"
# The fields JSON turns from tuples into lists.
_TUPLE_FIELDS = (("data", "roi"), ("data", "modalities"), ("model", "depths"),
                 ("model", "num_heads"))


def to_json(config: ml_collections.ConfigDict) -> str:
  """The resolved config as JSON (written to the workdir for reference)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """A run's resolved config (`RUN_CONFIG`), read back as JSON data, never code.

  What `evaluate` predicts and scores a finished run's checkpoints with.
  """
  path = os.path.join(workdir, RUN_CONFIG)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found (not a bsf_jax workdir?)")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  for block, field in _TUPLE_FIELDS:
    config[block][field] = tuple(config[block][field])
  return config
