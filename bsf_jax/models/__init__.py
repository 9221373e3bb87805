"""Flax (linen) models that match MONAI's SwinUNETR family numerically.

Channels-last inputs (B, H, W, D, C), spatial axes in MONAI's order. The
constructors take MONAI's keyword names plus `impl`, `attention` and `remat`
(`SwinConfig`), keyword only:

  models.SwinUNETR(in_channels=4, out_channels=3, feature_size=48,
                   depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), impl="xla")

Weight exchange with PyTorch/MONAI lives in `bsf_jax.convert`.
"""

from bsf_jax.models.ssl_head import SSLHeadNet
from bsf_jax.models.swin import SwinTransformerNet
from bsf_jax.models.swin_config import (ATTENTION_KERNELS, IMPLS, REMAT_CHOICES, SwinConfig,
                                        constructor, resolve_impl, with_compute_dtype)
from bsf_jax.models.swin_unetr import SwinUNETRNet
from bsf_jax.models.variants import NUM_HEADS, SIZES, check_input_size, decode_size

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

__all__ = ["SSLHead", "SwinTransformer", "SwinUNETR", "SSLHeadNet", "SwinTransformerNet",
           "SwinUNETRNet", "SwinConfig", "IMPLS", "ATTENTION_KERNELS", "REMAT_CHOICES",
           "resolve_impl", "with_compute_dtype", "SIZES", "NUM_HEADS", "decode_size", "check_input_size"]
