"""Named post-processing of predicted region masks (off unless asked for).

  python -m bsf_jax.predict ... --postprocess et_to_necrosis_below=500

Each option is `NAME=VALUE`, several comma-separated, applied in the order
given to the binary region masks [H, W, D, K] after the threshold, before
labels are written or scored. Saved probabilities are never post-processed.

Options:
  et_to_necrosis_below=N (BraTS): when a volume's predicted enhancing tumour
    has fewer than N voxels, those voxels become necrosis: they leave ET and
    stay tumour core (and whole tumour). BraTS scores ET Dice 1 on a volume
    without ET only if no ET is predicted, and 0 for any false positive, so
    dropping a small uncertain ET trades little on true ET for a lot on
    volumes without it. Source: Isensee et al., "nnU-Net for Brain Tumor
    Segmentation", BrainLes 2020 (arXiv:2011.00848), and its code,
    MIC-DKFZ/nnUNet v1 `nnunet/dataset_conversion/Task082_BraTS_2020.py`
    (`apply_brats_threshold`: fewer ET voxels than the threshold -> necrosis;
    `determine_brats_postprocessing` picks the threshold that maximises the
    cross-validation ET Dice, searching 0-750 voxels). Pick N the same way,
    on validation predictions, not on the test set.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _et_to_necrosis(masks: np.ndarray, min_voxels: int, regions: list[str]
                    ) -> np.ndarray:
  tc, wt, et = (regions.index(r) for r in ("TC", "WT", "ET"))
  if np.count_nonzero(masks[..., et]) >= min_voxels:
    return masks
  out = masks.copy()
  # Necrosis is tumour core and whole tumour, not enhancing.
  out[..., tc] |= masks[..., et]
  out[..., wt] |= masks[..., et]
  out[..., et] = False
  return out


# name -> (function(masks, value, regions), value parser, regions it needs).
OPTIONS: dict[str, tuple[Callable, Callable, tuple[str, ...]]] = {
    "et_to_necrosis_below": (_et_to_necrosis, int, ("TC", "WT", "ET")),
}


def parse(spec: str | None, regions) -> list[tuple[str, object]]:
  """`NAME=VALUE[,NAME=VALUE]` -> [(name, value)], checked against the regions.

  Args:
    spec: the flag's value; None or "" for no post-processing.
    regions: the model's output regions in channel order (e.g. TC, WT, ET).

  Raises:
    ValueError: an unknown option, a bad value, or an option whose regions
      the model does not predict (one line naming it).
  """
  steps = []
  for item in (spec or "").split(","):
    if not item.strip():
      continue
    name, sep, value = item.partition("=")
    name = name.strip()
    if name not in OPTIONS or not sep:
      raise ValueError(f"--postprocess {item!r}: expected NAME=VALUE with NAME "
                       f"one of {sorted(OPTIONS)}")
    _, convert, needs = OPTIONS[name]
    try:
      parsed = convert(value)
    except ValueError:
      raise ValueError(f"--postprocess {item!r}: bad value {value!r}") from None
    missing = [r for r in needs if r not in list(regions)]
    if missing:
      raise ValueError(f"--postprocess {name}: needs regions {list(needs)}; the "
                       f"model predicts {list(regions)}")
    steps.append((name, parsed))
  return steps


def apply(masks: np.ndarray, steps: list[tuple[str, object]], regions
          ) -> np.ndarray:
  """The masks [H, W, D, K] after each parsed step, in order."""
  masks = np.asarray(masks, bool)
  for name, value in steps:
    masks = OPTIONS[name][0](masks, value, list(regions))
  return masks
