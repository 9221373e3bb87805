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
* `atlas_metrics` / `isles22_metrics` reproduce the ATLAS R2.0 and ISLES'22
  challenge scoring (`lesion_metrics` with 6- and 26-connectivity), and
  `brats_lesion_wise` the BraTS 2023+ global and lesion-wise Dice and HD95
  (`hd95_pooled`); `score_regions` applies one named convention
  (`CONVENTIONS`) to every region. docs/evaluation.md has the sources.
* `brats_region_dice` / `channels_to_labels` handle the overlapping
  BraTS regions TC, WT, ET (SPEC section 5).
* `volume_metrics` / `mean_volume_metrics` are validation's per-volume scores
  and their mean over the volumes of every process.
* `binarize` is the one probability -> mask rule of the package (validation,
  evaluation, figures, prediction): `p >= threshold`, as MONAI
  `AsDiscrete(threshold=0.5)` in the BraTS reference pipelines.
"""

from __future__ import annotations

from collections.abc import Sequence

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
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
      dists = _pair_distances(pred[b, ..., c].astype(bool),
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


def _pair_distances(pred: np.ndarray, gt: np.ndarray, spacing):
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


def hd95_pooled(pred, gt, spacing=None) -> float:
  """HD95 as one 95th percentile of the distances of both directions pooled.

  BrainLesion/panoptica `metrics/hausdorff_distance.py`
  (`_compute_hausdorff_distance95`: `np.percentile(np.hstack((hd1, hd2)),
  95)`), the surface distances of medpy: edges `mask XOR erosion(mask)`, face
  structure, exact EDT. MONAI's `hausdorff_distance(percentile=95)` instead
  takes the larger of the two directed percentiles.

  Returns:
    The distance (in `spacing` units); NaN if both masks are empty, inf if
    one is.
  """
  pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
  dists = _pair_distances(pred, gt, spacing)
  if dists is None:
    return float("nan")
  pooled = np.concatenate(dists)
  return float("inf") if np.isinf(pooled).any() else float(np.percentile(pooled, 95))


def _components(mask: np.ndarray, connectivity: int):
  if connectivity not in _CONNECTIVITY_RANK:
    raise ValueError(f"connectivity must be one of "
                     f"{tuple(_CONNECTIVITY_RANK)}, got {connectivity}.")
  return ndimage.label(mask, ndimage.generate_binary_structure(
      3, _CONNECTIVITY_RANK[connectivity]))


def lesion_metrics(pred, gt, connectivity: int = 6, empty_dice: float = 1.0,
                   voxel_volume: float = 1.0) -> dict[str, float]:
  """Lesion-segmentation metrics of one binary mask (ATLAS R2.0 / ISLES'22).

  Args:
    pred: binary prediction [H, W, D].
    gt: binary ground truth [H, W, D].
    connectivity: 3D connected-component neighbourhood: 6 (faces), 18 or 26.
    empty_dice: Dice when both masks are empty.
    voxel_volume: volume of one voxel; `volume_difference` is in its unit.

  Returns:
    dict with `dice` (`2|P & G| / (|P| + |G|)`, `empty_dice` when both are
    empty), `volume_difference` (`| |P| - |G| |` x voxel_volume),
    `lesion_count_difference` (|#predicted - #true components|) and
    `lesion_f1` (a true lesion overlapping the prediction is a TP, one that
    does not an FN; a predicted lesion not overlapping the truth is an FP;
    F1 = TP / (TP + (FP + FN) / 2), 1 when both masks are empty).
  """
  pred = np.asarray(pred).astype(bool)
  gt = np.asarray(gt).astype(bool)
  if pred.shape != gt.shape or pred.ndim != 3:
    raise ValueError(f"lesion_metrics: expected two [H, W, D] masks, got "
                     f"{pred.shape} and {gt.shape}.")
  gt_lab, n_gt = _components(gt, connectivity)
  pred_lab, n_pred = _components(pred, connectivity)
  tp = np.count_nonzero(np.unique(gt_lab[pred]))  # gt lesions hit (label > 0)
  fn = n_gt - tp
  fp = n_pred - np.count_nonzero(np.unique(pred_lab[gt]))
  denom = tp + (fp + fn) / 2
  n_p, n_g = int(pred.sum()), int(gt.sum())
  return {
      "dice": (2.0 * np.count_nonzero(pred & gt) / (n_p + n_g)
               if n_p + n_g else float(empty_dice)),
      "volume_difference": float(abs(n_p - n_g) * voxel_volume),
      "lesion_count_difference": float(abs(n_pred - n_gt)),
      "lesion_f1": float(tp / denom) if denom else 1.0,
  }


def atlas_metrics(pred, gt, connectivity: int = 6) -> dict[str, float]:
  """ATLAS R2.0 challenge scoring of one [H, W, D] mask (`lesion_metrics`).

  npnl/atlas2_grand_challenge `isles/scoring.py` at 129631c ("removed cc3d
  requirement"): `scipy.ndimage.label` with its default structure (6-
  connectivity), Dice 1.0 when both masks are empty, volumes in voxels.
  """
  return lesion_metrics(pred, gt, connectivity, empty_dice=1.0)


def isles22_metrics(pred, gt, voxel_volume_ml: float = 1e-3) -> dict[str, float]:
  """ISLES'22 scoring of one [H, W, D] mask (`lesion_metrics`).

  ezequieldlrosa/isles22 `utils/eval_utils.py`: `cc3d` 26-connectivity for
  the lesion F1 and count, Dice 1.0 when both masks are empty, absolute
  volume difference in millilitres (default: 1 mm^3 voxels).
  """
  return lesion_metrics(pred, gt, 26, empty_dice=1.0, voxel_volume=voxel_volume_ml)


# BraTS 2023+ lesion-wise parameters per sub-challenge: (dilation iterations,
# lesion volume threshold in mm^3), rachitsaluja/BraTS-2023-Metrics
# `brats_metrics.get_challenge_parameters`.
BRATS_CHALLENGES = {"GLI": (3, 50), "SSA": (3, 50), "MEN": (1, 50),
                    "PED": (3, 50), "MET": (1, 2)}
# HD95 given for an empty mask, an unmatched lesion or a false positive: the
# diagonal of the 240x240x155 1 mm BraTS grid, sqrt(240^2+240^2+155^2) = 373.1.
BRATS_HD95_MAX = 373.0


def _brats_dice(pred, gt) -> float:
  n = int(pred.sum()) + int(gt.sum())
  return 2.0 * np.count_nonzero(pred & gt) / n if n else 1.0


def _brats_hd95(pred, gt, spacing) -> float:
  if not pred.any() and not gt.any():
    return 0.0
  d = hd95_pooled(pred, gt, spacing)
  return d if np.isfinite(d) else BRATS_HD95_MAX


def brats_lesion_wise(pred, gt, spacing=(1.0, 1.0, 1.0), challenge: str = "GLI"
                      ) -> dict[str, float]:
  """BraTS 2023+ global and lesion-wise Dice and HD95 of one region mask.

  Follows rachitsaluja/BraTS-2023-Metrics `brats_metrics.py`
  (`get_lesion_wise_score`, `get_lesion_wise_results`):
  1. True lesions are the 26-connected components of the truth, merged when
     their dilations (`binary_dilation`, 18-neighbour structure, the
     challenge's iterations) touch. Predicted lesions are the 26-connected
     components of the prediction.
  2. Each true lesion is matched to every predicted lesion that meets its
     dilation; its Dice and HD95 are taken against their union. A true
     lesion with no match is a false negative (Dice 0, HD95 max).
  3. Predicted lesions matched to no true lesion are false positives, each
     adding Dice 0 and HD95 `BRATS_HD95_MAX` to the average.
  4. True lesions of volume <= the challenge threshold are left out.
     lesion Dice = sum(Dice) / (#kept true lesions + #FP), likewise HD95;
     with nothing to average, Dice 1 and HD95 0.
  HD95 is the pooled 95th percentile of `hd95_pooled`; an empty side gives
  `BRATS_HD95_MAX`. Global Dice is 1 when both masks are empty and 0 for a
  prediction on an empty truth; global HD95 is 0 when both are empty.

  Args:
    pred, gt: binary [H, W, D] masks of one region (TC, WT or ET).
    spacing: voxel size in mm (the lesion threshold is a volume).
    challenge: a `BRATS_CHALLENGES` key.

  Returns:
    dict: dice, hd95, lesion_dice, lesion_hd95, tp, fp, fn (lesion counts;
    tp and fn above the threshold).
  """
  if challenge not in BRATS_CHALLENGES:
    raise ValueError(f"challenge must be one of {sorted(BRATS_CHALLENGES)}, "
                     f"got {challenge!r}.")
  pred = np.asarray(pred).astype(bool)
  gt = np.asarray(gt).astype(bool)
  if pred.shape != gt.shape or pred.ndim != 3:
    raise ValueError(f"brats_lesion_wise: expected two [H, W, D] masks, got "
                     f"{pred.shape} and {gt.shape}.")
  dilation, min_volume = BRATS_CHALLENGES[challenge]
  spacing = tuple(float(x) for x in np.broadcast_to(spacing, (3,)))
  voxel_volume = float(np.prod(spacing))
  struct = ndimage.generate_binary_structure(3, 2)
  # True lesions: voxels of the truth, numbered by their dilated component.
  dilated_lab, n_gt = _components(
      ndimage.binary_dilation(gt, struct, iterations=dilation), 26)
  gt_lab = np.where(gt, dilated_lab, 0)
  pred_lab, _ = _components(pred, 26)
  matched, scores = set(), []
  boxes = ndimage.find_objects(gt_lab)
  for k, box in enumerate(boxes, start=1):
    if box is None:
      continue
    # The dilation reaches `dilation` voxels: a grown box holds all of it.
    grown = tuple(slice(max(s.start - dilation, 0), s.stop + dilation)
                  for s in box)
    lesion = gt_lab[grown] == k
    reach = ndimage.binary_dilation(lesion, struct, iterations=dilation)
    hit = np.unique(pred_lab[grown][reach])
    hit = hit[hit > 0]
    matched.update(hit.tolist())
    lesion_full = gt_lab == k
    pred_k = np.isin(pred_lab, hit)
    d = _brats_dice(pred_k, lesion_full)
    h = _brats_hd95(pred_k, lesion_full, spacing)
    scores.append((lesion.sum() * voxel_volume, len(hit) > 0, d, h))
  n_fp = len(set(np.unique(pred_lab).tolist()) - {0} - matched)
  kept = [(hit, d, h) for vol, hit, d, h in scores if vol > min_volume]
  n = len(kept) + n_fp
  return {
      "dice": float(_brats_dice(pred, gt)),
      "hd95": _brats_hd95(pred, gt, spacing),
      "lesion_dice": float(sum(d for _, d, _ in kept) / n) if n else 1.0,
      "lesion_hd95": ((sum(h for _, _, h in kept) + n_fp * BRATS_HD95_MAX) / n
                      if n else 0.0),
      "tp": float(sum(hit for hit, _, _ in kept)),
      "fp": float(n_fp),
      "fn": float(sum(not hit for hit, _, _ in kept)),
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
CONVENTIONS = ("monai", "brats2023", "atlas", "isles22")


def score_regions(pred, gt, regions: Sequence[str], convention: str,
                  spacing=(1.0, 1.0, 1.0)) -> dict[str, float]:
  """One volume's scores under a named convention, `{metric}_{region}`.

  Args:
    pred, gt: binary [H, W, D, K] masks, channel k = region k.
    regions: the K region names (e.g. TC, WT, ET; or lesion).
    convention: one of `CONVENTIONS`:
      monai: Dice (`dice_per_channel`, NaN on an empty truth) and HD95
        (`hausdorff_distance(percentile=95)`), in `spacing` units;
      brats2023: `brats_lesion_wise` (global and lesion-wise Dice/HD95);
      atlas: `atlas_metrics`; isles22: `isles22_metrics`.
    spacing: voxel size in mm.

  Returns:
    dict of floats, plus `dice_mean` (NaN-skipping mean of the regions' Dice;
    for brats2023 of the lesion-wise Dice, the challenge's ranking metric).
  """
  pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
  if pred.shape != gt.shape or pred.ndim != 4 or pred.shape[-1] != len(regions):
    raise ValueError(f"score_regions: expected two [H, W, D, {len(regions)}] "
                     f"masks ({list(regions)}), got {pred.shape} and {gt.shape}.")
  if convention not in CONVENTIONS:
    raise ValueError(f"convention must be one of {CONVENTIONS}, got "
                     f"{convention!r}.")
  out, ranked = {}, []
  for k, region in enumerate(regions):
    p, g = pred[..., k], gt[..., k]
    if convention == "monai":
      scores = {"dice": float(dice_per_channel(p[None, ..., None], g[None, ..., None])[0, 0]),
                "hd95": float(hausdorff_distance(
                    p[None, ..., None], g[None, ..., None], include_background=True,
                    percentile=95, spacing=spacing)[0, 0])}
    elif convention == "brats2023":
      scores = brats_lesion_wise(p, g, spacing)
    elif convention == "atlas":
      scores = atlas_metrics(p, g)
    else:
      scores = isles22_metrics(p, g, float(np.prod(spacing)) / 1000.0)
    ranked.append(scores["lesion_dice" if convention == "brats2023" else "dice"])
    out.update({f"{m}_{region}": float(v) for m, v in scores.items()})
  finite = [v for v in ranked if not np.isnan(v)]
  out["dice_mean"] = float(np.mean(finite)) if finite else float("nan")
  return out


def volume_metrics(probs: np.ndarray, label: np.ndarray, label_format: str,
                   threshold: float = THRESHOLD) -> dict[str, float]:
  """Per-volume validation scores from probabilities [H,W,D,K].

  BraTS conventions: `dice_TC`, `dice_WT`, `dice_ET`, `dice_mean`; otherwise
  (ATLAS, one lesion channel) `atlas_*` and `dice_mean` = `atlas_dice`.
  """
  pred = binarize(probs, threshold)
  gt = binarize(label)
  if label_format.startswith("brats"):  # any BraTS convention: TC/WT/ET
    return {f"dice_{k}": float(v) for k, v in
            brats_region_dice(pred, gt).items()}
  result = atlas_metrics(pred[..., 0], gt[..., 0])
  out = {f"atlas_{k}": float(v) for k, v in result.items()}
  out["dice_mean"] = out["atlas_dice"]
  return out


def volume_metric_keys(label_format: str, channels: int) -> list[str]:
  """The names `volume_metrics` returns for these labels, sorted."""
  zeros = np.zeros((2, 2, 2, channels), np.float32)
  return sorted(volume_metrics(zeros, zeros, label_format))


def mean_volume_metrics(per_volume: list[dict[str, float] | None],
                        keys: list[str]) -> dict[str, float]:
  """`val_*` means over the real volumes of every process.

  Each process scores its own volumes (the eval pipeline gives every process
  the same number of items, padding included); their rows are all-gathered,
  so every process averages the same set and ranks checkpoints alike.

  Args:
    per_volume: this process's items in order, `volume_metrics` dicts, None
      for padding placeholders.
    keys: `volume_metric_keys(...)`.

  Returns:
    {"val_<key>": mean}. NaN entries (a volume without ET, say) are skipped,
    as MONAI's DiceMetric(ignore_empty=True) skips them.

  Raises:
    ValueError: no process had a real volume.
  """
  rows = np.full((len(per_volume), len(keys) + 1), np.nan, np.float64)
  for i, m in enumerate(per_volume):
    rows[i, 0] = m is not None
    if m is not None:
      rows[i, 1:] = [m[k] for k in keys]
  if jax.process_count() > 1:
    rows = np.asarray(multihost_utils.process_allgather(rows)).reshape(
        -1, len(keys) + 1)
  real = rows[rows[:, 0] == 1, 1:]
  if not len(real):
    raise ValueError("The validation split is empty: check config.data "
                     "(fold / datalist)")
  with warnings.catch_warnings():  # all-NaN columns give NaN, quietly
    warnings.simplefilter("ignore", RuntimeWarning)
    means = np.nanmean(real, axis=0)
  return {f"val_{k}": float(v) for k, v in zip(keys, means)}
