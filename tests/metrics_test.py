"""Tests for bsf_jax.infer.metrics: hand-built cases and agreement with MONAI."""

import warnings

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from bsf_jax.infer import metrics, scoring
from bsf_jax.data import labels as L

torch = pytest.importorskip("torch")
monai = pytest.importorskip("monai")
from monai.metrics import DiceMetric, compute_hausdorff_distance  # noqa: E402


def _to_monai(a):
  return torch.from_numpy(np.moveaxis(np.asarray(a), -1, 1).astype(np.float32))


def _blobs(rng, shape, frac):
  """Random smooth binary blobs ([B, H, W, D, K]) with roughly frac filled."""
  from scipy import ndimage
  noise = ndimage.gaussian_filter(rng.normal(size=shape), sigma=(0, 2, 2, 2, 0))
  return noise > np.quantile(noise, 1 - frac)


# ---------------------------------------------------------------- Dice ------

def _hand_case():
  """[2, 4, 4, 4, 3] masks with known per-channel Dice (see comments)."""
  pred = np.zeros((2, 4, 4, 4, 3), bool)
  gt = np.zeros_like(pred)
  gt[0, :2, :2, :2, 0] = True        # 8 true voxels
  pred[0, :2, :2, :1, 0] = True      # 4 of them ...
  pred[0, 3, 3, :4, 0] = True        # ... plus 4 wrong: 2*4/(8+8) = 0.5
  pred[0, 0, 0, 0, 2] = True         # ch 2: gt empty, pred not
  gt[1, :, :, :, 1] = True           # elem 1, ch 1: perfect
  pred[1, :, :, :, 1] = True
  return pred, gt


def test_dice_hand_built():
  pred, gt = _hand_case()
  nan = np.nan
  # ignore_empty: NaN wherever the ground truth is empty.
  np.testing.assert_allclose(metrics.dice_per_channel(pred, gt),
                             [[0.5, nan, nan], [nan, 1.0, nan]])
  # Otherwise empty/empty = 1 and false positive on empty gt = 0.
  np.testing.assert_allclose(
      metrics.dice_per_channel(pred, gt, ignore_empty=False),
      [[0.5, 1.0, 0.0], [1.0, 1.0, 1.0]])
  np.testing.assert_allclose(
      metrics.dice_per_channel(pred, gt, include_background=False),
      [[nan, nan], [1.0, nan]])
  # mean: element 0 -> 0.5, element 1 -> 1.0, then 0.75.
  assert metrics.dice(pred, gt) == pytest.approx(0.75)
  np.testing.assert_allclose(metrics.dice(pred, gt, reduction="mean_batch"),
                             [0.5, 1.0, 0.0])  # all-NaN channel -> 0 (MONAI)
  f, n = metrics.dice(pred, gt, reduction="sum", get_not_nans=True)
  assert (f, n) == (pytest.approx(1.5), 2)


def test_dice_all_empty_mean_is_zero_like_monai():
  z = np.zeros((1, 3, 3, 3, 2), bool)
  f, n = metrics.dice(z, z, get_not_nans=True)
  assert (float(f), float(n)) == (0.0, 0.0)


@pytest.mark.parametrize("reduction", ["mean", "mean_batch", "sum_batch",
                                       "mean_channel", "sum", "none"])
@pytest.mark.parametrize("include_background,ignore_empty",
                         [(True, True), (False, True), (True, False)])
def test_dice_matches_monai(reduction, include_background, ignore_empty):
  rng = np.random.default_rng(0)
  pred = _blobs(rng, (3, 12, 12, 12, 4), 0.2)
  gt = _blobs(rng, (3, 12, 12, 12, 4), 0.2)
  gt[1, ..., 2] = False             # empty ground truth, non-empty pred
  gt[2, ..., 3] = pred[2, ..., 3] = False   # both empty
  metric = DiceMetric(include_background=include_background,
                      reduction=reduction, ignore_empty=ignore_empty,
                      get_not_nans=True)
  metric(_to_monai(pred), _to_monai(gt))
  ref, ref_n = metric.aggregate()
  got, got_n = metrics.dice(pred, gt, include_background, reduction,
                            ignore_empty, get_not_nans=True)
  np.testing.assert_allclose(got, ref.numpy(), rtol=1e-6, equal_nan=True)
  np.testing.assert_allclose(got_n, ref_n.numpy())


def test_dice_in_jax_jit_matches_numpy():
  pred, gt = _hand_case()
  fn = jax.jit(lambda p, g: metrics.dice(p, g, reduction="mean_batch",
                                         ignore_empty=False))
  got = fn(jnp.asarray(pred), jnp.asarray(gt))
  assert isinstance(got, jax.Array)
  np.testing.assert_allclose(
      np.asarray(got),
      metrics.dice(pred, gt, reduction="mean_batch", ignore_empty=False),
      rtol=1e-6)


def test_dice_bad_input():
  with pytest.raises(ValueError, match="shapes differ"):
    metrics.dice(np.zeros((1, 2, 2, 2, 1)), np.zeros((1, 2, 2, 2, 2)))
  with pytest.raises(ValueError, match="reduction"):
    metrics.dice(np.zeros((1, 2, 2, 2, 1)), np.zeros((1, 2, 2, 2, 1)),
                 reduction="median")


# ----------------------------------------------------------- Hausdorff ------

def test_hausdorff_hand_built():
  # Single voxels are their own edges. gt: (2,2,2) and (2,2,8); pred: (2,2,2).
  pred = np.zeros((1, 5, 5, 11, 1), bool)
  gt = pred.copy()
  pred[0, 2, 2, 2, 0] = True
  gt[0, 2, 2, 2, 0] = gt[0, 2, 2, 8, 0] = True
  kw = dict(include_background=True)
  # pred -> gt distances [0], gt -> pred distances [0, 6].
  assert metrics.hausdorff_distance(pred, gt, **kw)[0, 0] == 6.0
  assert metrics.hausdorff_distance(pred, gt, directed=True, **kw)[0, 0] == 0
  # Linear percentile: the median of [0, 6] is 3.
  assert metrics.hausdorff_distance(pred, gt, percentile=50, **kw)[0, 0] == 3
  # Anisotropic voxels: 6 voxels along the last axis of 2 mm each.
  assert metrics.hausdorff_distance(pred, gt, spacing=(1, 1, 2),
                                    **kw)[0, 0] == 12.0


def test_hausdorff_empty_cases():
  a = np.zeros((1, 6, 6, 6, 2), bool)
  b = a.copy()
  a[0, 1:3, 1:3, 1:3, 1] = True
  assert np.isnan(metrics.hausdorff_distance(b, b)[0, 0])   # both empty
  assert np.isinf(metrics.hausdorff_distance(a, b)[0, 0])   # gt empty
  assert np.isinf(metrics.hausdorff_distance(b, a)[0, 0])   # pred empty


@pytest.mark.parametrize("percentile,spacing,directed", [
    (95, None, False), (None, None, False), (95, (1.0, 1.5, 2.0), False),
    (95, None, True)])
def test_hausdorff_matches_monai(percentile, spacing, directed):
  rng = np.random.default_rng(1)
  pred = _blobs(rng, (2, 20, 18, 16, 3), 0.15)
  gt = _blobs(rng, (2, 20, 18, 16, 3), 0.15)
  gt[1, ..., 1] = False        # one empty side
  gt[1, ..., 2] = pred[1, ..., 2] = False   # both empty
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # MONAI warns about the empty masks
    ref = compute_hausdorff_distance(
        _to_monai(pred), _to_monai(gt), include_background=True,
        percentile=percentile, directed=directed, spacing=spacing).numpy()
  got = metrics.hausdorff_distance(pred, gt, include_background=True,
                                   percentile=percentile, directed=directed,
                                   spacing=spacing)
  np.testing.assert_allclose(got, ref, rtol=1e-5, equal_nan=True)
  assert np.isfinite(got[0]).all()


# --------------------------------------------------------------- ATLAS ------

def test_atlas_metrics_hand_built():
  gt = np.zeros((20, 20, 20), bool)
  pred = np.zeros_like(gt)
  gt[2:4, 2:4, 2:4] = True        # lesion A, 8 voxels
  gt[10, 10, 10] = True           # lesion B, missed (FN)
  pred[3:5, 2:4, 2:4] = True      # hits A with 4 voxels (TP)
  pred[15, 15, 15] = True         # FP
  pred[0, 0, 19] = True           # FP
  m = scoring.atlas_metrics(pred, gt)
  assert m["dice"] == pytest.approx(2 * 4 / (10 + 9))
  assert m["volume_difference"] == 1.0
  assert m["lesion_count_difference"] == 1.0   # 3 predicted vs 2 true
  assert m["lesion_f1"] == pytest.approx(1 / (1 + (2 + 1) / 2))


def test_atlas_connectivity_and_empty():
  gt = np.zeros((4, 4, 4), bool)
  gt[0, 0, 0] = gt[1, 1, 1] = True    # corner neighbours only
  empty = np.zeros_like(gt)
  assert scoring.atlas_metrics(empty, gt)["lesion_count_difference"] == 2
  assert scoring.atlas_metrics(empty, gt, connectivity=26)[
      "lesion_count_difference"] == 1
  assert scoring.atlas_metrics(empty, gt)["lesion_f1"] == 0.0
  m = scoring.atlas_metrics(empty, empty)
  # Both empty: Dice 1.0 ("Perfect" score) in isles/scoring.py since 4957361.
  assert m["dice"] == 1.0 and m["lesion_f1"] == 1.0
  assert m["volume_difference"] == m["lesion_count_difference"] == 0
  with pytest.raises(ValueError, match="connectivity"):
    scoring.atlas_metrics(gt, gt, connectivity=8)
  with pytest.raises(ValueError, match=r"\[H, W, D\]"):
    scoring.atlas_metrics(gt[0], gt[0])


def test_isles22_preset_hand_built():
  # ISLES'22 eval_utils: cc3d 26-connectivity, volumes in ml, empty Dice 1.
  gt = np.zeros((6, 6, 6), bool)
  gt[0, 0, 0] = gt[1, 1, 1] = True    # one lesion under 26-connectivity
  pred = np.zeros_like(gt)
  pred[1, 1, 1] = pred[4, 4, 4] = True
  m = scoring.isles22_metrics(pred, gt, voxel_volume_ml=0.008)  # 2 mm voxels
  assert m["dice"] == pytest.approx(2 * 1 / 4)
  assert m["lesion_count_difference"] == 1.0    # 2 predicted vs 1 true
  assert m["lesion_f1"] == pytest.approx(1 / (1 + (1 + 0) / 2))
  assert m["volume_difference"] == 0.0
  pred[5, 5, 5] = True
  assert scoring.isles22_metrics(pred, gt, 0.008)["volume_difference"] == (
      pytest.approx(0.008))
  empty = np.zeros_like(gt)
  assert scoring.isles22_metrics(empty, empty)["dice"] == 1.0
  # ATLAS (6-connectivity) counts the corner-touching pair as two lesions.
  assert scoring.atlas_metrics(pred, gt)["lesion_count_difference"] == 1.0


# ------------------------------------------------------- BraTS 2023+ ------

B21, B23 = L.CONVENTIONS["brats2021"], L.CONVENTIONS["brats2023"]


def test_hd95_pooled_vs_monai_hand_built():
  # pred: voxels at x=0 and x=10; gt: the voxel at x=0. pred->gt distances
  # [0, 10], gt->pred [0]. Pooled (panoptica): percentile([0, 0, 10], 95) =
  # 9.0; MONAI: max(percentile([0, 10], 95), 0) = 9.5.
  pred = np.zeros((12, 3, 3), bool)
  gt = np.zeros_like(pred)
  pred[0, 1, 1] = pred[10, 1, 1] = gt[0, 1, 1] = True
  assert scoring.hd95_pooled(pred, gt) == pytest.approx(9.0)
  assert metrics.hausdorff_distance(pred[None, ..., None], gt[None, ..., None],
                                    include_background=True, percentile=95
                                    )[0, 0] == pytest.approx(9.5)
  assert scoring.hd95_pooled(pred, gt, spacing=(2, 1, 1)) == pytest.approx(18.0)
  assert np.isinf(scoring.hd95_pooled(pred, np.zeros_like(gt)))
  assert np.isnan(scoring.hd95_pooled(gt & False, gt & False))


def test_brats2023_empty_conventions():
  empty = np.zeros((8, 8, 8), bool)
  blob = empty.copy()
  blob[2:6, 2:6, 2:6] = True
  far = empty.copy()
  far[0, 0, 0] = True
  both_empty = scoring.brats_lesion_wise(empty, empty)
  assert (both_empty["dice"], both_empty["hd95"]) == (1.0, 0.0)
  assert (both_empty["lesion_dice"], both_empty["lesion_hd95"]) == (1.0, 0.0)
  # Empty truth, a prediction: Dice 0, HD95 the maximum; the prediction is
  # one false positive lesion.
  fp = scoring.brats_lesion_wise(blob, empty)
  assert scoring.BRATS_HD95_MAX == 373.0
  assert (fp["dice"], fp["hd95"]) == (0.0, 373.0)
  assert (fp["lesion_dice"], fp["lesion_hd95"], fp["fp"]) == (0.0, 373.0, 1.0)
  # Empty prediction: the true lesion is a false negative.
  fn = scoring.brats_lesion_wise(empty, blob)
  assert (fn["dice"], fn["hd95"], fn["lesion_dice"], fn["lesion_hd95"]) == (
      0.0, 373.0, 0.0, 373.0)
  assert fn["fn"] == 1.0
  # No overlap (beyond the dilation): lesion-wise one FN and one FP.
  miss = scoring.brats_lesion_wise(far, blob, challenge="MET")
  assert (miss["lesion_dice"], miss["lesion_hd95"]) == (0.0, 373.0)
  assert (miss["tp"], miss["fp"], miss["fn"]) == (0.0, 1.0, 1.0)


def _lesion_scene():
  gt = np.zeros((64, 64, 64), bool)
  pred = np.zeros_like(gt)
  gt[5:10, 5:10, 5:10] = pred[5:10, 5:10, 5:10] = True  # A, found exactly,
  pred[12, 7, 7] = True           # + a voxel 3 away: within GLI's dilation
  gt[30:35, 5:10, 5:10] = True    # B1 and B2, 3 voxels apart: one lesion
  gt[38:43, 5:10, 5:10] = True    # after GLI's dilation; missed
  gt[50:53, 50:53, 50:53] = True  # S, 27 voxels (<= 50 mm^3), missed
  gt[50:53, 5:8, 50:53] = pred[50:53, 5:8, 50:53] = True  # S2, small, found
  pred[50:54, 30:34, 30:34] = True  # a false positive far from everything
  return pred, gt


def test_brats2023_lesion_wise_hand_built():
  pred, gt = _lesion_scene()
  m = scoring.brats_lesion_wise(pred, gt)  # GLI: dilation 3, > 50 mm^3
  # Kept: A (Dice 2*125/(126+125), HD95 0: one of 197 edge distances is 3),
  # B (FN: 0, 373); S and S2 are under the threshold; one FP (0, 373).
  assert m["lesion_dice"] == pytest.approx((250 / 251 + 0 + 0) / 3)
  assert m["lesion_hd95"] == pytest.approx((0 + 373 + 373) / 3)
  assert (m["tp"], m["fn"], m["fp"]) == (1.0, 1.0, 1.0)
  inter = 125 + 27
  assert m["dice"] == pytest.approx(2 * inter / (pred.sum() + gt.sum()))
  # 2 mm voxels along x: S and S2 (54 mm^3) now count; dilation is in voxels.
  m = scoring.brats_lesion_wise(pred, gt, spacing=(2, 1, 1))
  assert m["lesion_dice"] == pytest.approx((250 / 251 + 0 + 0 + 1 + 0) / 5)
  assert m["lesion_hd95"] == pytest.approx((0 + 373 + 373 + 0 + 373) / 5)
  assert (m["tp"], m["fn"], m["fp"]) == (2.0, 2.0, 1.0)
  # BraTS-MET: dilation 1, > 2 mm^3. B1 and B2 stay apart, the voxel 3 away
  # from A is a false positive.
  m = scoring.brats_lesion_wise(pred, gt, challenge="MET")
  assert m["lesion_dice"] == pytest.approx((1 + 0 + 0 + 0 + 1) / 7)
  assert m["lesion_hd95"] == pytest.approx(373 * 5 / 7)
  assert (m["tp"], m["fn"], m["fp"]) == (2.0, 3.0, 2.0)
  with pytest.raises(ValueError, match="challenge"):
    scoring.brats_lesion_wise(pred, gt, challenge="XYZ")


def test_score_regions_conventions():
  pred, gt = _lesion_scene()
  p3, g3 = np.stack([pred] * 3, -1), np.stack([gt] * 3, -1)
  regions = ("TC", "WT", "ET")
  b = scoring.score_regions(p3, g3, regions, "brats2023")
  assert b["lesion_dice_ET"] == scoring.brats_lesion_wise(pred, gt)["lesion_dice"]
  assert b["dice_mean"] == pytest.approx(b["lesion_dice_TC"])
  mo = scoring.score_regions(p3, g3, regions, "monai")
  assert mo["dice_WT"] == pytest.approx(b["dice_WT"])
  assert mo["hd95_TC"] == pytest.approx(metrics.hausdorff_distance(
      pred[None, ..., None], gt[None, ..., None], include_background=True,
      percentile=95)[0, 0])
  a = scoring.score_regions(p3[..., :1], g3[..., :1], ("lesion",), "atlas")
  assert a == {**{f"{k}_lesion": v for k, v in
                  scoring.atlas_metrics(pred, gt).items()},
               "dice_mean": a["dice_lesion"]}
  i = scoring.score_regions(p3[..., :1], g3[..., :1], ("lesion",), "isles22")
  assert i["lesion_f1_lesion"] == scoring.isles22_metrics(pred, gt)["lesion_f1"]
  with pytest.raises(ValueError, match="convention"):
    scoring.score_regions(p3, g3, regions, "brats2019")


# --------------------------------------------------------------- BraTS ------

def test_channels_to_labels_hand_built():
  # Voxels: background, WT only, TC+WT, TC+WT+ET, ET only, p exactly 0.5.
  probs = np.array([[0.1, 0.2, 0.0],
                    [0.2, 0.9, 0.1],
                    [0.8, 0.9, 0.3],
                    [0.7, 0.6, 0.95],
                    [0.0, 0.0, 0.7],
                    [0.5, 0.5, 0.5]], np.float32)
  # p >= 0.5 is foreground (MONAI AsDiscrete): the last voxel is TC+WT+ET.
  np.testing.assert_array_equal(metrics.channels_to_labels(probs, B21),
                                [0, 2, 1, 4, 4, 4])
  np.testing.assert_array_equal(
      metrics.channels_to_labels(probs > 0.5, B23),
      [0, 2, 1, 3, 3, 0])  # bool masks are taken as they are
  with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
    metrics.channels_to_labels(probs[:, :2], B21)


def test_brats_round_trip():
  labels = np.random.default_rng(2).choice([0, 1, 2, 4], size=(6, 5, 4))
  channels = np.stack([np.isin(labels, (1, 4)), np.isin(labels, (1, 2, 4)),
                       labels == 4], -1)
  np.testing.assert_array_equal(metrics.channels_to_labels(channels, B21),
                                labels)


def test_brats_region_dice_hand_built():
  gt = np.zeros((2, 2, 2, 3), bool)
  pred = np.zeros_like(gt)
  gt[0, :, :, 0] = pred[0, :, :, 0] = True   # TC perfect: 1
  gt[:, :, :, 1] = True                      # WT: 8 true voxels,
  pred[0, :, :, 1] = True                    # 4 predicted: 8/12
  pred[1, 1, 1, 2] = True                    # ET absent in gt: NaN
  d = metrics.brats_region_dice(pred, gt)
  assert d["TC"] == 1.0 and d["WT"] == pytest.approx(2 / 3)
  assert np.isnan(d["ET"]) and d["mean"] == pytest.approx(5 / 6)
  # A batch averages each region over the elements where it is defined.
  db = metrics.brats_region_dice(np.stack([pred, gt]), np.stack([gt, gt]))
  assert db["TC"] == 1.0 and db["WT"] == pytest.approx((2 / 3 + 1) / 2)
  assert np.isnan(db["ET"])
  with pytest.raises(ValueError, match="TC, WT, ET"):
    metrics.brats_region_dice(pred[..., :2], gt[..., :2])


def test_one_threshold_at_exactly_half():
  from monai.transforms import AsDiscrete
  from bsf_jax.run import config_lib

  p = np.array([0.0, 0.4999999, 0.5, 0.5000001, 1.0], np.float32)
  want = np.array([False, False, True, True, True])
  np.testing.assert_array_equal(metrics.binarize(p), want)
  np.testing.assert_array_equal(jax.jit(metrics.binarize)(jnp.asarray(p)), want)
  # The rule of the BraTS reference pipelines' post-transform.
  import torch
  np.testing.assert_array_equal(
      np.asarray(AsDiscrete(threshold=0.5)(torch.from_numpy(p[None]))[0]) > 0,
      want)
  assert config_lib.seg_config().threshold == metrics.THRESHOLD == 0.5

  # Every consumer agrees at exactly 0.5: the BraTS label map (predict), the
  # region Dice from probabilities, and the validation / evaluation metrics.
  gt = np.zeros((4, 4, 4, 3), np.float32)
  gt[1:3, 1:3, 1:3] = 1.0
  probs = np.where(gt > 0, 0.5, 0.4999999).astype(np.float32)
  labels = metrics.channels_to_labels(probs, B21)
  np.testing.assert_array_equal(labels, np.where(gt[..., 0] > 0, 4, 0))
  assert metrics.brats_region_dice(probs, gt)["mean"] == 1.0
  scores = scoring.volume_metrics(probs, gt, "brats", metrics.THRESHOLD)
  assert scores["dice_TC"] == scores["dice_WT"] == scores["dice_ET"] == 1.0
  atlas = scoring.volume_metrics(probs[..., :1], gt[..., :1], "atlas",
                                  metrics.THRESHOLD)
  assert atlas["atlas_dice"] == 1.0 and atlas["atlas_lesion_f1"] == 1.0
