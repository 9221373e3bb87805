"""PyTorch reference of the BrainSegFounder SSL head (MONAI `SwinTransformer` + torch layers).

Same architecture and state_dict key names as the SSL head that produced the
BSF checkpoints (`swinViT.*`, `rotation_head.*`, `contrastive_head.*`,
`conv.<i>.*` with the "vae" `nn.Sequential` indices 0, 4, 8, 12, 16, 20), but
with the bottleneck width derived from `feature_size` (16 * feature_size,
768 at 48) and depths/heads as arguments instead of hard-coded. Used by the
parity tests and the SSL benchmark; torch and monai are required.
"""

from typing import Sequence

import torch
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import nn


class TorchSSLHead(nn.Module):
  """Reference SSL head; input (B, C, H, W, D), outputs (rotation, contrastive, reconstruction).

  Args:
    in_channels: input channels (and reconstruction channels).
    feature_size: Swin embedding dim (48 in BSF).
    depths: Swin blocks per stage.
    num_heads: heads per stage.
    dropout_path_rate: stochastic depth of the encoder.
    use_checkpoint: MONAI gradient checkpointing.
  """

  def __init__(self, in_channels: int, feature_size: int = 48,
               depths: Sequence[int] = (2, 2, 2, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
               dropout_path_rate: float = 0.0, use_checkpoint: bool = False):
    super().__init__()
    dim = 16 * feature_size
    self.swinViT = SwinTransformer(
        in_chans=in_channels, embed_dim=feature_size, window_size=(7, 7, 7), patch_size=(2, 2, 2),
        depths=list(depths), num_heads=list(num_heads), mlp_ratio=4.0, qkv_bias=True,
        drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=dropout_path_rate,
        norm_layer=nn.LayerNorm, use_checkpoint=use_checkpoint, spatial_dims=3)
    self.rotation_head = nn.Linear(dim, 4)
    self.contrastive_head = nn.Linear(dim, 512)
    stages = []
    widths = [dim, dim // 2, dim // 4, dim // 8, dim // 16, dim // 16]
    for cin, cout in zip(widths[:-1], widths[1:]):
      stages += [nn.Conv3d(cin, cout, kernel_size=3, stride=1, padding=1), nn.InstanceNorm3d(cout),
                 nn.LeakyReLU(), nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)]
    stages.append(nn.Conv3d(dim // 16, in_channels, kernel_size=1, stride=1))
    self.conv = nn.Sequential(*stages)

  def forward(self, x: torch.Tensor):
    bottleneck = self.swinViT(x.contiguous())[4]
    tokens = bottleneck.flatten(start_dim=2).transpose(1, 2)  # (B, h*w*d, dim)
    rotation = self.rotation_head(tokens[:, 0])
    contrastive = self.contrastive_head(tokens[:, 1])
    reconstruction = self.conv(bottleneck)
    return rotation, contrastive, reconstruction
