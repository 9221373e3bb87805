"""Tests for bsf_jax.metrics: hand-built cases and agreement with MONAI."""

import warnings

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from bsf_jax import metrics

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
  m = metrics.atlas_metrics(pred, gt)
  assert m["dice"] == pytest.approx(2 * 4 / (10 + 9))
  assert m["volume_difference"] == 1.0
  assert m["lesion_count_difference"] == 1.0   # 3 predicted vs 2 true
  assert m["lesion_f1"] == pytest.approx(1 / (1 + (2 + 1) / 2))


def test_atlas_connectivity_and_empty():
  gt = np.zeros((4, 4, 4), bool)
  gt[0, 0, 0] = gt[1, 1, 1] = True    # corner neighbours only
  empty = np.zeros_like(gt)
  assert metrics.atlas_metrics(empty, gt)["lesion_count_difference"] == 2
  assert metrics.atlas_metrics(empty, gt, connectivity=26)[
      "lesion_count_difference"] == 1
  assert metrics.atlas_metrics(empty, gt)["lesion_f1"] == 0.0
  m = metrics.atlas_metrics(empty, empty)
  assert np.isnan(m["dice"]) and m["lesion_f1"] == 1.0
  assert m["volume_difference"] == m["lesion_count_difference"] == 0
  with pytest.raises(ValueError, match="connectivity"):
    metrics.atlas_metrics(gt, gt, connectivity=8)
  with pytest.raises(ValueError, match=r"\[H, W, D\]"):
    metrics.atlas_metrics(gt[0], gt[0])


# --------------------------------------------------------------- BraTS ------

def test_brats_channels_to_labels_hand_built():
  # Voxels: background, WT only, TC+WT, TC+WT+ET, ET only, p exactly 0.5.
  probs = np.array([[0.1, 0.2, 0.0],
                    [0.2, 0.9, 0.1],
                    [0.8, 0.9, 0.3],
                    [0.7, 0.6, 0.95],
                    [0.0, 0.0, 0.7],
                    [0.5, 0.5, 0.5]], np.float32)
  # p >= 0.5 is foreground (MONAI AsDiscrete): the last voxel is TC+WT+ET.
  np.testing.assert_array_equal(metrics.brats_channels_to_labels(probs),
                                [0, 2, 1, 4, 4, 4])
  np.testing.assert_array_equal(
      metrics.brats_channels_to_labels(probs > 0.5, et_label=3),
      [0, 2, 1, 3, 3, 0])  # bool masks are taken as they are
  with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
    metrics.brats_channels_to_labels(probs[:, :2])


def test_brats_round_trip():
  labels = np.random.default_rng(2).choice([0, 1, 2, 4], size=(6, 5, 4))
  channels = np.stack([np.isin(labels, (1, 4)), np.isin(labels, (1, 2, 4)),
                       labels == 4], -1)
  np.testing.assert_array_equal(metrics.brats_channels_to_labels(channels),
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
  from bsf_jax import config_lib
  from bsf_jax.trainers import finetune

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
  labels = metrics.brats_channels_to_labels(probs)
  np.testing.assert_array_equal(labels, np.where(gt[..., 0] > 0, 4, 0))
  assert metrics.brats_region_dice(probs, gt)["mean"] == 1.0
  scores = finetune.volume_metrics(probs, gt, "brats", metrics.THRESHOLD)
  assert scores["dice_TC"] == scores["dice_WT"] == scores["dice_ET"] == 1.0
  atlas = finetune.volume_metrics(probs[..., :1], gt[..., :1], "atlas",
                                  metrics.THRESHOLD)
  assert atlas["atlas_dice"] == 1.0 and atlas["atlas_lesion_f1"] == 1.0
