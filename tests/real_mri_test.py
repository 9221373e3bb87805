"""Real scans end to end: BraTS 2018 case in the 2021 and 2023+ layouts, MS T1+FLAIR in UKB's.

The scans live outside the repo, in ../shared/real-mri (provenance and
licences in its README); they are read by path and never copied into the
repo. The 2023+ copy of the BraTS case (BraTS-GLI-* names, ET 4 -> 3) and the
UKB layout of the MS patient are made in a temp dir: links to the real files,
except the relabelled segmentation. `data.check` reads the whole real volumes;
training, `predict` and `evaluate` run on a 48^3 crop around the tumour (its
own LPS affine) with a tiny model and a 32^3 roi, so the module stays cheap
(the whole 240x240x155 volume is 320 windows at overlap 0, ~18 s of CPU
compute plus its own compile, measured on the 2-core machine).
"""

import io
import json
import os

import numpy as np
import pytest

from bsf_jax.run import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.path.join(os.path.dirname(ROOT), "shared", "real-mri")
CASE = "Brats18_TCIA05_396_1"
CASE_DIR = os.path.join(REAL, CASE)
MS_DIR = os.path.join(REAL, "ms_patient19")
CASE23 = "BraTS-GLI-00396-001"
# 2018-2021 suffix -> 2023+ suffix.
RENAME = {"flair": "t2f", "t1ce": "t1c", "t1": "t1n", "t2": "t2w", "seg": "seg"}

if not (os.path.isdir(CASE_DIR) and os.path.isdir(MS_DIR)):
  pytest.skip(f"real scans not found at {REAL} (this test reads the BraTS 2018 case "
              f"{CASE} and ms_patient19 from there)", allow_module_level=True)

nib = pytest.importorskip("nibabel")


def _link_2023(out_dir, case_dir=CASE_DIR):
  """A copy of the case in the BraTS 2023+ layout: renamed links, seg ET 4 -> 3."""
  subject = os.path.join(out_dir, CASE23)
  os.makedirs(subject)
  for old, new in RENAME.items():
    src = os.path.join(case_dir, f"{CASE}_{old}.nii.gz")
    dst = os.path.join(subject, f"{CASE23}-{new}.nii.gz")
    if old == "seg":
      img = nib.load(src)
      seg = np.asarray(img.dataobj)
      nib.save(nib.Nifti1Image(np.where(seg == 4, 3, seg).astype(seg.dtype),
                               img.affine, img.header), dst)
    else:
      os.symlink(src, dst)
  return subject


@pytest.fixture(scope="module")
def case23(tmp_path_factory):
  return _link_2023(str(tmp_path_factory.mktemp("brats23")))


def test_check_accepts_both_layouts_and_the_scan_maps_2023_names(case23):
  from bsf_jax.data import check, datalists
  for root in (CASE_DIR, os.path.dirname(case23)):
    out = io.StringIO()
    assert check.run_check("", root, dataset="brats", out=out) == 0, out.getvalue()
    assert "checked 1 records (5 files)" in out.getvalue()
  # The 2023 copy read with the 2021 convention: label 3 is named.
  out = io.StringIO()
  assert check.run_check("", os.path.dirname(case23), dataset="brats",
                         label_format="brats2021", out=out) == 1
  assert f"{CASE23}-seg.nii.gz: label values [3]" in out.getvalue()
  assert "use label_format brats2023" in out.getvalue()
  (rec,) = datalists.brats_scan(os.path.dirname(case23))
  assert [os.path.basename(p) for p in rec["image"]] == [
      f"{CASE23}-{s}.nii.gz" for s in ("t2f", "t1c", "t1n", "t2w")]


def _tumour_crop(out_dir, size=48):
  """The real case cut to `size`^3 around the tumour core (affines kept right)."""
  seg = nib.load(os.path.join(CASE_DIR, f"{CASE}_seg.nii.gz"))
  core = np.argwhere(np.isin(np.asarray(seg.dataobj), (1, 4)))
  lo = np.clip(core.mean(0).astype(int) - size // 2, 0, np.array(seg.shape) - size)
  box = tuple(slice(int(a), int(a) + size) for a in lo)
  subject = os.path.join(out_dir, CASE)
  os.makedirs(subject)
  for suffix in RENAME:
    img = nib.load(os.path.join(CASE_DIR, f"{CASE}_{suffix}.nii.gz"))
    nib.save(img.slicer[box], os.path.join(subject, f"{CASE}_{suffix}.nii.gz"))
  return subject


def _losses(workdir):
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={"scalars": 0})
  acc.Reload()
  return [e.value for e in acc.Scalars("train_loss")]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
  """Stage 3 (BraTS 2021 labels) overfitting the real case's tumour crop."""
  from bsf_jax.trainers import finetune
  tmp = tmp_path_factory.mktemp("real_s3")
  subject = _tumour_crop(str(tmp))
  rec = {"image": [os.path.join(subject, f"{CASE}_{m}.nii.gz")
                   for m in ("flair", "t1ce", "t1", "t2")],
         "label": os.path.join(subject, f"{CASE}_seg.nii.gz")}
  # Fold 1 trains, fold 0 (the same crop) validates.
  datalist = tmp / "folds.json"
  datalist.write_text(json.dumps({"training": [{**rec, "fold": 0}, {**rec, "fold": 1}]}))
  config = config_lib.load_file(os.path.join(ROOT, "configs", "stage3.py"),
                                "dataset=brats2021,runlocal=True")
  config.data.update(datalist=str(datalist), roi=(32, 32, 32), augment=False,
                     batch_size=2, num_samples=1)
  config.mesh.num_devices = 1
  config.model.num_heads = (1, 1, 1, 1)
  config.optim.update(lr=3e-3, warmup_steps=1)
  config.train.update(num_steps=20, log_every=1, eval_every=0, ckpt_every=30,
                      eval_batches=1)
  workdir = str(tmp / "s3")
  finetune.train_and_evaluate(config, workdir)
  return workdir, subject


def test_stage3_overfits_the_real_tumour(finetuned):
  losses = _losses(finetuned[0])
  assert len(losses) == 20 and np.isfinite(losses).all()
  first, last = np.mean(losses[:5]), np.mean(losses[-5:])
  assert last < first - 0.05, (first, last)


def test_predict_real_2023_named_case(finetuned, tmp_path, capsys):
  from bsf_jax.weights import prediction
  workdir, crop = finetuned
  case23 = _link_2023(str(tmp_path), crop)
  out = tmp_path / "out"
  # The run's own sliding-window settings, as validation used them.
  prediction.predict_subjects(workdir, case23, str(out), "latest")
  printed = capsys.readouterr().out
  # A 2021-trained checkpoint says which convention it wrote, and notes
  # the 2023-named input.
  assert "labels: 1 NCR, 2 ED, 4 ET, convention brats2021" in printed
  assert "have BraTS 2023+ file names" in printed
  ref = nib.load(os.path.join(case23, f"{CASE23}-t2f.nii.gz"))
  img = nib.load(out / f"{CASE23}_pred.nii.gz")
  assert img.shape == ref.shape == (48, 48, 48)
  np.testing.assert_allclose(img.affine, ref.affine)
  assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
  pred = np.asarray(img.dataobj)
  assert set(np.unique(pred)) <= {0, 1, 2, 4} and pred.any()
  # The overfit tumour is found, in the file's own LPS grid.
  seg = np.asarray(nib.load(os.path.join(case23, f"{CASE23}-seg.nii.gz")).dataobj)
  assert (pred[seg > 0] > 0).mean() > 0.5
  # The contract's convention, or another with the same regions on request.
  from bsf_jax.run.checkpoint_reads import restore_params
  meta = restore_params(workdir, "latest")[1]
  assert meta["contract"]["labels"]["values"] == {"1": "NCR", "2": "ED", "4": "ET"}
  conv, source = prediction.output_convention(meta["contract"], "brats2023")
  assert conv.name == "brats2023" and "trained on brats2021" in source
  with pytest.raises(ValueError, match="regions"):
    prediction.output_convention(meta["contract"], "atlas")


def test_evaluate_brats2023_convention_on_the_real_crop(finetuned, tmp_path):
  from bsf_jax.weights import evaluation
  workdir = finetuned[0]
  config = config_lib.load_run_config(workdir)
  table = evaluation.evaluate_run(workdir, config, str(tmp_path), "latest",
                                convention="brats2023")
  assert "scored with the brats2023 convention" in table.splitlines()[0]
  with open(tmp_path / "evaluation.json") as f:
    result = json.load(f)
  assert result["convention"] == "brats2023"
  row = result["volumes"][0]
  for region in ("TC", "WT", "ET"):
    for metric in ("dice", "hd95", "lesion_dice", "lesion_hd95", "tp", "fp", "fn"):
      assert np.isfinite(row[f"{metric}_{region}"]), (metric, region)
    assert 0 <= row[f"lesion_dice_{region}"] <= 1
    assert 0 <= row[f"lesion_hd95_{region}"] <= 373
  assert row["dice_mean"] == pytest.approx(
      np.mean([row[f"lesion_dice_{r}"] for r in ("TC", "WT", "ET")]))


def test_stage1_reads_real_t1_flair_in_ukb_layout(tmp_path):
  from bsf_jax.data import datalists
  from bsf_jax.trainers import pretrain
  root = tmp_path / "ukb"
  for eid in ("1000001", "1000002"):  # two subjects: one trains, one validates
    for field, rel, src in (("20252", datalists.UKB_T1, "T1"),
                            ("20253", datalists.UKB_FLAIR, "FLAIR")):
      dst = root / f"{eid}_{field}_2_0" / rel
      dst.parent.mkdir(parents=True)
      os.symlink(os.path.join(MS_DIR, f"patient19_{src}_MNI.nii.gz"), dst)
  config = config_lib.load_file(os.path.join(ROOT, "configs", "stage1.py"),
                                "runlocal=True")
  config.data.update(root=str(root), datalist="")
  config.mesh.num_devices = 1
  config.train.update(num_steps=2, log_every=1, eval_every=0, ckpt_every=2,
                      eval_batches=1)
  train, val = datalists.load_datalist(config.data)
  assert len(train) == len(val) == 1
  assert [os.path.basename(p) for p in train[0]["image"]] == [
      "T1_brain_to_MNI.nii.gz", "T2_FLAIR_brain_to_MNI.nii.gz"]
  workdir = str(tmp_path / "s1")
  pretrain.train_and_evaluate(config, workdir)
  losses = _losses(workdir)
  assert len(losses) == 2 and np.isfinite(losses).all()
  from bsf_jax.run import checkpointing
  meta = checkpointing.read_meta(checkpointing.make_manager(workdir, read_only=True), 2)
  assert meta["contract"]["modalities"] == ["t1", "flair"]
