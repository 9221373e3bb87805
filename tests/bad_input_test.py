"""Bad-input catalogue (issue 7, item 4): every case fails loudly and names it.

Each test feeds one broken input to the real code path and checks three
things: the exception type (or, for the CLI, a non-zero exit), that the
message names the culprit (file, key, shape or value), and, where a workdir
exists, that nothing in it was destroyed. docs/reliability.md lists the cases.

Data cases go through `pipeline.make_train_iter` (the path training takes) on
tiny hand-written NIfTI files, so they cost milliseconds. Config cases call
`config_lib` / `loop` directly; CLI cases run `python -m bsf_jax.main` in
subprocesses, started together so their JAX imports overlap. Checkpoint cases
share one 2-step stage-1 workdir.
"""

import gzip
import hashlib
import json
import os
import re

import numpy as np
import pytest

from bsf_jax.data import DataError
from bsf_jax.data import io
from bsf_jax.data import pipeline

SHAPE = (40, 40, 40)


def _volume(seed, shape=SHAPE):
  """A positive blob inside a zero border: has foreground, like a brain."""
  rng = np.random.default_rng(seed)
  data = np.zeros(shape, np.float32)
  inner = tuple(slice(4, max(5, s - 4)) for s in shape)
  data[inner] = rng.uniform(100, 1000, size=data[inner].shape)
  return data


def _write(path, data):
  return io.write_volume(str(path), data, np.eye(4))


def _ukb(tmp_path, subjects=2, t1=None, flair=None):
  """A UKB-style datalist of `subjects`; subject 0's files may be replaced."""
  items = []
  for i in range(subjects):
    paths = []
    for m, override in (("t1", t1), ("flair", flair)):
      p = tmp_path / f"s{i}_{m}.nii.gz"
      if i == 0 and override is not None:
        override(p)
      else:
        _write(p, _volume(10 * i + len(m)))
      paths.append(str(p))
    items.append({"image": paths})
  return _datalist(tmp_path, {"training": items, "validation": items[:1]})


def _datalist(tmp_path, content):
  path = tmp_path / "datalist.json"
  path.write_text(json.dumps(content) if not isinstance(content, str)
                  else content)
  return str(path)


def _cfg(datalist, dataset="ukb", **kw):
  cfg = pipeline.default_config()
  cfg.update(dict(dataset=dataset, datalist=datalist, root="", roi=(32, 32, 32),
                  batch_size=2, num_samples=2, workers=0, val_fraction=0.0))
  if dataset == "ukb":
    cfg.modalities = ("t1", "flair")
  elif dataset == "brats":
    cfg.update(dict(modalities=("flair", "t1ce", "t1", "t2"),
                    label_format="brats", fold=1))
  cfg.update(kw)
  return cfg


def _first_batch(cfg, task="ssl"):
  it = pipeline.make_train_iter(cfg, task=task, seed=0, process_index=0,
                                process_count=1)
  # Two volumes per subject list: subject 0 is in the first two batches.
  return [next(it) for _ in range(2)]


def _expect(cfg, *needles, exc=DataError, task="ssl"):
  with pytest.raises(exc) as info:
    _first_batch(cfg, task)
  for needle in needles:
    assert str(needle) in str(info.value), str(info.value)
  return info.value


# --- Data -------------------------------------------------------------------


def test_good_data_gives_batches(tmp_path):
  """Control case: the fixtures themselves are valid input."""
  batches = _first_batch(_cfg(_ukb(tmp_path)))
  assert batches[0]["image"].shape == (2, 32, 32, 32, 2)


def test_data_truncated_gzip(tmp_path):
  def truncated(p):
    _write(p, _volume(0))
    raw = p.read_bytes()
    p.write_bytes(raw[:len(raw) // 2])
  dl = _ukb(tmp_path, t1=truncated)
  _expect(_cfg(dl), tmp_path / "s0_t1.nii.gz", "truncated or corrupt gzip")


def test_data_not_nifti(tmp_path):
  def garbage(p):
    p.write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
  dl = _ukb(tmp_path, t1=garbage)
  _expect(_cfg(dl), tmp_path / "s0_t1.nii.gz", "not a readable NIfTI")


def test_data_wrong_ndim(tmp_path):
  dl = _ukb(tmp_path, flair=lambda p: _write(p, np.ones((40, 40, 40, 2))))
  _expect(_cfg(dl), tmp_path / "s0_flair.nii.gz", "expected a 3D volume",
          "(40, 40, 40, 2)")


def test_data_nan_voxels(tmp_path):
  def nan(p):
    data = _volume(0)
    data[20, 20, 20:23] = np.nan
    _write(p, data)
  dl = _ukb(tmp_path, t1=nan)
  _expect(_cfg(dl), tmp_path / "s0_t1.nii.gz", "3 NaN/Inf voxels")


def test_data_mismatched_modality_shapes(tmp_path):
  dl = _ukb(tmp_path, flair=lambda p: _write(p, _volume(0, (40, 40, 36))))
  _expect(_cfg(dl), tmp_path / "s0_flair.nii.gz", "(40, 40, 36)",
          "differs from", tmp_path / "s0_t1.nii.gz")


def test_data_missing_file(tmp_path):
  dl = _ukb(tmp_path, t1=lambda p: None)  # Listed, never written.
  _expect(_cfg(dl), tmp_path / "s0_t1.nii.gz", "file not found")


def test_data_no_foreground(tmp_path):
  def zeros(p):
    _write(p, np.zeros(SHAPE))
  dl = _ukb(tmp_path, t1=zeros, flair=zeros)
  _expect(_cfg(dl), tmp_path / "s0_t1.nii.gz", "no foreground")


def _brats(tmp_path, seg):
  items = []
  for i in range(2):
    images = [str(_write(tmp_path / f"b{i}_{m}.nii.gz", _volume(i)))
              for m in ("flair", "t1ce", "t1", "t2")]
    label = np.zeros(SHAPE, np.float32)
    label[10:20, 10:20, 10:20] = 2
    label[12:16, 12:16, 12:16] = 4
    if i == 0:
      label = seg(label)
    _write(tmp_path / f"b{i}_seg.nii.gz", label)
    items.append({"fold": i, "image": images,
                  "label": str(tmp_path / f"b{i}_seg.nii.gz")})
  # fold=1 validates on subject 1: subject 0 is the only training record.
  return _datalist(tmp_path, {"training": items})


def test_data_wrong_label_values(tmp_path):
  def label3(label):
    label[30, 30, 30] = 3  # A BraTS 2023 ET label in a BraTS 2021 setup.
    return label
  cfg = _cfg(_brats(tmp_path, label3), dataset="brats")
  error = _expect(cfg, tmp_path / "b0_seg.nii.gz", "outside the expected set",
                  task="seg")
  # The value itself is named (data/transforms.py currently prints it as
  # `np.int64(3)`, reported to the data owner; both spellings name it).
  assert re.search(r"label values \[(np\.int64\()?3\)?\]", str(error)), error


def test_data_label_shape_differs_from_image(tmp_path):
  cfg = _cfg(_brats(tmp_path, lambda label: label[:, :, :30]), dataset="brats")
  _expect(cfg, tmp_path / "b0_seg.nii.gz", "label shape (40, 40, 30)",
          task="seg")


def test_data_empty_datalist(tmp_path):
  cfg = _cfg(_datalist(tmp_path, {"training": [], "validation": []}))
  _expect(cfg, tmp_path / "datalist.json", "empty training datalist")


def test_data_datalist_missing(tmp_path):
  _expect(_cfg(str(tmp_path / "nope.json")), tmp_path / "nope.json",
          "datalist file not found")


def test_data_datalist_not_json(tmp_path):
  _expect(_cfg(_datalist(tmp_path, '{"training": [')),
          tmp_path / "datalist.json", "not valid json")


def test_data_record_without_image(tmp_path):
  dl = _datalist(tmp_path, {"training": [{"label": "x.nii.gz"}]})
  _expect(_cfg(dl), "training[0] has no 'image' entry")


def test_data_record_with_wrong_image_count(tmp_path):
  dl = _datalist(tmp_path, {"training": [{"image": ["only_t1.nii.gz"]}]})
  _expect(_cfg(dl), "training[0]", "expected 2 images", "got 1")


def test_data_unknown_modality(tmp_path):
  cfg = _cfg(_ukb(tmp_path), modalities=("t1", "dwi"))
  _expect(cfg, "modality 'dwi' unknown for ukb", exc=ValueError)


def test_data_volume_smaller_than_roi_is_padded(tmp_path):
  """Not an error: as MONAI's SpatialPad, a small volume is zero-padded.

  Catalogued because users expect either behaviour; the crop must still have
  the roi shape and contain the whole (small) foreground.
  """
  small = lambda p: _write(p, _volume(0, (20, 24, 28)))
  batches = _first_batch(_cfg(_ukb(tmp_path, t1=small, flair=small)))
  shapes = {b["image"].shape for b in batches}
  assert shapes == {(2, 32, 32, 32, 2)}
  assert all(np.isfinite(b["image"]).all() for b in batches)


def _digest(root):
  """sha256 of every file under `root`: proof that nothing was destroyed."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out
