"""Segmentation metrics: MONAI-compatible Dice and Hausdorff, BraTS regions.

All inputs are channels-last binary masks, [B, *spatial, K] for the per-class
metrics (MONAI uses [B, K, *spatial]; only the layout differs).

* `dice` / `reduce_metric` follow `monai.metrics.DiceMetric` and
  `do_metric_reduction`: `include_background`, `ignore_empty` (NaN when the
  ground truth is empty, else 1 for empty/empty and 0 for a false positive on
  an empty ground truth) and the NaN-aware reductions. They work on NumPy
  arrays and, unchanged, on jax arrays inside `jit`.
* `hausdorff_distance` follows `monai.metrics.compute_hausdorff_distance`:
  edges are `mask XOR erosion(mask)`, distances are exact Euclidean distances
  between edge voxels (via `scipy.ndimage.distance_transform_edt`), the
  percentile is linear (`torch.quantile`); empty masks give NaN/inf exactly
  as MONAI. NumPy only.
* `brats_region_dice` / `channels_to_labels` handle the overlapping
  BraTS regions TC, WT, ET, one sigmoid channel each in that order (the
  BraTS challenge's evaluated regions; MONAI's
  `ConvertToMultiChannelBasedOnBratsClassesd` builds the same channels).
* `binarize` is the one probability -> mask rule of the package (validation,
  evaluation, figures, prediction): `p >= threshold`, as MONAI
  `AsDiscrete(threshold=0.5)` in the BraTS reference pipelines.

Challenge scoring (lesion-wise, ATLAS, ISLES'22, BraTS 2023+) and the
per-volume validation scores live in `bsf_jax.infer.scoring`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

REDUCTIONS = ("none", "mean", "sum", "mean_batch", "sum_batch", "mean_channel",
              "sum_channel")
BRATS_REGIONS = ("TC", "WT", "ET")
# Default probability threshold of `binarize` (and `config.seg.threshold`).
THRESHOLD = 0.5


def _xp(*arrays):
  """jax.numpy for jax arrays/tracers, NumPy otherwise."""
  return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _check_pair(pred, gt, min_ndim: int, name: str):
  if pred.shape != gt.shape:
    raise ValueError(f"{name}: pred and gt shapes differ: {tuple(pred.shape)} "
                     f"vs {tuple(gt.shape)}.")
  if pred.ndim < min_ndim:
    raise ValueError(f"{name}: expected channels-last [B, *spatial, K] masks "
                     f"(ndim >= {min_ndim}), got shape {tuple(pred.shape)}.")


def dice_per_channel(pred, gt, include_background: bool = True,
                     ignore_empty: bool = True):
  """Dice per batch element and class, MONAI `DiceHelper.compute_channel`.

  Args:
    pred: binary prediction [B, *spatial, K] (bool or 0/1).
    gt: binary ground truth, same shape.
    include_background: keep channel 0. As in MONAI, a single-channel input
      is always scored.
    ignore_empty: NaN where the ground truth is empty; otherwise 1 if the
      prediction is empty too and 0 if not.

  Returns:
    float array [B, K'] (K' = K, or K - 1 without the background).
  """
  xp = _xp(pred, gt)
  _check_pair(pred, gt, 3, "dice")
  if not include_background and pred.shape[-1] > 1:
    pred, gt = pred[..., 1:], gt[..., 1:]
  pred = pred.astype(bool)
  gt = gt.astype(bool)
  axes = tuple(range(1, pred.ndim - 1))
  dtype = xp.float32 if xp is jnp else xp.float64
  inter = xp.sum(pred & gt, axis=axes).astype(dtype)
  n_gt = xp.sum(gt, axis=axes).astype(dtype)
  n_pred = xp.sum(pred, axis=axes).astype(dtype)
  # where() evaluates both branches: keep the division finite everywhere.
  score = 2.0 * inter / xp.maximum(n_gt + n_pred, 1.0)
  empty = xp.nan if ignore_empty else xp.where(n_pred == 0, 1.0, 0.0)
  return xp.where(n_gt > 0, score, empty)


def reduce_metric(f, reduction: str = "mean"):
  """NaN-aware reduction of a [B, K] metric, as MONAI `do_metric_reduction`.

  Args:
    f: metric per batch element and class [B, K]; NaN marks undefined values.
    reduction: one of `REDUCTIONS`. "mean" averages the classes of each
      element, then the elements that have at least one defined class; a mean
      over nothing is 0, as in MONAI.

  Returns:
    (reduced metric, number of non-NaN values that entered it).
  """
  xp = _xp(f)
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got "
                     f"{reduction!r}.")
  not_nans = ~xp.isnan(f)
  if reduction == "none":
    return f, not_nans.astype(f.dtype)
  f0 = xp.where(not_nans, f, 0.0)
  cnt = not_nans.astype(f.dtype)

  def mean(total, n):
    return xp.where(n > 0, total / xp.maximum(n, 1.0), 0.0)

  if reduction == "mean":
    n_c = cnt.sum(axis=1)
    per_elem = mean(f0.sum(axis=1), n_c)
    n_b = (n_c > 0).astype(f.dtype).sum(axis=0)
    return mean(per_elem.sum(axis=0), n_b), n_b
  if reduction == "sum":
    return f0.sum(axis=(0, 1)), cnt.sum(axis=(0, 1))
  axis = 0 if reduction.endswith("batch") else 1
  n = cnt.sum(axis=axis)
  total = f0.sum(axis=axis)
  return (mean(total, n) if reduction.startswith("mean") else total), n


def dice(pred, gt, include_background: bool = True, reduction: str = "mean",
         ignore_empty: bool = True, get_not_nans: bool = False):
  """Dice of binary channels-last masks, as `monai.metrics.DiceMetric`.

  Args:
    pred: binary prediction [B, *spatial, K].
    gt: binary ground truth, same shape.
    include_background: score channel 0 too.
    reduction: one of `REDUCTIONS` (see `reduce_metric`).
    ignore_empty: see `dice_per_channel`.
    get_not_nans: also return the count of defined values.

  Returns:
    The reduced Dice, and the not-NaN count if `get_not_nans`.
  """
  f, not_nans = reduce_metric(
      dice_per_channel(pred, gt, include_background, ignore_empty), reduction)
  return (f, not_nans) if get_not_nans else f


def _edges(mask: np.ndarray) -> np.ndarray:
  # scipy's default structure (face neighbours) and a zero border, as MONAI's
  # get_mask_edges: voxels on the image border count as edges.
  return mask ^ ndimage.binary_erosion(mask)


def _directed_distances(src: np.ndarray, dst: np.ndarray,
                        spacing) -> np.ndarray:
  """Euclidean distance from each `src` edge voxel to the nearest `dst` one.

  With an empty side the distances are inf, one per voxel of the non-empty
  side (MONAI's get_surface_distance), so the Hausdorff distance is inf.
  """
  if not dst.any():
    return np.full(int(src.sum()), np.inf)
  if not src.any():
    return np.full(int(dst.sum()), np.inf)
  return ndimage.distance_transform_edt(~dst, sampling=spacing)[src]


def hausdorff_distance(pred, gt, include_background: bool = False,
                       percentile: float | None = None,
                       directed: bool = False,
                       spacing: Sequence[float] | float | None = None
                       ) -> np.ndarray:
  """Hausdorff distance per element and class, as MONAI's (CPU path).

  HD95 is `percentile=95`.

  Args:
    pred: binary prediction [B, *spatial, K].
    gt: binary ground truth, same shape.
    include_background: score channel 0 too (MONAI's default is False).
    percentile: in [0, 100]; None takes the maximum distance.
    directed: only pred -> gt distances.
    spacing: voxel size, scalar or per spatial dim (default 1).

  Returns:
    float64 array [B, K']: NaN where both masks are empty; where exactly one
    is, inf without a percentile and NaN with one (the linear percentile of
    infs), as MONAI returns.
  """
  pred = np.asarray(pred)
  gt = np.asarray(gt)
  _check_pair(pred, gt, 3, "hausdorff_distance")
  if percentile is not None and not 0 <= percentile <= 100:
    raise ValueError(f"percentile must be in [0, 100], got {percentile}.")
  if not include_background:
    pred, gt = pred[..., 1:], gt[..., 1:]
  batch, n_cls = pred.shape[0], pred.shape[-1]
  out = np.empty((batch, n_cls))
  for b in range(batch):
    for c in range(n_cls):
      dists = edge_distances(pred[b, ..., c].astype(bool),
                              gt[b, ..., c].astype(bool), spacing)
      if dists is None:
        out[b, c] = np.nan
        continue
      dists = dists[:1] if directed else dists
      with np.errstate(invalid="ignore"):  # percentile of infs is NaN
        # np.max propagates NaN like MONAI's torch.max; Python's max doesn't.
        out[b, c] = np.max([np.max(d) if percentile is None
                            else np.percentile(d, percentile) for d in dists])
  return out


def edge_distances(pred: np.ndarray, gt: np.ndarray, spacing):
  """(pred -> gt, gt -> pred) edge-voxel distances; None if both are empty.

  Computed inside the masks' bounding box grown by one voxel: edges and
  nearest-edge distances there are exactly those of the whole volume, and
  it saves a whole-volume erosion and EDT.
  """
  union = pred | gt
  if not union.any():
    return None
  box = tuple(slice(max(s.start - 1, 0), s.stop + 1)
              for s in ndimage.find_objects(union.astype(np.int8))[0])
  p_edge, g_edge = _edges(pred[box]), _edges(gt[box])
  return (_directed_distances(p_edge, g_edge, spacing),
          _directed_distances(g_edge, p_edge, spacing))


def binarize(probs, threshold: float = THRESHOLD):
  """Probabilities (or soft labels) -> bool mask: `probs >= threshold`.

  The package's one binarisation rule. `>=` is MONAI
  `AsDiscrete(threshold=...)`, the post-transform of the BraTS/SwinUNETR
  reference pipelines, so a probability of exactly `threshold` is
  foreground. Bool input is returned unchanged. Works on NumPy arrays and on
  jax arrays (also inside `jit`).
  """
  xp = _xp(probs)
  a = xp.asarray(probs)
  return a if a.dtype == bool else a >= threshold


def brats_region_dice(pred_channels, label_channels) -> dict[str, float]:
  """Dice of the BraTS regions TC, WT, ET (channels in that order).

  Args:
    pred_channels: [H, W, D, 3] or [B, H, W, D, 3] masks (bool, or values
      binarised with `binarize`, i.e. >= 0.5).
    label_channels: ground truth in the same layout.

  Returns:
    {"TC", "WT", "ET", "mean"}: per-region Dice averaged over the batch with
    MONAI `ignore_empty=True` (a region absent from the ground truth is NaN
    and skipped), and the NaN-skipping mean of the three regions.
  """
  pred = binarize(pred_channels)
  gt = binarize(label_channels)
  if pred.ndim == 4:
    pred, gt = pred[None], gt[None]
  if pred.ndim != 5 or pred.shape[-1] != 3 or pred.shape != gt.shape:
    raise ValueError(f"brats_region_dice: expected [(B,) H, W, D, 3] masks "
                     f"(TC, WT, ET), got {np.shape(pred_channels)} and "
                     f"{np.shape(label_channels)}.")
  per = dice_per_channel(pred, gt)
  with np.errstate(invalid="ignore"):
    n = (~np.isnan(per)).sum(axis=0)
    region = np.where(n > 0, np.nansum(per, axis=0) / np.maximum(n, 1), np.nan)
  out = {k: float(v) for k, v in zip(BRATS_REGIONS, region)}
  defined = region[~np.isnan(region)]
  out["mean"] = float(defined.mean()) if defined.size else float("nan")
  return out


def channels_to_labels(probs_or_mask, convention,
                       threshold: float = THRESHOLD) -> np.ndarray:
  """Region channels -> uint8 label map in a label convention.

  Args:
    probs_or_mask: [..., K] channels in the convention's region order (TC,
      WT, ET for BraTS): bool masks, or probabilities binarised with
      `binarize` (`>= threshold`, MONAI `AsDiscrete`).
    convention: a `bsf_jax.data.labels.Convention`. BraTS writes 0, then 2
      (edema) where WT, 1 where TC and the ET value (4 in 2021, 3 in 2023+)
      where ET, in that order (`labels.from_channels`).
    threshold: probability threshold for non-bool input.
  """
  from bsf_jax.data import labels
  return labels.from_channels(binarize(np.asarray(probs_or_mask), threshold),
                              convention)


# Named scoring conventions of `python -m bsf_jax.evaluate --convention`:
# per region, metric name -> value. "monai" is the training validation's.
