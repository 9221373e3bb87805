"""Transforms and NIfTI reading against the real MONAI transforms.

MONAI is channel-first (C, H, W, D); bsf_jax is channels-last (H, W, D, C),
so every comparison moves the channel axis at the boundary.
"""

import numpy as np
import pytest

from bsf_jax.data import DataError
from bsf_jax.data import io
from bsf_jax.data import labels as L
from bsf_jax.data import transforms as T

monai = pytest.importorskip("monai")
from monai import transforms as mt  # noqa: E402


def _cf(x):
  return np.moveaxis(np.asarray(x), -1, 0)


def _cl(x):
  return np.moveaxis(np.asarray(x), 0, -1)


@pytest.fixture
def volume():
  rng = np.random.default_rng(0)
  x = np.zeros((30, 26, 22, 2), np.float32)
  # Brain-like block of positive values with zeros around it.
  x[5:24, 4:20, 3:17] = rng.uniform(-200, 1500, (19, 16, 14, 2))
  x[8:10, 6:8, 5:7, 1] = 0  # zeros inside the foreground (nonzero stats)
  return x


def test_scale_intensity_range_matches_monai(volume):
  ref = mt.ScaleIntensityRange(a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True)(_cf(volume))
  np.testing.assert_allclose(T.scale_intensity_range(volume, -1000, 1000), _cl(ref), rtol=1e-6, atol=1e-7)


def test_normalize_nonzero_channel_wise_matches_monai(volume):
  ref = mt.NormalizeIntensity(nonzero=True, channel_wise=True)(_cf(volume))
  np.testing.assert_allclose(T.normalize_nonzero(volume), _cl(ref), rtol=1e-5, atol=1e-5)


def test_intensity_on_crop_equals_crop_of_normalised_volume(volume):
  for kind in T.INTENSITIES:
    inten = T.Intensity(kind)
    params = inten.fit(volume)
    whole = inten.apply(volume, params)
    np.testing.assert_allclose(inten.apply(volume[3:20, 2:15, 4:18], params),
                               whole[3:20, 2:15, 4:18], rtol=1e-6, atol=1e-6, err_msg=kind)
  lo, hi = T.percentile_stats(volume)
  assert np.all(hi > lo)


def test_spatial_pad_matches_monai(volume):
  roi = (32, 24, 31)
  ref = mt.SpatialPad(spatial_size=roi, method="symmetric")(_cf(volume))
  np.testing.assert_array_equal(T.spatial_pad(volume, roi), _cl(ref))


@pytest.mark.parametrize("k", [(1, 1, 1), (16, 16, 16), (8, 12, 32)])
def test_crop_foreground_k_divisible_matches_monai(volume, k):
  ref = mt.CropForeground(select_fn=lambda x: x > 0, k_divisible=k)(_cf(volume))
  np.testing.assert_array_equal(T.crop_foreground(volume, k), _cl(ref))


def test_fused_crop_region_matches_reference_chain(volume):
  """ScaleIntensityRange -> SpatialPad -> CropForeground(k=roi), as in stage 1."""
  roi = (32, 32, 32)
  chain = mt.Compose([
      mt.ScaleIntensityRange(a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True),
      mt.SpatialPad(spatial_size=roi),
      mt.CropForeground(select_fn=lambda x: x > 0, k_divisible=roi),
  ])
  ref = _cl(chain(_cf(volume)))
  inten = T.Intensity("ct_window", -1000, 1000)
  start, size = T.crop_region(volume, inten.foreground_threshold, roi)
  ours = inten.apply(T.crop_with_fill(volume, start, size, fill=-1000.0), ())
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
  # Random crops are windows of that region, as RandSpatialCropSamples draws.
  starts = T.random_crop_starts(np.random.default_rng(0), start, size, roi, 50)
  assert np.all(starts >= start) and np.all(starts + roi <= start + size)


def test_brats_channels_match_monai():
  rng = np.random.default_rng(1)
  label = rng.choice([0, 1, 2, 4], size=(9, 8, 7)).astype(np.float32)
  ref = mt.ConvertToMultiChannelBasedOnBratsClasses()(label[None])
  conv = L.CONVENTIONS
  np.testing.assert_array_equal(L.to_channels(label, conv["brats2021"]),
                                _cl(ref).astype(np.float32))
  # BraTS 2023 uses 3 for the enhancing tumour; 2024's resection cavity (4)
  # is in no region.
  label23 = np.where(label == 4, 3, label)
  np.testing.assert_array_equal(L.to_channels(label23, conv["brats2023"]),
                                L.to_channels(label, conv["brats2021"]))
  np.testing.assert_array_equal(
      L.to_channels(np.where(label == 0, 4, label23), conv["brats2024"]),
      L.to_channels(label23, conv["brats2023"]))


def test_flip_matches_monai_and_scale_shift_formula(volume):
  ref = mt.Flip(spatial_axis=(0, 2))(_cf(volume))
  # Find a seed whose draws flip exactly axes 0 and 2.
  for seed in range(100):
    if list(np.random.default_rng(seed).random(3) < 0.5) == [True, False, True]:
      break
  (ours,) = T.rand_flip(np.random.default_rng(seed), [volume])
  np.testing.assert_array_equal(ours, _cl(ref))
  rng = np.random.default_rng(3)
  s, o = np.random.default_rng(3).uniform(-0.1, 0.1, 2)
  out = T.rand_scale_shift(rng, volume)
  ref = mt.ShiftIntensity(offset=o)(mt.ScaleIntensity(minv=None, maxv=None, factor=s)(_cf(volume)))
  np.testing.assert_allclose(out, _cl(ref), rtol=1e-5, atol=1e-3)


def test_atlas_binarise_and_label_checks():
  mask = np.array([0, 0.2, 0.5, 1.0], np.float32).reshape(1, 1, 4)
  conv = {name: L.get(name) for name in ("brats", "brats2023", "brats2024", "atlas")}
  np.testing.assert_array_equal(L.to_channels(mask, conv["atlas"])[..., 0],
                                [[[0, 0, 1, 1]]])
  L.check_values(np.array([0, 1, 2, 4.0]), conv["brats"], "seg.nii.gz")
  with pytest.raises(DataError, match=r"seg.nii.gz.*\[3\].*use label_format brats2023"):
    L.check_values(np.array([0, 1, 3.0]), conv["brats"], "seg.nii.gz")
  with pytest.raises(DataError, match=r"-seg.nii.gz.*\[4\].*brats2024"):
    L.check_values(np.array([0, 1, 4.0]), conv["brats2023"], "x-seg.nii.gz")
  L.check_values(np.array([0, 1, 2, 3, 4.0]), conv["brats2024"], "x-seg.nii.gz")
  with pytest.raises(DataError, match="outside"):
    L.check_values(np.array([0, 2.0]), conv["atlas"], "mask.nii.gz")
  with pytest.raises(ValueError, match="label_format='brats2019'"):
    L.get("brats2019")


def test_read_volume_matches_monai_load_orientation(tmp_path):
  """LAS (FSL MNI) and LPS (BraTS) storage both come back as MONAI's RAS."""
  rng = np.random.default_rng(2)
  data = rng.normal(size=(11, 9, 7)).astype(np.float32)
  for name, diag in (("las", [-1, 1, 1]), ("lps", [-1, -1, 1]), ("ras", [1, 1, 1])):
    affine = np.diag(diag + [1.0])
    affine[:3, 3] = [5, -3, 2]
    path = io.write_volume(str(tmp_path / f"{name}.nii.gz"), data, affine)
    vol = io.read_volume(path)
    ref = mt.Orientation(axcodes="RAS")(mt.LoadImage(image_only=True, ensure_channel_first=True)(path))
    np.testing.assert_array_equal(vol.data, np.asarray(ref)[0])
    np.testing.assert_allclose(vol.affine, np.asarray(ref.affine), atol=1e-6)
    assert vol.data.dtype == np.float32
    assert np.all(np.diag(vol.affine)[:3] > 0)


def test_projection_box_equals_mask_box_for_any_memory_layout():
  """foreground_box_of (max-plane + edge scan) == foreground_box(mask)."""
  rng = np.random.default_rng(5)
  for _ in range(60):
    shape = tuple(int(s) for s in rng.integers(3, 12, 3))
    c = int(rng.integers(1, 3))
    x = np.zeros(shape + (c,), np.float32)
    lo = [int(rng.integers(0, s)) for s in shape]
    hi = [int(rng.integers(l + 1, s + 1)) for l, s in zip(lo, shape)]
    x[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = rng.normal(size=[h - l for l, h in zip(lo, hi)] + [c])
    k = tuple(int(v) for v in rng.integers(1, 5, 3))
    layouts = {"C": [x[..., i] for i in range(c)],
               "F": [np.asfortranarray(x[..., i]) for i in range(c)],
               "flipped": [np.asfortranarray(x[::-1, :, ::-1, i])[::-1, :, ::-1] for i in range(c)]}
    if not (x > 0).any():
      with pytest.raises(DataError, match="no foreground"):
        T.foreground_box_of(layouts["C"], 0.0, k)
      continue
    ref = T.foreground_box(np.any(x > 0, -1), k)
    for name, chans in layouts.items():
      got = T.foreground_box_of(chans, 0.0, k)
      np.testing.assert_array_equal(got[0], ref[0], err_msg=name)
      np.testing.assert_array_equal(got[1], ref[1], err_msg=name)
