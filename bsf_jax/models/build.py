"""Model construction, once: from MONAI's keywords, or from a run's config.

`build(kind, **kwargs)` is what weight conversion uses (kwargs read off a
PyTorch state dict); `from_config(config)` is what every run uses, and
`from_architecture(contract["model"], ...)` what `predict` and `evaluate` use
to rebuild a checkpoint's model from its contract. All end in the same
constructors, whose `SwinConfig` holds every check of the encoder's settings.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from bsf_jax.models.swin_config import constructor
from bsf_jax.models.ssl_head import SSLHeadNet
from bsf_jax.models.swin import SwinTransformerNet
from bsf_jax.models.swin_unetr import SwinUNETRNet

SwinUNETR = constructor(SwinUNETRNet, """MONAI `SwinUNETR`: `SwinUNETRNet` from MONAI's keywords.

  Keywords: in_channels, out_channels, and any `SwinConfig` field
  (feature_size, depths, num_heads, window_size, ..., impl="auto", attention,
  remat, dtype, param_dtype); `devices` is what impl="auto" resolves against.
  """)
SSLHead = constructor(SSLHeadNet, """BrainSegFounder SSL head: `SSLHeadNet` from MONAI's keywords.

  Keywords: in_channels, upsample, rotation_classes, contrastive_dim, and any
  `SwinConfig` field; `devices` is what impl="auto" resolves against.
  """)
SwinTransformer = constructor(SwinTransformerNet, """MONAI `SwinTransformer`: `SwinTransformerNet` from MONAI's keywords.

  Keywords: in_channels and any `SwinConfig` field; `devices` is what
  impl="auto" resolves against.
  """)

# Checkpoint kinds: a segmentation net, an SSL net, or a bare encoder.
KINDS = ("swin_unetr", "ssl_head", "encoder")
_CONSTRUCTORS = {"swin_unetr": SwinUNETR, "ssl_head": SSLHead,
                 "encoder": SwinTransformer}


def build(kind: str, **kwargs) -> Any:
  """The Flax module for `kind` (one of `KINDS`) from MONAI's keywords.

  Lists become tuples (kwargs read back from JSON); impl defaults to "auto".
  """
  if kind not in _CONSTRUCTORS:
    raise ValueError(f"unknown kind {kind!r}; use one of {KINDS}")
  kwargs = {k: tuple(v) if isinstance(v, list) else v
            for k, v in kwargs.items()}
  return _CONSTRUCTORS[kind](**kwargs)


def patch_merging_of(config: Any) -> str:
  """`config.model.patch_merging`, with "auto" resolved where no source decides it.

  "auto" with a `config.init_from` is resolved against the source before the
  model is built (`transfer.resolve_patch_merging`, at the start of a run).
  """
  order = config.model.patch_merging
  if order != "auto":
    return order
  if config.get("init_from"):
    raise ValueError("config.model.patch_merging='auto' is resolved from config.init_from "
                     "by transfer.resolve_patch_merging before the model is built")
  return "all_neighbours"


def architecture(config: Any) -> dict[str, Any]:
  """What a run's model is, as its checkpoints' contract records it (JSON-ready).

  The shape of every parameter and the function the weights compute follow
  from these fields alone; `from_architecture` rebuilds the model from them,
  which is how `predict` and `evaluate` rebuild a checkpoint's model. How the
  model runs (dtype, kernels, remat) and its training-only dropout are not
  part of it.
  """
  cfg = config.model
  return dict(name=cfg.name, depths=[int(d) for d in cfg.depths],
              num_heads=[int(h) for h in cfg.num_heads],
              feature_size=int(cfg.feature_size),
              in_channels=len(config.data.modalities),
              out_channels=int(cfg.out_channels),
              patch_merging=patch_merging_of(config))


def from_architecture(arch: dict[str, Any], run: Any, devices=None) -> Any:
  """The module `arch` (`architecture`'s dict) describes, run as `run` says.

  Args:
    arch: the model's architecture (a checkpoint contract's "model").
    run: a `config.model` block: its dtype, impl, attention and remat, its
      dropout rates and (SSL) decoder.
    devices: what impl="auto" resolves against (None: `jax.devices()`).
  """
  kwargs = dict(
      in_channels=arch["in_channels"], feature_size=arch["feature_size"],
      depths=tuple(arch["depths"]), num_heads=tuple(arch["num_heads"]),
      patch_merging=arch["patch_merging"],
      dropout_path_rate=run.dropout_path_rate, drop_rate=run.drop_rate,
      attn_drop_rate=run.attn_drop_rate, dtype=jnp.dtype(run.dtype),
      remat=run.remat, impl=run.impl, attention=run.attention, devices=devices)
  if arch["name"] == "ssl_head":
    return build("ssl_head", upsample=run.upsample, **kwargs)
  if arch["name"] == "swin_unetr":
    if arch["out_channels"] <= 0:
      raise ValueError("out_channels must be > 0 for swin_unetr")
    return build("swin_unetr", out_channels=arch["out_channels"], **kwargs)
  raise ValueError(f"name={arch['name']!r}: expected 'ssl_head' or 'swin_unetr'")


def from_config(config: Any, devices=None) -> Any:
  """The module named by `config.model`, one input channel per modality.

  Args:
    config: a run's config (`config.model` and `config.data.modalities`).
    devices: the run's mesh devices, what impl="auto" resolves against
      (None: `jax.devices()`, which a default mesh is built from).
  """
  return from_architecture(architecture(config), config.model, devices)
