"""Flax (linen) models that match MONAI's SwinUNETR family numerically.

Channels-last inputs (B, H, W, D, C), spatial axes in MONAI's order. The
constructors take MONAI's keyword names plus `impl`, `attention` and `remat`
(`SwinConfig`), keyword only:

  models.SwinUNETR(in_channels=4, out_channels=3, feature_size=48,
                   depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), impl="xla")

`models.from_config(config)` builds the module a run's config names.
Weight exchange with PyTorch/MONAI lives in `bsf_jax.weights.convert`.
"""

from bsf_jax.models.build import (KINDS, SSLHead, SwinTransformer, SwinUNETR, architecture, build,
                                  from_architecture, from_config, patch_merging_of)
from bsf_jax.models.ssl_head import SSLHeadNet
from bsf_jax.models.swin import SwinTransformerNet
from bsf_jax.models.swin_config import (ATTENTION_KERNELS, IMPLS, REMAT_CHOICES, SwinConfig,
                                        resolve_impl, with_compute_dtype)
from bsf_jax.models.swin_unetr import SwinUNETRNet
from bsf_jax.models.variants import NUM_HEADS, SIZES, check_input_size, decode_size

__all__ = ["build", "from_config", "architecture", "from_architecture", "patch_merging_of", "KINDS", "SSLHead", "SwinTransformer", "SwinUNETR", "SSLHeadNet", "SwinTransformerNet",
           "SwinUNETRNet", "SwinConfig", "IMPLS", "ATTENTION_KERNELS", "REMAT_CHOICES",
           "resolve_impl", "with_compute_dtype", "SIZES", "NUM_HEADS", "decode_size", "check_input_size"]
