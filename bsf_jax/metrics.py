"""Segmentation metrics: MONAI-compatible Dice and Hausdorff, ATLAS and BraTS.

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
* `atlas_metrics` reproduces the ATLAS R2.0 challenge scoring
  (npnl/atlas2_grand_challenge `isles/scoring.py`, whose lesion F1 and lesion
  count use `scipy.ndimage.label` with its default structure, i.e. 3D
  6-connectivity); other connectivities are an option.
* `brats_region_dice` / `brats_channels_to_labels` handle the overlapping
  BraTS regions TC, WT, ET (SPEC section 5).
* `binarize` is the one probability -> mask rule of the package (validation,
  evaluation, figures, prediction): `p >= threshold`, as MONAI
  `AsDiscrete(threshold=0.5)` in the BraTS reference pipelines.
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
# scipy.ndimage.generate_binary_structure rank for each 3D connectivity.
_CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}
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
      p_edge = _edges(pred[b, ..., c].astype(bool))
      g_edge = _edges(gt[b, ..., c].astype(bool))
      union = p_edge | g_edge
      if not union.any():
        out[b, c] = np.nan
        continue
      # All edge voxels lie in the union's bounding box, so nearest-edge
      # distances computed inside it are exact; it saves a whole-volume EDT.
      box = ndimage.find_objects(union.astype(np.int8))[0]
      p_edge, g_edge = p_edge[box], g_edge[box]
      dists = [_directed_distances(p_edge, g_edge, spacing)]
      if not directed:
        dists.append(_directed_distances(g_edge, p_edge, spacing))
      with np.errstate(invalid="ignore"):  # percentile of infs is NaN
        # np.max propagates NaN like MONAI's torch.max; Python's max doesn't.
        out[b, c] = np.max([np.max(d) if percentile is None
                            else np.percentile(d, percentile) for d in dists])
  return out


def atlas_metrics(pred, gt, connectivity: int = 6) -> dict[str, float]:
  """ATLAS R2.0 challenge metrics for one binary lesion mask.

  Args:
    pred: binary prediction [H, W, D].
    gt: binary ground truth [H, W, D].
    connectivity: 3D connected-component neighbourhood, 6 (faces; what the
      challenge's `scipy.ndimage.label` calls use), 18 or 26.

  Returns:
    dict with `dice` (NaN when both masks are empty, as the challenge's 0/0),
    `volume_difference` (|predicted - true| lesion voxels),
    `lesion_count_difference` (|#predicted - #true components|) and
    `lesion_f1` (a true lesion overlapping the prediction is a TP, one that
    does not an FN; a predicted lesion not overlapping the truth is an FP;
    F1 = TP / (TP + (FP + FN) / 2), 1 when both masks are empty).
  """
  pred = np.asarray(pred).astype(bool)
  gt = np.asarray(gt).astype(bool)
  if pred.shape != gt.shape or pred.ndim != 3:
    raise ValueError(f"atlas_metrics: expected two [H, W, D] masks, got "
                     f"{pred.shape} and {gt.shape}.")
  if connectivity not in _CONNECTIVITY_RANK:
    raise ValueError(f"connectivity must be one of "
                     f"{tuple(_CONNECTIVITY_RANK)}, got {connectivity}.")
  structure = ndimage.generate_binary_structure(
      3, _CONNECTIVITY_RANK[connectivity])
  gt_lab, n_gt = ndimage.label(gt, structure)
  pred_lab, n_pred = ndimage.label(pred, structure)
  tp = np.count_nonzero(np.unique(gt_lab[pred]))  # gt lesions hit (label > 0)
  fn = n_gt - tp
  fp = n_pred - np.count_nonzero(np.unique(pred_lab[gt]))
  denom = tp + (fp + fn) / 2
  n_p, n_g = int(pred.sum()), int(gt.sum())
  return {
      "dice": (2.0 * np.count_nonzero(pred & gt) / (n_p + n_g)
               if n_p + n_g else float("nan")),
      "volume_difference": float(abs(n_p - n_g)),
      "lesion_count_difference": float(abs(n_pred - n_gt)),
      "lesion_f1": float(tp / denom) if denom else 1.0,
  }


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
  """Dice of the BraTS regions TC, WT, ET (channel order of SPEC section 5).

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


def brats_channels_to_labels(probs_or_mask, et_label: int = 4,
                             threshold: float = THRESHOLD) -> np.ndarray:
  """Writes TC/WT/ET channels back to a BraTS label map.

  0 everywhere, then 2 where WT, 1 where TC, `et_label` where ET, in that
  order, so the nested regions end up as NCR=1, ED=2, ET=et_label.

  Args:
    probs_or_mask: [..., 3] channels (TC, WT, ET): bool masks, or
      probabilities binarised with `binarize` (`>= threshold`, MONAI
      `AsDiscrete`).
    et_label: 4 for BraTS 2021, 3 for BraTS 2023.
    threshold: probability threshold for non-bool input.

  Returns:
    uint8 label map [...].
  """
  a = np.asarray(probs_or_mask)
  if a.shape[-1:] != (3,):
    raise ValueError(f"brats_channels_to_labels: expected [..., 3] channels "
                     f"(TC, WT, ET), got shape {a.shape}.")
  on = binarize(a, threshold)
  labels = np.zeros(a.shape[:-1], np.uint8)
  labels[on[..., 1]] = 2
  labels[on[..., 0]] = 1
  labels[on[..., 2]] = et_label
  return labels
