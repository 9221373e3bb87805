"""SwinUNETR segmentation model, numerically equal to MONAI's `SwinUNETR`.

Swin encoder (`swinViT`) + UNETR CNN decoder: residual conv blocks on the
input and on the hidden states (`encoder1..4`, `encoder10`), transposed-conv
up-blocks (`decoder5..1`) and a 1x1x1 output conv (`out`). Channels-last.
"""

import flax.linen as nn
import jax

from bsf_jax.models import layers
from bsf_jax.models.swin import SwinTransformerNet
from bsf_jax.models.swin_config import SwinConfig
from bsf_jax.models.variants import check_input_size


class SwinUNETRNet(nn.Module):
  """MONAI `SwinUNETR(in_channels, out_channels, feature_size, depths, num_heads, ...)`.

  Build it with `bsf_jax.models.SwinUNETR(in_channels=..., out_channels=...,
  **MONAI keywords)`.

  Attributes:
    in_channels: input channels (modalities).
    out_channels: output channels (classes).
    config: the encoder settings (`SwinConfig`); its feature_size must be a
      multiple of 12 (MONAI rule), its remat also covers the conv blocks.
  """
  in_channels: int
  out_channels: int
  config: SwinConfig = SwinConfig()

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    """x: (B, H, W, D, in_channels) -> logits (B, H, W, D, out_channels)."""
    cfg = self.config
    if cfg.feature_size % 12:
      raise ValueError(f"feature_size must be divisible by 12 (MONAI rule), got {cfg.feature_size}")
    check_input_size(x.shape[1:4], cfg.patch_size)
    f = cfg.feature_size
    hs = SwinTransformerNet(self.in_channels, config=cfg, name="swinViT")(x, deterministic)
    # Exposed for inspection/tests: `apply(..., mutable=["intermediates"])`.
    self.sow("intermediates", "hidden_states", tuple(hs))
    basic = lambda width, name: layers.UnetrBasicBlock(width, config=cfg, name=name)
    up = lambda width, name: layers.UnetrUpBlock(width, config=cfg, name=name)
    enc0 = basic(f, "encoder1")(x)
    enc1 = basic(f, "encoder2")(hs[0])
    enc2 = basic(2 * f, "encoder3")(hs[1])
    enc3 = basic(4 * f, "encoder4")(hs[2])
    dec4 = basic(16 * f, "encoder10")(hs[4])
    # hs[3] goes straight to the decoder, without an encoder block (as in MONAI).
    dec3 = up(8 * f, "decoder5")(dec4, hs[3])
    dec2 = up(4 * f, "decoder4")(dec3, enc3)
    dec1 = up(2 * f, "decoder3")(dec2, enc2)
    dec0 = up(f, "decoder2")(dec1, enc1)
    out = up(f, "decoder1")(dec0, enc0)
    return layers.UnetOutBlock(self.out_channels, config=cfg, name="out")(out)
