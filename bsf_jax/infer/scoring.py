"""Scoring a volume: challenge conventions, and validation's per-volume scores.

* `atlas_metrics` / `isles22_metrics` reproduce the ATLAS R2.0 and ISLES'22
  challenge scoring (`lesion_metrics` with 6- and 26-connectivity), and
  `brats_lesion_wise` the BraTS 2023+ global and lesion-wise Dice and HD95
  (`hd95_pooled`); `score_regions` applies one named convention
  (`CONVENTIONS`) to every region. docs/evaluation.md has the sources.
* `volume_metrics` / `mean_volume_metrics` are fine-tuning validation's
  per-volume scores and their mean over the volumes of every process.

Inputs are channels-last binary masks (NumPy); the voxel metrics they build
on (MONAI Dice and Hausdorff, the BraTS regions) are in `bsf_jax.infer.metrics`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from scipy import ndimage

from bsf_jax.infer import metrics

# scipy.ndimage.generate_binary_structure rank for each 3D connectivity.
_CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}


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
  dists = metrics.edge_distances(pred, gt, spacing)
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
      scores = {"dice": float(metrics.dice_per_channel(p[None, ..., None], g[None, ..., None])[0, 0]),
                "hd95": float(metrics.hausdorff_distance(
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
                   threshold: float = metrics.THRESHOLD) -> dict[str, float]:
  """Per-volume validation scores from probabilities [H,W,D,K].

  BraTS conventions: `dice_TC`, `dice_WT`, `dice_ET`, `dice_mean`; otherwise
  (ATLAS, one lesion channel) `atlas_*` and `dice_mean` = `atlas_dice`.
  """
  pred = metrics.binarize(probs, threshold)
  gt = metrics.binarize(label)
  if label_format.startswith("brats"):  # any BraTS convention: TC/WT/ET
    return {f"dice_{k}": float(v) for k, v in
            metrics.brats_region_dice(pred, gt).items()}
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
