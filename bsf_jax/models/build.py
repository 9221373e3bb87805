"""Model construction, once: from MONAI's keywords, or from a run's config.

`build(kind, **kwargs)` is what weight conversion uses (kwargs read off a
PyTorch state dict); `from_config(config)` is what every run, `predict` and
`evaluate` use. Both end in the same constructors.
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
  # A config written before the field existed computed MONAI 1.5's order.
  order = config.model.get("patch_merging", "all_neighbours")
  if order != "auto":
    return order
  if config.get("init_from"):
    raise ValueError("config.model.patch_merging='auto' is resolved from config.init_from "
                     "by transfer.resolve_patch_merging before the model is built")
  return "all_neighbours"


def from_config(config: Any, devices=None) -> Any:
  """The module named by `config.model`, one input channel per modality.

  Args:
    config: a run's config (`config.model` and `config.data.modalities`).
    devices: the run's mesh devices, what impl="auto" resolves against
      (None: `jax.devices()`, which a default mesh is built from).
  """
  cfg = config.model
  kwargs = dict(
      in_channels=len(config.data.modalities), feature_size=cfg.feature_size,
      depths=tuple(cfg.depths), num_heads=tuple(cfg.num_heads),
      dropout_path_rate=cfg.dropout_path_rate, drop_rate=cfg.drop_rate,
      attn_drop_rate=cfg.attn_drop_rate, dtype=jnp.dtype(cfg.dtype),
      remat=cfg.remat, impl=cfg.impl, attention=cfg.attention,
      patch_merging=patch_merging_of(config), devices=devices)
  if cfg.name == "ssl_head":
    return build("ssl_head", upsample=cfg.upsample, **kwargs)
  if cfg.name == "swin_unetr":
    if cfg.out_channels <= 0:
      raise ValueError("config.model.out_channels must be > 0 for swin_unetr")
    return build("swin_unetr", out_channels=cfg.out_channels, **kwargs)
  raise ValueError(f"config.model.name={cfg.name!r}: expected 'ssl_head' or "
                   "'swin_unetr'")
