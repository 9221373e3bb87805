"""Demo cohort: layouts, determinism, labels and tissue contrast."""

import glob
import gzip
import json
import os

import nibabel as nib
import numpy as np
import pytest

from bsf_jax.data import demo
from bsf_jax.data import io


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo")
  a = demo.write_demo_cohort(str(root / "a"), subjects=2, seed=0, small=True, workers=1)
  assert demo.main(["--out", str(root / "b"), "--subjects", "2", "--seed", "0", "--small",
                    "--workers", "2"]) == 0
  c = demo.write_demo_cohort(str(root / "c"), subjects=2, seed=1, small=True, workers=1)
  return root, a, c


def _files(folder):
  return sorted(os.path.relpath(p, folder) for p in glob.glob(f"{folder}/**/*.nii.gz", recursive=True))


def test_layouts_shapes_and_orientation(cohorts):
  root, a, _ = cohorts
  names = _files(root / "a")
  assert "ukb/1000001_20252_2_0/T1/T1_brain_to_MNI.nii.gz" in names
  assert "ukb/1000001_20253_2_0/T2_FLAIR/T2_FLAIR_brain_to_MNI.nii.gz" in names
  for m in ("flair", "t1ce", "t1", "t2", "seg"):
    assert f"brats/TrainingData/BraTS2021_00001/BraTS2021_00001_{m}.nii.gz" in names
  stem = "atlas/Training/R001/sub-r001s001/ses-1/anat/sub-r001s001_ses-1_space-MNI152NLin2009aSym"
  assert f"{stem}_T1w.nii.gz" in names and f"{stem}_label-L_desc-T1lesion_mask.nii.gz" in names
  assert len(names) == 2 * (2 + 5 + 2)
  # Small grids are the full grids / 3; storage orientation like the real data.
  full = {"ukb": (182, 218, 182), "brats": (240, 240, 155), "atlas": (197, 233, 189)}
  codes = {"ukb": ("L", "A", "S"), "brats": ("L", "P", "S"), "atlas": ("R", "A", "S")}
  for ds, shape in full.items():
    assert demo._grid(ds, small=False)[0] == shape
    path = sorted(p for p in glob.glob(f"{root}/a/{ds}/**/*.nii.gz", recursive=True))[0]
    img = nib.load(path)
    assert img.shape == tuple(-(-s // 3) for s in shape)
    assert nib.aff2axcodes(img.affine) == codes[ds]
  # Datalists in the reference formats, relative to their folder.
  ukb = json.load(open(a["ukb"]["datalist"]))
  assert len(ukb["training"]) == 1 and len(ukb["validation"]) == 1
  assert len(ukb["training"][0]["image"]) == 2
  folds = json.load(open(a["brats"]["datalist"]))["training"]
  assert all(len(f["image"]) == 4 and 0 <= f["fold"] < 5 for f in folds)
  assert folds[0]["image"][0].endswith("_flair.nii.gz")


def test_same_seed_same_bytes_other_seed_differs(cohorts):
  """a: in process, b: CLI with 2 worker processes; c: another seed."""
  root, _, _ = cohorts
  names = _files(root / "a")
  assert names == _files(root / "b")
  for name in names:
    # The NIfTI files, header and voxels; ISA-L's gzip stream of equal bytes
    # may differ in bits that decode to nothing (io.write_volume).
    assert (gzip.decompress(open(root / "a" / name, "rb").read())
            == gzip.decompress(open(root / "b" / name, "rb").read())), name
  t1 = "ukb/1000001_20252_2_0/T1/T1_brain_to_MNI.nii.gz"
  assert not np.array_equal(io.read_volume(str(root / "a" / t1)).data,
                            io.read_volume(str(root / "c" / t1)).data)


def test_labels_and_lesions(cohorts):
  _, a, _ = cohorts
  for s in a["brats"]["subjects"]:
    seg = io.read_volume(s["seg"]).data
    assert set(np.unique(seg)) == {0, 1, 2, 4}
    t1ce = io.read_volume(s["t1ce"]).data
    flair = io.read_volume(s["flair"]).data
    brain = (t1ce > 0) & (seg == 0)
    assert t1ce[seg == 4].mean() > t1ce[brain].mean()  # enhancing rim
    assert flair[seg == 2].mean() > flair[brain].mean()  # oedema bright on FLAIR
    assert np.all(t1ce[seg > 0] > 0)  # lesions inside the brain
  for s in a["atlas"]["subjects"]:
    mask = io.read_volume(s["label"]).data
    t1 = io.read_volume(s["t1"]).data
    assert set(np.unique(mask)) == {0, 1}
    assert np.all(t1[mask > 0] > 0) and t1[mask > 0].mean() < t1[(t1 > 0) & (mask == 0)].mean()


def test_tissue_contrast():
  """T1: WM > GM > CSF; T2-FLAIR: GM > WM > CSF (CSF dark)."""
  rng = np.random.default_rng(0)
  b = demo._deform(rng, "ukb", True)
  t1, flair = demo._ukb_subject(rng, b, demo.SMALL_FACTOR)
  cls = {n: getattr(b, n) > 0.7 for n in ("gm", "wm", "csf")}
  m1 = {n: t1[c].mean() for n, c in cls.items()}
  m2 = {n: flair[c].mean() for n, c in cls.items()}
  assert m1["wm"] > m1["gm"] > m1["csf"]
  assert m2["gm"] > m2["wm"] > m2["csf"]
