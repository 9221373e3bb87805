"""Synthetic demo cohort built from the real MNI152 template.

    python -m bsf_jax.data.demo --out DIR [--subjects 8] [--seed 0] [--small]

writes DIR/ukb (UK Biobank layout, T1 + T2-FLAIR, 182x218x182, FSL MNI152
affine, BrainSegFounder datalist json), DIR/brats (BraTS 2021 layout, 4
modalities + seg at 240x240x155, labels {0,1,2,4}, 5-fold json) and DIR/atlas
(ATLAS v2.0 BIDS layout, T1w + binary lesion mask).

Anatomy comes from the ICBM152 2009 T1/GM/WM templates shipped inside the
nilearn wheel (nothing is downloaded). Each subject is the template under a
random smooth deformation (global scaling + low-frequency sinusoidal field)
with per-modality tissue contrast, lesions, a multiplicative bias field and
noise. Contrasts: T1 WM > GM > CSF; T2 CSF > GM > WM; FLAIR GM > WM > CSF with
bright lesions; T1ce adds an enhancing tumour rim. Tumours are nested
necrosis (1) / enhancing rim (4) / oedema (2); stroke lesions sit in vascular
territories (MCA cortex, lenticulostriate, thalamus, PCA, pons, corona radiata).
Each subject has its own rng from (seed, dataset, index): same seed -> the
same NIfTI files (header and voxels), whatever the worker count.

`--small` divides every grid by 3 (3 mm voxels) and keeps layouts and names.
"""

import concurrent.futures
import functools
import importlib.util
import json
import multiprocessing
import os
import sys
import time

from absl import flags
import numpy as np
from scipy import ndimage

from bsf_jax import tool_flags
from bsf_jax.data import io

SMALL_FACTOR = 3
DEFAULT_SUBJECTS = 8

FLAGS = tool_flags.flag_values(__name__)
flags.DEFINE_string("out", None, "output folder", flag_values=FLAGS)
flags.DEFINE_integer("subjects", DEFAULT_SUBJECTS, "subjects per dataset", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "seed of every subject's rng", flag_values=FLAGS)
flags.DEFINE_bool("small", False, f"grids / {SMALL_FACTOR} for tests", flag_values=FLAGS)
flags.DEFINE_integer("workers", 0, "processes (0: min(2, cpus))", flag_values=FLAGS)
flags.DEFINE_string("datasets", "ukb,brats,atlas", "comma-separated subset", flag_values=FLAGS)
flags.mark_flag_as_required("out", flag_values=FLAGS)

# RAS generation grids (shape, affine at 1 mm); world coordinates are MNI.
# UKB: FSL MNI152 grid, stored LAS like FSL ([-1,0,0,90],[0,1,0,-126],...).
_UKB = ((182, 218, 182), np.array([[1., 0, 0, -91], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]]))
# BraTS: 240x240x155 around the brain, stored LPS like the BraTS files.
_BRATS = ((240, 240, 155), np.array([[1., 0, 0, -120], [0, 1, 0, -138], [0, 0, 1, -68], [0, 0, 0, 1]]))
# ATLAS v2.0: the MNI152NLin2009aSym grid itself (197x233x189, RAS).
_ATLAS = ((197, 233, 189), np.array([[1., 0, 0, -98], [0, 1, 0, -134], [0, 0, 1, -72], [0, 0, 0, 1]]))
_DATASET_CODE = {"ukb": 1, "brats": 2, "atlas": 3}
# Stroke centres (MNI mm, left hemisphere; mirrored at random) and radii (mm).
_STROKE_SITES = (((-40, -10, 20), 14), ((-45, -35, 28), 12), ((-24, 2, 4), 7),
                 ((-22, -8, 14), 6), ((-12, -18, 8), 6), ((-18, -80, 6), 11),
                 ((-6, -28, -30), 5), ((-26, -14, 26), 7))


def _template_file(name: str) -> str:
  spec = importlib.util.find_spec("nilearn")
  if spec is None:
    raise RuntimeError("the demo cohort needs nilearn (pip install 'bsf_jax[demo]'): "
                       "its wheel ships the MNI152 template")
  path = os.path.join(spec.submodule_search_locations[0], "datasets", "data",
                      f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz")
  if not os.path.isfile(path):
    raise RuntimeError(f"{path}: MNI152 template missing from the nilearn install")
  return path


@functools.lru_cache(maxsize=1)
def _template():
  """(4, X, Y, Z) uint8 maps gm, wm, csf, t1 on the ICBM152 grid + its affine."""
  gm = io.read_volume(_template_file("gm"))
  g = gm.data / 255
  wm = io.read_volume(_template_file("wm")).data / 255
  t1 = io.read_volume(_template_file("t1")).data
  brain = ndimage.binary_fill_holes(g + wm > 0.15)
  csf = np.clip(brain - g - wm, 0, 1)
  t1n = np.clip(t1 / np.percentile(t1[brain], 99), 0, 1) * brain
  maps = np.stack([g, wm, csf, t1n])
  return np.round(maps * 255).astype(np.uint8), gm.affine


def _grid(dataset: str, small: bool):
  shape, affine = {"ukb": _UKB, "brats": _BRATS, "atlas": _ATLAS}[dataset]
  if small:
    shape = tuple(-(-s // SMALL_FACTOR) for s in shape)
    affine = affine.copy()
    affine[:3, :3] *= SMALL_FACTOR
  return shape, affine


@functools.lru_cache(maxsize=6)
def _maps_on_grid(dataset: str, small: bool):
  """Template maps (nearest, axis-aligned) on a dataset's RAS grid + brain box."""
  maps, t_aff = _template()
  shape, affine = _grid(dataset, small)
  index = []
  for a in range(3):
    world = affine[a, a] * np.arange(shape[a]) + affine[a, 3]
    idx = np.round((world - t_aff[a, 3]) / t_aff[a, a]).astype(int)
    index.append(np.where((idx >= 0) & (idx < maps.shape[a + 1]), idx, -1))
  padded = np.pad(maps, [(0, 0), (0, 1), (0, 1), (0, 1)])  # index -1 -> zeros
  on_grid = np.ascontiguousarray(padded[np.ix_(range(4), *index)])
  # Deformations move the brain by < 16 mm: only this box is ever resampled.
  margin = int(np.ceil(16 / abs(affine[0, 0])))
  nz = [np.flatnonzero(on_grid[:3].any(0).any(axis=tuple(b for b in range(3) if b != a)))
        for a in range(3)]
  lo = np.array([max(n[0] - margin, 0) for n in nz])
  hi = np.array([min(n[-1] + 1 + margin, s) for n, s in zip(nz, shape)])
  return on_grid, lo, hi


def _sin_tables(rng, shape, max_freq):
  return [np.sin(2 * np.pi * rng.uniform(0.3, max_freq) * np.arange(n) / n
                 + rng.uniform(0, 2 * np.pi)).astype(np.float32) for n in shape]


def _smooth_field(rng, shape, amp, terms=3, max_freq=2.0, at=None):
  """Sum of separable low-frequency sinusoids over a grid of `shape`.

  Returns the full float32 grid, or only its values at integer points
  `at` (3, N) when given (cheap: three table look-ups per term).
  """
  out = np.zeros(shape if at is None else at.shape[1], np.float32)
  for _ in range(terms):
    p = _sin_tables(rng, shape, max_freq)
    w = np.float32(rng.uniform(-amp, amp))
    if at is None:
      out += w * (p[0][:, None, None] * p[1][None, :, None] * p[2][None, None, :])
    else:
      out += w * p[0][at[0]] * p[1][at[1]] * p[2][at[2]]
  return out


class _Brain:
  """A deformed subject, stored only at its brain voxels (1D arrays).

  Attributes: shape (grid), flat (flat voxel indices), xyz (3, N) voxel
  coordinates, gm/wm/csf/t1 (N,) float32 tissue maps in [0, 1].
  """

  def __init__(self, shape, flat, xyz, maps):
    self.shape, self.flat, self.xyz = shape, flat, xyz
    self.gm, self.wm, self.csf, self.t1 = maps

  def volume(self, values, dtype=np.float32):
    out = np.zeros(int(np.prod(self.shape)), dtype)
    out[self.flat] = values
    return out.reshape(self.shape)


def _deform(rng, dataset, small) -> _Brain:
  """Random smooth deformation (nearest-neighbour pull-back) of the template."""
  maps, lo, hi = _maps_on_grid(dataset, small)
  vox = SMALL_FACTOR if small else 1
  shape = maps.shape[1:]
  sub = tuple(hi - lo)
  src = 0
  for a in range(3):
    n = shape[a]
    coord = np.arange(lo[a], hi[a], dtype=np.float32)
    c = coord + rng.uniform(-0.06, 0.06) * (coord - n / 2) + rng.uniform(-3, 3) / vox
    c = c.reshape([-1 if i == a else 1 for i in range(3)]) + _smooth_field(rng, sub, 4.0 / vox, terms=2)
    src = src * n + np.clip(np.rint(c), 0, n - 1).astype(np.int64)
  src = src.ravel()
  vals = [m.ravel()[src] for m in maps]
  keep = np.flatnonzero(vals[0].astype(np.int16) + vals[1] + vals[2] > 12)
  xyz = np.stack(np.unravel_index(keep, sub)) + lo[:, None]
  flat = np.ravel_multi_index(xyz, shape)
  return _Brain(shape, flat, xyz, [v[keep].astype(np.float32) / 255 for v in vals])


def _blob(brain: _Brain, center, radii, rng, roughness=0.25, candidates=None):
  """Irregular ellipsoid around `center`: (indices into brain voxels, distance d).

  d < 1 is inside; the surface is perturbed by a smooth random field.
  """
  r = np.asarray(radii, float)
  xyz = brain.xyz
  near = np.ones(xyz.shape[1], bool) if candidates is None else candidates.copy()
  for a in range(3):
    near &= np.abs(xyz[a] - center[a]) < 1.6 * r[a] + 1
  idx = np.flatnonzero(near)
  d = np.sqrt(sum(((xyz[a, idx] - center[a]) / r[a]) ** 2 for a in range(3)))
  d = d * (1 + _smooth_field(rng, brain.shape, roughness, 4, 1.5 * max(brain.shape) / (4 * r.mean()),
                             at=xyz[:, idx]))
  return idx, d


def _tissue(b: _Brain, rng, gm, wm, csf):
  v = rng.normal(1, 0.04, 3).astype(np.float32)
  return b.gm * (gm * v[0]) + b.wm * (wm * v[1]) + b.csf * (csf * v[2])


def _finish(b: _Brain, img, rng, noise=0.025):
  """Bias field, template texture and noise; values for the brain voxels."""
  bias = np.exp(_smooth_field(rng, b.shape, 0.15, terms=3, max_freq=1.0, at=b.xyz))
  # Texture from the template T1 (deep nuclei, cortical ribbon detail).
  img = img * bias * (0.85 + 0.3 * b.t1)
  img = img + rng.normal(0, noise, img.shape).astype(np.float32)
  return np.maximum(img, 0)


def _random_voxel(rng, b: _Brain, mask):
  idx = np.flatnonzero(mask)
  return b.xyz[:, idx[rng.integers(len(idx))]].astype(float)


def _central(b: _Brain, frac):
  """Voxels within `frac` of the brain's half-extent from its centre."""
  c = b.xyz.mean(1, keepdims=True)
  half = (b.xyz.max(1, keepdims=True) - b.xyz.min(1, keepdims=True)) / 2
  return (((b.xyz - c) / (frac * half)) ** 2).sum(0) < 1


def _ukb_subject(rng, b: _Brain, vox):
  t1 = _tissue(b, rng, 0.62, 1.0, 0.18)
  flair = _tissue(b, rng, 0.78, 0.58, 0.06)
  # A few periventricular white-matter hyperintensities on FLAIR: WM voxels
  # bordering the (central) ventricles.
  near_vent = (b.wm > 0.3) & (b.csf > 0.15) & _central(b, 0.35)
  if near_vent.any():
    for _ in range(rng.integers(0, 4)):
      idx, d = _blob(b, _random_voxel(rng, b, near_vent), rng.uniform(2, 5, 3) / vox, rng)
      m = np.clip((1 - d) * 3, 0, 1) * b.wm[idx]
      flair[idx] = flair[idx] * (1 - m) + 1.25 * m
  return 800 * _finish(b, t1, rng), 600 * _finish(b, flair, rng)


def _brats_subject(rng, b: _Brain, vox):
  brain = (b.gm + b.wm + b.csf) > 0.5
  center = _random_voxel(rng, b, (b.wm > 0.6) & _central(b, 0.7))
  r_core = rng.uniform(6, 15, 3) / vox
  r_ed = r_core * rng.uniform(1.3, 1.9)
  idx, d_ed = _blob(b, center, r_ed, rng, roughness=0.35, candidates=brain)
  sub = b.xyz[:, idx]
  d_core = np.sqrt(sum(((sub[a] - center[a]) / r_core[a]) ** 2 for a in range(3)))
  d_core = d_core * (1 + _smooth_field(rng, b.shape, 0.25, 4, 1.5, at=sub))
  necrosis_frac = rng.uniform(0.35, 0.65)
  lab = np.zeros(len(idx), np.uint8)
  lab[d_ed < 1] = 2
  lab[d_core < 1] = 4
  lab[d_core < necrosis_frac] = 1
  seg = np.zeros(len(b.flat), np.uint8)
  seg[idx] = lab
  # Per-modality [necrosis, enhancing] intensity relative to WM, and the
  # oedema factor applied to the underlying tissue (anatomy shows through).
  lesion = {"flair": (0.9, 1.1, 1.7), "t1ce": (0.25, 1.6, 0.8),
            "t1": (0.3, 0.75, 0.8), "t2": (1.4, 0.9, 1.8)}
  tissue = {"flair": (0.78, 0.58, 0.06), "t1ce": (0.62, 1.0, 0.2),
            "t1": (0.62, 1.0, 0.18), "t2": (0.6, 0.4, 1.0)}
  out = {}
  for name in ("flair", "t1ce", "t1", "t2"):
    img = _tissue(b, rng, *tissue[name])
    necrosis, enhancing, oedema = lesion[name]
    img[seg == 2] *= oedema * rng.normal(1, 0.03)
    img[seg == 1] = necrosis * rng.normal(1, 0.03)
    img[seg == 4] = enhancing * rng.normal(1, 0.03)
    out[name] = b.volume(np.round(1000 * _finish(b, img, rng)), np.int16)
  return out, b.volume(seg, np.uint8)


def _atlas_subject(rng, b: _Brain, vox, affine):
  (x, y, z), radius = _STROKE_SITES[rng.integers(len(_STROKE_SITES))]
  world = np.array([x * rng.choice([-1, 1]), y, z, 1.0]) + np.r_[rng.normal(0, 3, 3), 0]
  center = (np.linalg.inv(affine) @ world)[:3]
  parenchyma = (b.gm + b.wm) > 0.3
  idx, d = _blob(b, center, radius * rng.uniform(0.7, 1.3, 3) / vox, rng, 0.3, parenchyma)
  idx = idx[d < 1]
  if not len(idx):  # deformation moved the site out of the brain: a small WM blob
    idx, d = _blob(b, _random_voxel(rng, b, b.wm > 0.6), np.full(3, 4 / vox), rng)
    idx = idx[d < 1]
  mask = np.zeros(len(b.flat), np.uint8)
  mask[idx] = 1
  t1 = _tissue(b, rng, 0.62, 1.0, 0.18)
  # Chronic infarct: CSF-like cavity, hypointense on T1.
  t1[idx] = 0.22 * rng.normal(1, 0.05)
  return b.volume(100 * _finish(b, t1, rng)), b.volume(mask, np.uint8)


def _subject(out, dataset, index, seed, small):
  """Generates and writes one subject; returns {name: path}."""
  rng = np.random.default_rng([seed, _DATASET_CODE[dataset], index])
  shape, affine = _grid(dataset, small)
  vox = SMALL_FACTOR if small else 1
  brain = _deform(rng, dataset, small)
  if dataset == "ukb":
    eid = 1000001 + index
    flip_x = np.diag([-1.0, 1, 1, 1])
    flip_x[0, 3] = shape[0] - 1
    las = affine @ flip_x  # FSL stores MNI152 images left-to-right flipped (LAS)
    t1, flair = (brain.volume(v) for v in _ukb_subject(rng, brain, vox))
    paths = {"t1": os.path.join(out, f"{eid}_20252_2_0", "T1", "T1_brain_to_MNI.nii.gz"),
             "flair": os.path.join(out, f"{eid}_20253_2_0", "T2_FLAIR", "T2_FLAIR_brain_to_MNI.nii.gz")}
    io.write_volume(paths["t1"], t1[::-1], las)
    io.write_volume(paths["flair"], flair[::-1], las)
    return paths
  if dataset == "brats":
    sid = f"BraTS2021_{index:05d}"
    flip_xy = np.diag([-1.0, -1, 1, 1])
    flip_xy[:2, 3] = [shape[0] - 1, shape[1] - 1]
    lps = affine @ flip_xy
    images, seg = _brats_subject(rng, brain, vox)
    folder = os.path.join(out, "TrainingData", sid)
    paths = {}
    for name, img in list(images.items()) + [("seg", seg)]:
      paths[name] = io.write_volume(os.path.join(folder, f"{sid}_{name}.nii.gz"),
                                    img[::-1, ::-1], lps, dtype=img.dtype)
    return paths
  sub, ses = f"sub-r001s{index + 1:03d}", "ses-1"
  folder = os.path.join(out, "Training", "R001", sub, ses, "anat")
  stem = os.path.join(folder, f"{sub}_{ses}_space-MNI152NLin2009aSym")
  t1, mask = _atlas_subject(rng, brain, vox, affine)
  return {"t1": io.write_volume(stem + "_T1w.nii.gz", t1, affine),
          "label": io.write_volume(stem + "_label-L_desc-T1lesion_mask.nii.gz", mask,
                                   affine, dtype=np.uint8)}


def _write_json(path, data):
  with open(path, "w") as f:
    json.dump(data, f, indent=1)
  return path


def write_demo_cohort(out: str, subjects: int = DEFAULT_SUBJECTS, seed: int = 0,
                      small: bool = False, workers: int = 0,
                      datasets=("ukb", "brats", "atlas")) -> dict:
  """Writes the three demo datasets under `out`.

  Args:
    out: output folder (created).
    subjects: subjects per dataset.
    seed: cohort seed.
    small: downsample grids by 3 for fast tests.
    workers: generator processes (0: min(2, cpus); 1: in this process).
    datasets: which of "ukb", "brats", "atlas" to write.

  Returns:
    {"ukb": {"root", "datalist", "subjects": [paths]}, "brats": {"root",
    "datalist", ...}, "atlas": {"root", "subjects"}} for the written datasets.
  """
  if subjects < 1:
    raise ValueError(f"subjects={subjects}; need at least 1")
  unknown = set(datasets) - set(_DATASET_CODE)
  if unknown:
    raise ValueError(f"datasets {sorted(unknown)} unknown; choose from {tuple(_DATASET_CODE)}")
  roots = {d: os.path.join(out, d) for d in datasets}
  jobs = [(d, i) for d in datasets for i in range(subjects)]
  workers = workers or min(2, os.cpu_count() or 1)
  for d in datasets:  # Built once here; forked workers inherit the cache.
    _maps_on_grid(d, small)
  if workers == 1:
    results = [_subject(roots[d], d, i, seed, small) for d, i in jobs]
  else:
    # Forked workers inherit the template cache built above, but forking a
    # process that runs JAX threads can deadlock: spawn in that case.
    ctx = multiprocessing.get_context("spawn" if "jax" in sys.modules else "fork")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
      results = list(pool.map(_subject, [roots[d] for d, _ in jobs], *zip(*jobs),
                              [seed] * len(jobs), [small] * len(jobs)))
  by = {d: [r for (dd, _), r in zip(jobs, results) if dd == d] for d in datasets}
  rel = lambda p, d: os.path.relpath(p, roots[d])
  out_paths = {d: {"root": roots[d], "subjects": by[d]} for d in datasets}
  if "ukb" in datasets:
    ukb = [{"image": [rel(s["t1"], "ukb"), rel(s["flair"], "ukb")]} for s in by["ukb"]]
    n_val = max(1, subjects // 5) if subjects > 1 else 0
    out_paths["ukb"]["datalist"] = _write_json(
        os.path.join(roots["ukb"], "ukb_datalist.json"),
        {"training": ukb[:subjects - n_val], "validation": ukb[subjects - n_val:]})
  if "brats" in datasets:
    folds = np.random.default_rng([seed, 99]).permutation(subjects) % 5
    brats = [{"fold": int(k), "label": rel(s["seg"], "brats"),
              "image": [rel(s[m], "brats") for m in ("flair", "t1ce", "t1", "t2")]}
             for k, s in zip(folds, by["brats"])]
    out_paths["brats"]["datalist"] = _write_json(
        os.path.join(roots["brats"], "brats21_folds.json"), {"training": brats})
  if "atlas" in datasets:
    _write_json(os.path.join(roots["atlas"], "Training", "dataset_description.json"),
                {"Name": "bsf_jax demo ATLAS-like cohort", "BIDSVersion": "1.6.0"})
  return out_paths


def main(argv=None) -> int:
  """The command line (module docstring); argv: the words after the program name."""
  tool_flags.parse(FLAGS, argv)
  datasets = tuple(FLAGS.datasets.split(","))
  t0 = time.time()
  paths = write_demo_cohort(FLAGS.out, FLAGS.subjects, FLAGS.seed, FLAGS.small, FLAGS.workers,
                            datasets)
  print(f"wrote {len(datasets) * FLAGS.subjects} subjects to {FLAGS.out} in "
        f"{time.time() - t0:.1f}s: " + ", ".join(p.get("datalist", p["root"]) for p in paths.values()))
  return 0


if __name__ == "__main__":
  tool_flags.run(main)
