"""BrainSegFounder / Swin-UNETR SSL head: rotation, contrastive and reconstruction outputs.

Equal to the reference PyTorch `SSLHead` with upsample="vae" (see
`bsf_jax/reference/ssl_head.py`): on the normalised bottleneck hidden state
(16 * feature_size channels, 768 at feature 48) flattened to tokens,
rotation = Linear(dim, 4)(token 0), contrastive = Linear(dim, 512)(token 1),
reconstruction = 5 x [Conv3d 3^3 -> InstanceNorm -> LeakyReLU -> trilinear x2]
then a 1x1x1 conv back to `in_channels`. Conv module names `conv_0 .. conv_20`
are the indices of the reference `nn.Sequential`.
"""

import flax.linen as nn
import jax

from bsf_jax.models import layers
from bsf_jax.models.swin import SwinTransformerNet
from bsf_jax.models.swin_config import SwinConfig, remat_module
from bsf_jax.models.variants import check_input_size

# Index of each Conv3d in the reference "vae" nn.Sequential (4 modules per stage).
VAE_CONV_INDICES = (0, 4, 8, 12, 16, 20)


class SSLHeadNet(nn.Module):
  """Swin encoder + SSL heads.

  Build it with `bsf_jax.models.SSLHead(in_channels=..., **MONAI keywords)`.

  Attributes:
    in_channels: input channels (also the reconstruction's channels).
    config: the encoder settings (`SwinConfig`); its remat also covers the
      decoder stages.
    upsample: reconstruction decoder; only "vae" (the BSF default) is implemented.
    rotation_classes: rotation logits (4: 0/90/180/270 degrees).
    contrastive_dim: contrastive embedding size (512).
  """
  in_channels: int
  config: SwinConfig = SwinConfig()
  upsample: str = "vae"
  rotation_classes: int = 4
  contrastive_dim: int = 512

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True):
    """x: (B, H, W, D, C) -> (rotation [B, 4], contrastive [B, 512], reconstruction [B, H, W, D, C])."""
    cfg = self.config
    if self.upsample != "vae":
      raise ValueError(f"SSLHead upsample={self.upsample!r} is not implemented; use 'vae'")
    if not cfg.normalize:
      raise ValueError("SSLHead reads normalised hidden states: normalize must be True")
    check_input_size(x.shape[1:4], cfg.patch_size)
    hs = SwinTransformerNet(self.in_channels, config=cfg, name="swinViT")(x, deterministic)
    bottleneck = hs[4]
    b, dim = bottleneck.shape[0], bottleneck.shape[-1]
    tokens = bottleneck.reshape(b, -1, dim)
    if tokens.shape[1] < 2:
      # Indexing token 1 of a single token would silently clamp to token 0.
      raise ValueError(
          f"SSLHead needs at least 2 bottleneck tokens (contrastive head reads "
          f"token 1), but input {x.shape[1:4]} gives {bottleneck.shape[1:4]}: "
          "make at least one spatial dim >= 64")
    dense = lambda n, name: layers.Dense(n, config=cfg, name=name)
    rotation = dense(self.rotation_classes, "rotation_head")(tokens[:, 0])
    contrastive = dense(self.contrastive_dim, "contrastive_head")(tokens[:, 1])

    stage = remat_module(_VaeStage, cfg.remat)
    y = bottleneck
    widths = (dim // 2, dim // 4, dim // 8, dim // 16, dim // 16)
    for idx, width in zip(VAE_CONV_INDICES, widths):
      y = stage(width, config=cfg, name=f"conv_{idx}")(y)
    rec = layers.Conv3d(self.in_channels, 1, config=cfg, name=f"conv_{VAE_CONV_INDICES[-1]}")(y)
    return rotation, contrastive, rec


class _VaeStage(nn.Module):
  """Conv3d 3^3 (with bias) -> InstanceNorm -> LeakyReLU(0.01) -> trilinear x2.

  The module's own params are the conv's (`kernel`, `bias`), so the name
  `conv_<i>` maps straight to the reference's `conv.<i>.weight/bias`.
  """
  features: int
  config: SwinConfig = SwinConfig()

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kernel = self.param("kernel", layers.torch_conv_init, (3, 3, 3, x.shape[-1], self.features),
                        cfg.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), cfg.param_dtype)
    y = layers.conv3d(x.astype(cfg.dtype), kernel.astype(cfg.dtype), impl=cfg.impl)
    y = layers.add_bias(y, bias)
    return layers.upsample_trilinear_x2(layers.leaky_relu(layers.instance_norm(y)))
