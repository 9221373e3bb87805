"""Named model sizes and the input-size rule shared by every model.

BrainSegFounder's Tiny/Small/Big differ only in the depth of stage 3
(feature size 48, heads 3/6/12/24). Any other depths work too.
"""

from typing import Sequence

import numpy as np

SIZES = {"tiny": (2, 2, 2, 2), "small": (2, 2, 6, 2), "big": (2, 2, 18, 2)}
NUM_HEADS = (3, 6, 12, 24)
# Patch embedding (/2) followed by 4 patch mergings (/2 each): 2**5.
INPUT_MULTIPLE = 32


def decode_size(name_or_depths: str | Sequence[int]) -> tuple[int, ...]:
  """Depths for a named size ("tiny", "small", "big") or a depth sequence.

  Args:
    name_or_depths: a name from `SIZES` (case-insensitive), a comma-separated
      string such as "2,2,4,2", or a sequence of 4 ints.

  Returns:
    The depths as a tuple of 4 ints.
  """
  if isinstance(name_or_depths, str):
    key = name_or_depths.strip().lower()
    if key in SIZES:
      return SIZES[key]
    try:
      depths = tuple(int(p) for p in key.split(","))
    except ValueError:
      raise ValueError(f"unknown model size {name_or_depths!r}: use one of {sorted(SIZES)} "
                       "or comma-separated depths like '2,2,4,2'") from None
  else:
    depths = tuple(int(d) for d in name_or_depths)
  if len(depths) != 4 or min(depths) < 1:
    raise ValueError(f"depths must be 4 positive ints, got {name_or_depths!r}")
  return depths


def check_input_size(spatial_shape: Sequence[int], patch_size: int = 2) -> None:
  """Raise ValueError unless every spatial dim is divisible by patch_size**5 (32).

  This is MONAI SwinUNETR's rule: the patch embedding and four patch mergings
  each halve the resolution, and the UNETR decoder must undo that exactly.

  Args:
    spatial_shape: (H, W, D).
    patch_size: patch embedding size (2).
  """
  multiple = patch_size ** 5
  shape = tuple(int(s) for s in spatial_shape)
  bad = [i for i, s in enumerate(shape) if s % multiple or s <= 0]
  if len(shape) != 3 or bad:
    raise ValueError(
        f"input spatial shape {shape}: every spatial dim must be a positive multiple of "
        f"{patch_size}**5 = {multiple} (patch embedding + 4 patch mergings each halve it); "
        f"offending axes (0-based spatial): {bad if len(shape) == 3 else 'need 3 dims'}; "
        f"e.g. pad or crop to {tuple(int(np.ceil(max(s, 1) / multiple)) * multiple for s in shape)}")
