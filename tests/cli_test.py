"""The three stage-3 CLIs, run as subprocesses on one tiny fine-tuned run.

`python -m bsf_jax.predict`, `python -m bsf_jax.evaluate` and
`python -m bsf_jax.report` on a SwinUNETR (feature 12, depths 1, roi 32^3)
fine-tuned for 2 steps on the small demo BraTS cohort. The run is trained once
per module (no dependence on other test files); every subprocess pays a JAX
start-up and a compile, so each case is one CLI call.
"""

import csv
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bsf_jax.run import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODALITIES = ("flair", "t1ce", "t1", "t2")  # the BraTS contract order
DICE_COLUMNS = ("dice_TC", "dice_WT", "dice_ET", "dice_mean")


def _cli(module, *args, timeout=600):
  return subprocess.run([sys.executable, "-m", module, *map(str, args)],
                        cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


def _files(subject_dir):
  name = os.path.basename(subject_dir)
  return [os.path.join(subject_dir, f"{name}_{m}.nii.gz") for m in MODALITIES]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  from bsf_jax.data import demo
  out = str(tmp_path_factory.mktemp("cli_cohort"))
  return demo.write_demo_cohort(out, subjects=5, seed=0, small=True,
                                datasets=("brats",))["brats"]


@pytest.fixture(scope="module")
def run(cohort, tmp_path_factory):
  """A stage-3 BraTS run, 2 steps from scratch, as main_test trains it."""
  from bsf_jax.trainers import finetune
  config = config_lib.load_file(
      os.path.join(ROOT, "configs", "stage3.py"), "dataset=brats2021,runlocal=True")
  config.data.datalist = cohort["datalist"]
  config.data.root = cohort["root"]
  config.data.roi = (32, 32, 32)
  config.data.workers = 0
  config.data.num_samples = 1
  config.mesh.num_devices = 1
  config.model.update(feature_size=12, depths=(1, 1, 1, 1),
                      num_heads=(1, 1, 1, 1))
  config.train.num_steps = 2
  config.train.eval_every = 0
  config.train.ckpt_every = 2
  workdir = str(tmp_path_factory.mktemp("cli_run") / "s3")
  finetune.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def evaluated(run):
  result = _cli("bsf_jax.evaluate", f"--workdir={run}")
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_predict_subject_dir_and_datalist(cohort, run, tmp_path):
  import nibabel as nib
  from nibabel import orientations

  subjects = sorted(os.path.dirname(s["flair"]) for s in cohort["subjects"])
  one, other = subjects[0], subjects[1]
  # A RAS copy of `one` (the demo, like BraTS, is stored LPS): its prediction
  # must be `one`'s, written in the copy's own orientation.
  ras_dir = tmp_path / "RAScopy_00000"
  ras_dir.mkdir()
  for f in _files(one):
    img = nib.load(f)
    nib.save(nib.as_closest_canonical(img), str(
        ras_dir / os.path.basename(f).replace(os.path.basename(one),
                                              "RAScopy_00000")))
  datalist = tmp_path / "to_segment.json"
  datalist.write_text(json.dumps({"test": [
      {"image": [os.path.relpath(f, tmp_path) for f in _files(other)]},
      {"image": [os.path.relpath(f, tmp_path) for f in _files(str(ras_dir))]},
  ]}))

  out_dir = tmp_path / "preds_dir"
  result = _cli("bsf_jax.predict", "--checkpoint", run, "--input", one,
                "--output", out_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "1 subject(s)" in result.stdout and "[1/1]" in result.stdout

  out_list = tmp_path / "preds_list"
  result = _cli("bsf_jax.predict", "--checkpoint", run, "--input", datalist,
                "--output", out_list)
  assert result.returncode == 0, result.stderr[-3000:]
  # Progress over the subjects, with an ETA.
  for i, name in ((1, os.path.basename(other)), (2, "RAScopy_00000")):
    assert re.search(rf"\[{i}/2\] \S+{name}_pred\.nii\.gz\s+\(\d+s, eta \d+s\)",
                     result.stdout), result.stdout

  outputs = {
      os.path.join(out_dir, os.path.basename(one) + "_pred.nii.gz"): one,
      os.path.join(out_list, os.path.basename(other) + "_pred.nii.gz"): other,
      os.path.join(out_list, "RAScopy_00000_pred.nii.gz"): str(ras_dir),
  }
  assert sorted(glob.glob(os.path.join(out_dir, "*"))
                + glob.glob(os.path.join(out_list, "*"))) == sorted(outputs)
  labels = {}
  for pred_path, subject in outputs.items():
    pred = nib.load(pred_path)
    ref = nib.load(_files(subject)[0])
    assert pred.shape == ref.shape
    np.testing.assert_array_equal(pred.affine, ref.affine)
    np.testing.assert_array_equal(pred.header.get_zooms(),
                                  ref.header.get_zooms())
    assert pred.get_data_dtype() == np.uint8
    data = np.asarray(pred.dataobj)
    assert set(np.unique(data).tolist()) <= {0, 1, 2, 4}
    labels[subject] = (data, pred.affine)
  # The RAS copy's prediction, brought back to LPS, is the original's.
  ras_labels, ras_affine = labels[str(ras_dir)]
  lps_labels, lps_affine = labels[one]
  back = orientations.apply_orientation(ras_labels, orientations.ornt_transform(
      orientations.io_orientation(ras_affine),
      orientations.io_orientation(lps_affine)))
  np.testing.assert_array_equal(back, lps_labels)


def test_predict_rejects_inputs_off_the_contract(cohort, run, tmp_path):
  subject = os.path.dirname(cohort["subjects"][2]["flair"])
  # A subject without its t1ce: the error names the missing modality.
  missing = tmp_path / os.path.basename(subject)
  shutil.copytree(subject, missing)
  os.remove(missing / f"{os.path.basename(subject)}_t1ce.nii.gz")
  out = tmp_path / "preds"
  result = _cli("bsf_jax.predict", "--checkpoint", run, "--input", missing,
                "--output", out)
  assert result.returncode != 0
  assert "error:" in result.stderr and "'t1ce'" in result.stderr, (
      result.stderr[-3000:])
  assert "['flair', 't1ce', 't1', 't2']" in result.stderr
  assert not glob.glob(os.path.join(out, "*.nii*"))

  # Explicit files with t1 and t1ce swapped: the wrong channel order is an
  # error, not a silent Dice ~0.
  files = _files(subject)
  files[1], files[2] = files[2], files[1]
  result = _cli("bsf_jax.predict", "--checkpoint", run, "--input",
                ",".join(files), "--output", out)
  assert result.returncode != 0
  assert re.search(r"looks like 't1' but is in the position of 't1ce'",
                   result.stderr), result.stderr[-3000:]
  assert not glob.glob(os.path.join(out, "*.nii*"))

  # Two subjects whose outputs would share a name (same file names in two
  # folders): refused before anything is written, naming both inputs.
  for copy in ("site_a", "site_b"):
    shutil.copytree(subject, tmp_path / copy / os.path.basename(subject))
  clash = tmp_path / "clash.json"
  clash.write_text(json.dumps({"test": [
      {"image": _files(str(tmp_path / copy / os.path.basename(subject)))}
      for copy in ("site_a", "site_b")]}))
  result = _cli("bsf_jax.predict", "--checkpoint", run, "--input", clash,
                "--output", out)
  assert result.returncode != 0
  assert "would both be written to" in result.stderr, result.stderr[-3000:]
  assert "site_a" in result.stderr and "site_b" in result.stderr
  assert not glob.glob(os.path.join(out, "*.nii*"))


def _step_metas(run_dir):
  return sorted(glob.glob(
      os.path.join(run_dir, "checkpoints", "[0-9]*", "meta", "metadata")))


def test_inference_settings_recorded_then_overridden(run):
  from bsf_jax import predict
  defaults = config_lib.seg_config()
  metas = _step_metas(run)
  assert metas, os.listdir(run)
  for path in metas:
    with open(path) as f:
      recorded = json.load(f)["inference"]
    assert recorded == {"threshold": defaults.threshold,
                        "sw_overlap": defaults.sw_overlap,
                        "sw_batch_size": defaults.sw_batch_size,
                        "sw_mode": defaults.sw_mode}, path

  meta = {"inference": {"threshold": 0.3, "sw_overlap": 0.25,
                        "sw_batch_size": 2, "sw_mode": "gaussian"}}
  settings, source = predict.resolve_inference_settings(meta, {})
  assert settings == meta["inference"] and source == "checkpoint"
  settings, source = predict.resolve_inference_settings(
      meta, {"threshold": 0.7, "sw_overlap": None, "sw_batch_size": 1})
  assert settings == {"threshold": 0.7, "sw_overlap": 0.25,
                      "sw_batch_size": 1, "sw_mode": "gaussian"}
  assert source == "checkpoint + flags sw_batch_size, threshold"
  # A checkpoint from before the settings were recorded: the defaults, said so.
  settings, source = predict.resolve_inference_settings({"contract": {}}, {})
  assert settings["threshold"] == defaults.threshold
  assert source.startswith("defaults")
  with pytest.raises(ValueError,
                     match=r"threshold must be in \[0, 1\], got 1.5"):
    predict.resolve_inference_settings(meta, {"threshold": 1.5})


def test_predict_uses_the_recorded_threshold(cohort, run, tmp_path):
  # A copy of the run whose checkpoints record threshold 0: every voxel is
  # then >= threshold in all three channels, so the label map is all ET (4).
  # With the default 0.5 this untrained model gives a mix of labels.
  copy = tmp_path / "run_t0"
  shutil.copytree(run, copy)
  for path in _step_metas(copy):
    with open(path) as f:
      meta = json.load(f)
    meta["inference"]["threshold"] = 0.0
    with open(path, "w") as f:
      json.dump(meta, f)
  subject = os.path.dirname(cohort["subjects"][3]["flair"])
  out = tmp_path / "preds"
  result = _cli("bsf_jax.predict", "--checkpoint", copy, "--input", subject,
                "--output", out)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "threshold=0.0" in result.stdout and "(checkpoint)" in result.stdout
  import nibabel as nib
  (pred_path,) = glob.glob(os.path.join(out, "*_pred.nii.gz"))
  assert np.all(np.asarray(nib.load(pred_path).dataobj) == 4)


def _number(cell):
  return float(cell.split(" ± ")[0])


def test_evaluate_writes_table_and_figure(run, evaluated):
  for ext in ("md", "csv", "json", "png"):
    path = os.path.join(run, f"evaluation.{ext}")
    assert os.path.getsize(path) > 0, path
  with open(os.path.join(run, "evaluation.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"

  with open(os.path.join(run, "evaluation.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  assert set(DICE_COLUMNS) <= set(rows[0])
  assert [r["volume"] for r in rows][-1] == "mean" and len(rows) >= 2
  for r in rows:
    for c in DICE_COLUMNS:
      v = float(r[c])
      assert np.isnan(v) or 0.0 <= v <= 1.0, (r, c)
  mean_row = rows[-1]
  assert np.isfinite(float(mean_row["dice_mean"]))

  # The markdown table (also printed) has the same columns and numbers.
  with open(os.path.join(run, "evaluation.md")) as f:
    md = f.read()
  assert md.strip() in evaluated.stdout
  header = next(l for l in md.splitlines() if l.startswith("| volume"))
  cols = [c.strip() for c in header.strip("|").split("|")]
  assert cols[0] == "volume" and set(DICE_COLUMNS) <= set(cols)
  mean_md = next(l for l in md.splitlines() if l.startswith("| mean"))
  cells = dict(zip(cols, (c.strip() for c in mean_md.strip("|").split("|"))))
  for c in DICE_COLUMNS:
    assert float(cells[c]) == pytest.approx(float(mean_row[c]), abs=1e-4)

  with open(os.path.join(run, "evaluation.json")) as f:
    result = json.load(f)
  assert result["step"] == 2 and len(result["volumes"]) == len(rows) - 1
  assert result["mean"]["dice_mean"] == pytest.approx(
      float(mean_row["dice_mean"]))


def test_report_collects_runs(run, evaluated, tmp_path):
  # A second run of another protocol (few-shot fraction 0.1): report only
  # reads config.json and evaluation.json.
  few = tmp_path / "s3_fewshot"
  few.mkdir()
  with open(os.path.join(run, "config.json")) as f:
    config = json.load(f)
  config["data"]["fraction"] = 0.1
  (few / "config.json").write_text(json.dumps(config))
  shutil.copy(os.path.join(run, "evaluation.json"), few / "evaluation.json")
  with open(os.path.join(run, "evaluation.json")) as f:
    mean = json.load(f)["mean"]

  out_csv = tmp_path / "runs.csv"
  result = _cli("bsf_jax.report", run, few, "--csv", out_csv, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [l for l in result.stdout.splitlines() if l.startswith("|")]
  cols = [c.strip() for c in lines[0].strip("|").split("|")]
  assert cols[:5] == ["depths", "modalities", "fraction", "init", "n"]
  assert set(DICE_COLUMNS) <= set(cols)
  body = [dict(zip(cols, (c.strip() for c in l.strip("|").split("|"))))
          for l in lines[2:]]
  assert sorted(r["fraction"] for r in body) == ["0.1", "1"]
  for r in body:
    assert r["depths"] == "1-1-1-1" and r["n"] == "1"
    assert r["modalities"] == "+".join(MODALITIES)
    assert r["init"] == "scratch"
    for c in DICE_COLUMNS:
      assert _number(r[c]) == pytest.approx(mean[c], abs=1e-4)
      assert r[c].endswith("± 0.0000")  # one run per group
  with open(out_csv, newline="") as f:
    per_run = list(csv.DictReader(f))
  assert [r["run"] for r in per_run] == [run, str(few)]
  assert float(per_run[0]["dice_mean"]) == pytest.approx(mean["dice_mean"])

  # A run that was never evaluated: a clear error, not a traceback.
  result = _cli("bsf_jax.report", run, tmp_path, timeout=120)
  assert result.returncode == 1
  assert "evaluation.json" in result.stderr and "bsf_jax.evaluate" in (
      result.stderr)


def test_predict_and_evaluate_import_nothing_from_the_trainers():
  # Inference tools stand below training: predicting on a new subject must
  # not pull in (or break with) trainer code.
  code = ("import sys, bsf_jax.predict, bsf_jax.evaluate, bsf_jax.export; "
          "print(sorted(m for m in sys.modules if m.startswith('bsf_jax.trainers')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True, cwd=ROOT)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr
