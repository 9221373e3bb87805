"""MONAI-like array transforms on channels-last (H, W, D, C) NumPy arrays.

Deterministic transforms reproduce MONAI's results on the same arrays
(`ScaleIntensityRange`, `NormalizeIntensity(nonzero, channel_wise)`,
`SpatialPad`, `CropForeground(k_divisible)`; label maps to region channels,
MONAI's `ConvertToMultiChannelBasedOnBratsClasses`, are `labels.to_channels`); tests check this against the installed `monai`. Random
transforms take an explicit `np.random.Generator` (Grain's per-element rng from
`random_map`), never a global one.

The crop chain is fused for speed (`crop_box` + `crop_with_fill` +
`Intensity.apply`): the foreground box and crop positions are computed on the
raw volume and the intensity mapping is applied to the crops only, which gives
the same voxels as MONAI's normalise -> pad -> crop-foreground -> random-crop
order at a fraction of the cost.
"""

import dataclasses
from typing import Sequence

import numpy as np

from bsf_jax.data import DataError

# Intensity schemes accepted by `config.data.intensity`.
INTENSITIES = ("ct_window", "zscore_nonzero", "percentile")


def scale_intensity_range(x, a_min, a_max, b_min=0.0, b_max=1.0, clip=True):
  """MONAI `ScaleIntensityRange`: [a_min, a_max] -> [b_min, b_max] linearly."""
  if a_max == a_min:
    raise ValueError(f"scale_intensity_range: a_min == a_max == {a_min}")
  x = np.asarray(x, np.float32)
  out = (x - np.float32(a_min)) / np.float32(a_max - a_min)
  out = out * np.float32(b_max - b_min) + np.float32(b_min)
  return np.clip(out, b_min, b_max) if clip else out


def channels(x) -> list:
  """A (..., C) array or a list of per-channel arrays -> list of channels."""
  if isinstance(x, (list, tuple)):
    return list(x)
  return [x[..., i] for i in range(x.shape[-1])]


def nonzero_stats(x) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and population std over the non-zero voxels of x.

  Args:
    x: (..., C) array or list of C per-channel arrays.
  """
  chans = channels(x)
  c = len(chans)
  mean = np.zeros(c, np.float32)
  std = np.ones(c, np.float32)
  for i, v in enumerate(chans):
    v = np.asarray(v, np.float32)
    v = v[v != 0]
    if v.size:
      mean[i] = v.mean(dtype=np.float64)
      s = v.std(dtype=np.float64)
      std[i] = s if s > 0 else 1.0  # MONAI divides by 1 for a constant input.
  return mean, std


def normalize_nonzero(x, mean=None, std=None):
  """MONAI `NormalizeIntensity(nonzero=True, channel_wise=True)`.

  Args:
    x: (..., C) array.
    mean, std: per-channel statistics; computed from x when not given (pass
      volume statistics to normalise a crop like its whole volume).

  Returns:
    float32 array, (x - mean) / std on non-zero voxels, zeros kept.
  """
  x = np.asarray(x, np.float32)
  if mean is None:
    mean, std = nonzero_stats(x)
  return np.where(x != 0, (x - mean) / std, np.float32(0)).astype(np.float32)


def percentile_stats(x, lower=0.5, upper=99.5):
  """Per-channel lower/upper percentiles over the non-zero voxels of x."""
  chans = channels(x)
  c = len(chans)
  lo = np.zeros(c, np.float32)
  hi = np.ones(c, np.float32)
  for i, v in enumerate(chans):
    v = np.asarray(v)
    v = v[v != 0]
    if v.size:
      lo[i], hi[i] = np.percentile(v, [lower, upper])
      if hi[i] <= lo[i]:
        hi[i] = lo[i] + 1
  return lo, hi


@dataclasses.dataclass(frozen=True)
class Intensity:
  """One intensity normalisation scheme (`config.data.intensity`).

  * "ct_window": the reference recipe, ScaleIntensityRange(a_min, a_max ->
    0..1, clip); a CT window that the BrainSegFounder scripts kept for MRI.
  * "zscore_nonzero": per-volume, per-channel z-score over non-zero voxels.
  * "percentile": per-volume, per-channel [p0.5, p99.5] of non-zero voxels
    -> [0, 1], clipped; background stays 0.

  `fit` computes per-volume statistics once; `apply` maps any sub-array
  (a crop) with them, so crops match the normalised whole volume.
  """
  kind: str = "zscore_nonzero"
  a_min: float = -1000.0
  a_max: float = 1000.0

  def __post_init__(self):
    if self.kind not in INTENSITIES:
      raise ValueError(f"data.intensity={self.kind!r}; expected one of {INTENSITIES}")

  def fit(self, volume):
    if self.kind == "zscore_nonzero":
      return nonzero_stats(volume)
    if self.kind == "percentile":
      return percentile_stats(volume)
    return ()

  def apply(self, x, params):
    if self.kind == "ct_window":
      return scale_intensity_range(x, self.a_min, self.a_max)
    if self.kind == "zscore_nonzero":
      return normalize_nonzero(x, *params)
    lo, hi = params
    x = np.asarray(x, np.float32)
    out = np.clip((x - lo) / (hi - lo), 0, 1)
    return np.where(x != 0, out, np.float32(0)).astype(np.float32)

  @property
  def foreground_threshold(self) -> float:
    """Raw value above which a voxel is foreground for CropForeground.

    For "ct_window" this is MONAI's `x > 0` evaluated *after* the window (the
    reference order), i.e. raw > a_min. For the MRI schemes it is raw > 0,
    evaluated before normalisation as in the BraTS reference chain.
    """
    return self.a_min if self.kind == "ct_window" else 0.0

  def spec(self) -> dict:
    spec = {"kind": self.kind}
    if self.kind == "ct_window":
      spec.update(a_min=self.a_min, a_max=self.a_max, b_min=0.0, b_max=1.0, clip=True)
    elif self.kind == "percentile":
      spec.update(lower=0.5, upper=99.5, nonzero=True, clip=True)
    else:
      spec.update(nonzero=True, channel_wise=True)
    return spec


def spatial_pad(x, roi: Sequence[int], value=0.0):
  """MONAI `SpatialPad(roi, method="symmetric")` on (H, W, D, C)."""
  pads = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2)
          for s, r in zip(x.shape[:3], roi)]
  if not any(p for pair in pads for p in pair):
    return x
  return np.pad(x, pads + [(0, 0)] * (x.ndim - 3), constant_values=value)


def foreground_box(mask: np.ndarray, k_divisible: Sequence[int] = (1, 1, 1)):
  """MONAI `CropForeground(margin=0, k_divisible)` box on a (H, W, D) mask.

  Returns:
    (start, size) int arrays; the box may extend past the array (MONAI pads
    those parts with zeros).

  Raises:
    DataError: the mask is empty (an all-background volume).
  """
  projections = [np.any(mask, axis=tuple(b for b in range(3) if b != a)) for a in range(3)]
  return _box_from_projections(projections, k_divisible)


def max_plane(volume):
  """Max over the channels and over the outermost-in-memory spatial axis.

  That axis changes slowest in memory, so the reduction streams through the
  volume once. NaN and +Inf anywhere propagate into the plane.

  Args:
    volume: (H, W, D, C) array or list of C (H, W, D) arrays.

  Returns:
    (axis, plane): the reduced axis and the 2D max over it.
  """
  chans = channels(volume)
  axis = int(np.argmax(np.abs(chans[0].strides[:3])))
  plane = chans[0].max(axis=axis)
  for c in chans[1:]:
    plane = np.maximum(plane, c.max(axis=axis))
  return axis, plane


def foreground_box_of(volume, threshold, k_divisible=(1, 1, 1), plane=None):
  """`foreground_box(any(volume > threshold, channels), k)` without the mask.

  A plane holds a foreground voxel iff its maximum exceeds the threshold.
  The two inner axes come from one max-projection (`max_plane`); along the
  outer axis, slices are scanned inwards from both ends, so only background
  slices and one foreground slice per end are read. Same box as MONAI's
  boolean mask, at about one pass over the data instead of several.

  Args:
    volume: (H, W, D, C) array or list of C (H, W, D) arrays.
    threshold: foreground is value > threshold in any channel.
    k_divisible: box size multiple (MONAI `k_divisible`).
    plane: `max_plane(volume)` if already computed.
  """
  chans = channels(volume)
  axis, plane = max_plane(chans) if plane is None else plane
  inner = [a for a in range(3) if a != axis]
  proj = [None] * 3
  proj[inner[0]] = plane.max(axis=1) > threshold
  proj[inner[1]] = plane.max(axis=0) > threshold
  n = chans[0].shape[axis]
  outer = np.zeros(n, bool)
  if proj[inner[0]].any():
    # Basic indexing gives a view; np.take would copy the whole volume.
    at = lambda i: (slice(None),) * axis + (i,)
    has_fg = lambda i: any(c[at(i)].max() > threshold for c in chans)
    first = next(i for i in range(n) if has_fg(i))
    last = next(i for i in range(n - 1, first - 1, -1) if has_fg(i))
    outer[[first, last]] = True
  proj[axis] = outer
  return _box_from_projections(proj, k_divisible)


def _box_from_projections(projections, k_divisible):
  start, end = [], []
  for p in projections:
    idx = np.flatnonzero(p)
    if idx.size == 0:
      raise DataError("volume has no foreground voxels (empty image)")
    start.append(idx[0])
    end.append(idx[-1] + 1)
  start, end = np.asarray(start), np.asarray(end)
  size = end - start
  k = np.asarray(k_divisible)
  new_size = np.ceil(size / k).astype(int) * k
  start = start - (new_size - size) // 2
  return start, new_size


def crop_with_fill(x, start, size, fill=0.0):
  """x[start:start+size] on the 3 spatial axes; outside the array -> fill."""
  start = np.asarray(start)
  size = np.asarray(size)
  shape = np.asarray(x.shape[:3])
  lo = np.clip(start, 0, shape)
  hi = np.clip(start + size, 0, shape)
  inner = x[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
  if np.array_equal(lo, start) and np.array_equal(hi, start + size):
    return inner
  out = np.full(tuple(size) + x.shape[3:], fill, dtype=x.dtype)
  o = lo - start
  out[o[0]:o[0] + inner.shape[0], o[1]:o[1] + inner.shape[1],
      o[2]:o[2] + inner.shape[2]] = inner
  return out


def crop_foreground(x, k_divisible=(1, 1, 1), threshold=0.0):
  """MONAI `CropForeground(select_fn=x > threshold, k_divisible)` on (H,W,D,C)."""
  start, size = foreground_box(np.any(x > threshold, axis=-1), k_divisible)
  return crop_with_fill(x, start, size, 0.0)


def crop_region(volume, threshold, roi, plane=None):
  """The region random crops are drawn from, as the reference chain builds it.

  Reference: SpatialPad(roi) then CropForeground(k_divisible=roi). Padding adds
  no foreground and only shifts coordinates, so the k-divisible foreground box
  of the raw volume, with parts outside the array read as zeros, is the same
  region; its size is a multiple of roi, hence >= roi, so no pad is needed.

  Args:
    volume: (H, W, D, C) raw volume or list of C (H, W, D) channels.
    threshold: foreground is any channel > threshold (`Intensity.foreground_threshold`).
    roi: crop size.
    plane: `max_plane(volume)` if already computed.

  Returns:
    (start, size) in raw voxel coordinates (start may be negative).
  """
  return foreground_box_of(volume, threshold, roi, plane)


def random_crop_starts(rng: np.random.Generator, region_start, region_size,
                       roi, num: int) -> np.ndarray:
  """MONAI `RandSpatialCropSamples(random_size=False)`: `num` uniform corners."""
  region_start = np.asarray(region_start)
  span = np.asarray(region_size) - np.asarray(roi)
  return region_start + rng.integers(0, span + 1, size=(num, 3))


def rand_flip(rng: np.random.Generator, arrays, prob=0.5):
  """MONAI `RandFlip(prob, spatial_axis=a)` for a = 0, 1, 2, same on all arrays."""
  flips = rng.random(3) < prob
  axes = tuple(int(a) for a in np.flatnonzero(flips))
  if not axes:
    return list(arrays)
  return [np.ascontiguousarray(np.flip(a, axis=axes)) for a in arrays]


def rand_scale_shift(rng: np.random.Generator, x, factor=0.1, offset=0.1):
  """MONAI RandScaleIntensity(factors) then RandShiftIntensity(offsets), prob 1.

  x * (1 + U(-factor, factor)) + U(-offset, offset), one draw per volume.
  """
  s = rng.uniform(-factor, factor)
  o = rng.uniform(-offset, offset)
  return (x * np.float32(1 + s) + np.float32(o)).astype(np.float32)
