"""SwinUNETR segmentation model, numerically equal to MONAI's `SwinUNETR`.

Swin encoder (`swinViT`) + UNETR CNN decoder: residual conv blocks on the
input and on the hidden states (`encoder1..4`, `encoder10`), transposed-conv
up-blocks (`decoder5..1`) and a 1x1x1 output conv (`out`). Channels-last.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bsf_jax.models import layers
from bsf_jax.models.swin import SwinTransformer
from bsf_jax.models.variants import check_input_size

Dtype = Any


class SwinUNETR(nn.Module):
  """MONAI `SwinUNETR(in_channels, out_channels, feature_size, depths, num_heads, ...)`.

  Attributes:
    in_channels: input channels (modalities).
    out_channels: output channels (classes).
    feature_size: stage-1 width, a multiple of 12 (MONAI rule).
    depths, num_heads, window_size, patch_size, mlp_ratio, qkv_bias: encoder geometry.
    drop_rate, attn_drop_rate, dropout_path_rate: encoder dropout and stochastic depth
      (rng "dropout", only when deterministic=False).
    normalize: parameter-free LayerNorm on the hidden states (MONAI default True).
    remat: rematerialise Swin blocks and conv blocks in the backward pass.
    dtype: compute dtype; param_dtype: parameter dtype.
  """
  in_channels: int
  out_channels: int
  feature_size: int = 48
  depths: Sequence[int] = (2, 2, 2, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int | Sequence[int] = 7
  patch_size: int = 2
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  dropout_path_rate: float = 0.0
  normalize: bool = True
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    """x: (B, H, W, D, in_channels) -> logits (B, H, W, D, out_channels)."""
    if self.feature_size % 12:
      raise ValueError(f"feature_size must be divisible by 12 (MONAI rule), got {self.feature_size}")
    check_input_size(x.shape[1:4], self.patch_size)
    f = self.feature_size
    kw = dict(remat=self.remat, dtype=self.dtype, param_dtype=self.param_dtype)
    hs = SwinTransformer(
        self.in_channels, f, self.depths, self.num_heads, self.window_size, self.patch_size,
        self.mlp_ratio, self.qkv_bias, self.drop_rate, self.attn_drop_rate, self.dropout_path_rate,
        self.normalize, self.remat, self.dtype, self.param_dtype, name="swinViT")(x, deterministic)
    # Exposed for inspection/tests: `apply(..., mutable=["intermediates"])`.
    self.sow("intermediates", "hidden_states", tuple(hs))
    enc0 = layers.UnetrBasicBlock(f, name="encoder1", **kw)(x)
    enc1 = layers.UnetrBasicBlock(f, name="encoder2", **kw)(hs[0])
    enc2 = layers.UnetrBasicBlock(2 * f, name="encoder3", **kw)(hs[1])
    enc3 = layers.UnetrBasicBlock(4 * f, name="encoder4", **kw)(hs[2])
    dec4 = layers.UnetrBasicBlock(16 * f, name="encoder10", **kw)(hs[4])
    # hs[3] goes straight to the decoder, without an encoder block (as in MONAI).
    dec3 = layers.UnetrUpBlock(8 * f, name="decoder5", **kw)(dec4, hs[3])
    dec2 = layers.UnetrUpBlock(4 * f, name="decoder4", **kw)(dec3, enc3)
    dec1 = layers.UnetrUpBlock(2 * f, name="decoder3", **kw)(dec2, enc2)
    dec0 = layers.UnetrUpBlock(f, name="decoder2", **kw)(dec1, enc1)
    out = layers.UnetrUpBlock(f, name="decoder1", **kw)(dec0, enc0)
    logits = layers.UnetOutBlock(self.out_channels, self.dtype, self.param_dtype, name="out")(out)
    return logits
