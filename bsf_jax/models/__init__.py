"""Flax (linen) models that match MONAI's SwinUNETR family numerically.

Channels-last inputs (B, H, W, D, C), spatial axes in MONAI's order. Weight
exchange with PyTorch/MONAI lives in `bsf_jax.convert`.
"""

from bsf_jax.models.ssl_head import SSLHead
from bsf_jax.models.swin import SwinTransformer
from bsf_jax.models.swin_unetr import SwinUNETR
from bsf_jax.models.variants import NUM_HEADS, SIZES, check_input_size, decode_size

__all__ = ["SSLHead", "SwinTransformer", "SwinUNETR", "SIZES", "NUM_HEADS", "decode_size",
           "check_input_size"]
