"""One record to training crops: read, check, normalise, crop (and augment).

What a data worker does with each record (`pipeline.TrainTransform`), from
NIfTI files (`load_record` + `make_crops`) or from a prepared store
(`store_crops`), under one `CropSpec`. The crops are those of the reference
MONAI chain, see `make_crops`.
"""

import dataclasses
import logging
from typing import NamedTuple, Optional

import numpy as np

from bsf_jax.data import DataError
from bsf_jax.data import io
from bsf_jax.data import labels as L
from bsf_jax.data import store as store_lib
from bsf_jax.data import transforms as T

# Records skipped under on_error="skip", per process (each Grain worker
# process keeps its own count; `bsf_jax.data.check` gives the full list).
SKIPPED = {"count": 0}


@dataclasses.dataclass(frozen=True)
class CropSpec:
  """The config.data fields a worker needs to crop a record (picklable).

  `pipeline.crop_spec` makes it from a run's config.
  """
  roi: tuple
  num_samples: int
  intensity: T.Intensity
  labels: Optional[L.Convention]
  augment: bool  # seg crops are augmented on the host
  on_error: str
  cache_dir: str

  @property
  def raw_fill(self):
    # Raw value that the intensity mapping sends to 0: out-of-volume crop
    # parts read as 0 after normalisation, as with MONAI's zero padding.
    return self.intensity.a_min if self.intensity.kind == "ct_window" else 0.0


class Loaded(NamedTuple):
  """One decoded record: C raw RAS (H, W, D) channels, label or None, affine,
  and (training only) `transforms.max_plane` of the channels."""
  chans: list
  label: Optional[np.ndarray]
  affine: np.ndarray
  plane: Optional[tuple] = None


def load_record(record: dict, spec: CropSpec, full_check: bool = True) -> Loaded:
  """Reads and checks one record.

  Channels stay separate so training crops them without first copying the
  whole volume into one (H, W, D, C) array.

  Args:
    record: {"image": [paths], "label": path or "", "id"}.
    spec: pipeline settings.
    full_check: scan every voxel for NaN/Inf (eval). Training instead gets
      NaN/+Inf from the max-projection it needs for the crop box anyway, and
      -Inf from the crops and intensity statistics (`make_crops`): one pass
      over the volume instead of two.

  Raises:
    DataError naming the file and the problem.
  """
  vols = [io.read_volume(p, cache_dir=spec.cache_dir, check_finite=full_check)
          for p in record["image"]]
  for v in vols[1:]:
    if v.data.shape != vols[0].data.shape:
      raise DataError(f"{v.path}: shape {v.data.shape} differs from "
                      f"{vols[0].path} {vols[0].data.shape} (modalities of one subject)")
  plane = None
  if not full_check:
    planes = [T.max_plane([v.data]) for v in vols]
    for v, (_, pl) in zip(vols, planes):
      if not np.isfinite(pl).all():
        bad = v.data.size - np.count_nonzero(np.isfinite(v.data))
        raise DataError(f"{v.path}: {bad} NaN/Inf voxels")
    if len({a for a, _ in planes}) == 1:  # same memory layout in every channel
      plane = (planes[0][0], np.maximum.reduce([pl for _, pl in planes]))
  shape = vols[0].data.shape
  label = None
  if spec.labels is not None:
    if not record.get("label"):
      raise DataError(f"{record['image'][0]}: record {record['id']} has no label")
    lab = io.read_volume(record["label"], cache_dir=spec.cache_dir)
    if lab.data.shape != shape:
      raise DataError(f"{lab.path}: label shape {lab.data.shape} differs from "
                      f"image {vols[0].path} {shape}")
    L.check_values(lab.data, spec.labels, lab.path)
    label = lab.data
  return Loaded([v.data for v in vols], label, vols[0].affine, plane)


def guard(spec, record, fn, *args):
  """Runs fn; under on_error='skip' a DataError becomes None (logged, counted)."""
  try:
    return fn(*args)
  except DataError as e:
    if spec.on_error == "raise":
      raise
    SKIPPED["count"] += 1
    logging.warning("data: skipping record %s (%d skipped so far): %s",
                    record.get("id"), SKIPPED["count"], e)
    return None


def intensity_and_region(loaded: Loaded, spec: CropSpec):
  """(intensity parameters, crop region start, size) of a volume.

  What both the crops of a training step and a prepared store start from.

  Raises:
    DataError: non-finite intensity statistics, or no foreground.
  """
  params = spec.intensity.fit(loaded.chans)
  if not all(np.isfinite(p).all() for p in params):
    raise DataError("NaN/Inf voxels (non-finite intensity statistics)")
  start, size = T.crop_region(loaded.chans, spec.intensity.foreground_threshold, spec.roi,
                              loaded.plane)
  return params, start, size


def make_crops(loaded: Loaded, rng, spec: CropSpec, augment: bool):
  """`num_samples` roi crops (+ labels) of one volume, intensity-normalised.

  The same voxels as the reference chain [intensity, SpatialPad(roi),
  CropForeground(k_divisible=roi), RandSpatialCropSamples(roi)], then for
  segmentation RandFlip x3 and RandScale/ShiftIntensity when `augment`.
  """
  chans, label = loaded.chans, loaded.label
  params, start, size = intensity_and_region(loaded, spec)

  def cut(corner, image_out, label_out):
    img = np.stack([T.crop_with_fill(c, corner, spec.roi, spec.raw_fill) for c in chans], -1)
    if not np.isfinite(img.sum(dtype=np.float64)):
      raise DataError("NaN/Inf voxels in a crop")
    image_out[...] = spec.intensity.apply(img, params)
    if label_out is not None:
      label_out[...] = L.to_channels(T.crop_with_fill(label, corner, spec.roi, 0),
                                     spec.labels)
  return sample_crops(rng, start, size, cut, len(chans), spec, augment)


def store_crops(record: dict, rng, spec: CropSpec, augment: bool):
  """`make_crops` of a store record: prepare stored the crop region, the
  normalised voxels and the label's channels; a crop only decompresses them."""
  subject = store_lib.Subject(record)
  regions = None if spec.labels is None else subject.regions()

  def cut(corner, image_out, label_out):
    subject.read(subject.image, corner, image_out)
    if label_out is not None:
      subject.read(regions, corner, label_out)
  return sample_crops(rng, subject.box_start, subject.box_size, cut,
                      subject.entry["channels"], spec, augment)


def sample_crops(rng, start, size, cut, channels: int, spec: CropSpec, augment: bool):
  """Crops at `num_samples` random corners of the region (start, size).

  `cut(corner, image_out, label_out)` writes the normalised image crop and,
  for segmentation, the label's region channels into the batch. The rng draws
  the corners, then each crop's augmentation, in that order.
  """
  corners = T.random_crop_starts(rng, start, size, spec.roi, spec.num_samples)
  image = np.empty((len(corners), *spec.roi, channels), np.float32)
  label = (None if spec.labels is None else
           np.empty((len(corners), *spec.roi, len(spec.labels.regions)), np.float32))
  for i, corner in enumerate(corners):
    cut(corner, image[i], None if label is None else label[i])
    if augment:
      # Flips commute with the label -> channels map, so flipping the
      # channels flips the label.
      flipped = T.rand_flip(rng, [image[i]] if label is None else [image[i], label[i]])
      image[i] = T.rand_scale_shift(rng, flipped[0])
      if label is not None:
        label[i] = flipped[1]
  return {"image": image} if label is None else {"image": image, "label": label}
