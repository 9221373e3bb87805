"""A PyTorch reference for the pre-2025 patch-merging order (tests only).

MONAI 0.9 to 1.4 concatenated the 2x2x2 neighbours of `PatchMerging` with
(0, 1, 0) and (0, 0, 1) twice and (1, 1, 0), (0, 1, 1) never
(monai/networks/nets/swin_unetr.py at MONAI tag 1.4.0; fixed by
https://github.com/Project-MONAI/MONAI/pull/8285). The installed MONAI
computes the corrected order, so this swaps every 3D patch merging of a MONAI
model for one that computes the old order with the same parameters: what
BrainSegFounder's released weights and `model_swinvit.pt` were trained with.
"""

import torch
from monai.networks.nets import swin_unetr as monai_swin
from torch.nn import functional

from bsf_jax.models.swin_config import PATCH_MERGING_ORDERS


class DuplicatedNeighboursMerging(monai_swin.PatchMerging):
  """MONAI's `PatchMerging` with the MONAI 0.9-1.4 neighbour order."""

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    _, d, h, w, _ = x.shape
    x = functional.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
    parts = [x[:, i::2, j::2, k::2, :] for i, j, k in PATCH_MERGING_ORDERS["duplicated_neighbours"]]
    return self.reduction(self.norm(torch.cat(parts, -1)))


def with_duplicated_neighbours(model: torch.nn.Module) -> torch.nn.Module:
  """`model` with each 3D `PatchMerging` computing the pre-2025 order (in place)."""
  swapped = 0
  for module in model.modules():
    if type(module) is monai_swin.PatchMerging:  # pylint: disable=unidiomatic-typecheck
      module.__class__ = DuplicatedNeighboursMerging
      swapped += 1
  if not swapped:
    raise ValueError(f"{type(model).__name__} has no MONAI PatchMerging to swap")
  return model
