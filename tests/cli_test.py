"""The three stage-3 CLIs, run as subprocesses on one tiny fine-tuned run.

`python -m bsf_jax.predict`, `python -m bsf_jax.evaluate` and
`python -m bsf_jax.report` on a SwinUNETR (feature 12, depths 1, roi 32^3)
fine-tuned for 2 steps on the small demo BraTS cohort. The run is trained once
per module (no dependence on other test files); every subprocess pays a JAX
start-up and a compile, so each case is one CLI call. Ensembles use the run
twice (or a copy of it): the mean of equal predictions is the single one.
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
def single_prediction(cohort, run, tmp_path_factory):
  """`predict` of the first subject folder, with its probabilities."""
  one = sorted(os.path.dirname(s["flair"]) for s in cohort["subjects"])[0]
  out_dir = tmp_path_factory.mktemp("preds_dir")
  result = _cli("bsf_jax.predict", "--checkpoint", run, "--input", one,
                "--output", out_dir, "--save_probabilities")
  assert result.returncode == 0, result.stderr[-3000:]
  return one, out_dir, result


@pytest.fixture(scope="module")
def evaluated(run):
  result = _cli("bsf_jax.evaluate", f"--workdir={run}")
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_predict_subject_dir_and_datalist(cohort, run, single_prediction,
                                         tmp_path):
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

  assert single_prediction[0] == one
  out_dir, result = single_prediction[1:]
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
  assert sorted(glob.glob(os.path.join(out_dir, "*_pred.nii.gz"))
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

  from bsf_jax.weights import ensemble

  def member(meta, name="runs/a"):
    return ensemble.Member(name, 1, {}, meta)

  meta = {"inference": {"threshold": 0.3, "sw_overlap": 0.25,
                        "sw_batch_size": 2, "sw_mode": "gaussian"}}
  settings, source = ensemble.inference_settings([member(meta)], {})
  assert settings == meta["inference"] and source == "checkpoint"
  settings, source = ensemble.inference_settings(
      [member(meta)], {"threshold": 0.7, "sw_overlap": None, "sw_batch_size": 1})
  assert settings == {"threshold": 0.7, "sw_overlap": 0.25,
                      "sw_batch_size": 1, "sw_mode": "gaussian"}
  assert source == "checkpoint + flags sw_batch_size, threshold"
  # Metadata without the settings is refused, naming the checkpoint.
  with pytest.raises(ValueError, match=r"^runs/a: checkpoint metadata has no inference settings"):
    ensemble.inference_settings([member({"contract": {}})], {})
  with pytest.raises(ValueError,
                     match=r"threshold must be in \[0, 1\], got 1.5"):
    ensemble.inference_settings([member(meta)], {"threshold": 1.5})
  # An ensemble whose checkpoints validated with other thresholds: refused,
  # naming both and the flag that settles it; the flag does.
  other = {"inference": {**meta["inference"], "threshold": 0.4}}
  with pytest.raises(ValueError, match=r"^runs/a and runs/b differ in inference "
                     r"setting threshold: 0.3 vs 0.4; choose one with --threshold$"):
    ensemble.inference_settings([member(meta), member(other, "runs/b")], {})
  settings, _ = ensemble.inference_settings(
      [member(meta), member(other, "runs/b")], {"threshold": 0.5})
  assert settings["threshold"] == 0.5


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
  assert cols[:8] == ["depths", "modalities", "fraction", "init", "data",
                      "scoring", "inference", "n"]
  assert set(DICE_COLUMNS) <= set(cols)
  body = [dict(zip(cols, (c.strip() for c in l.strip("|").split("|"))))
          for l in lines[2:]]
  assert sorted(r["fraction"] for r in body) == ["0.1", "1"]
  for r in body:
    assert r["depths"] == "1-1-1-1" and r["n"] == "1"
    assert (r["data"], r["scoring"], r["inference"]) == (
        "validation split", "monai", "1 model")
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


def _prob_path(out_dir, subject):
  return os.path.join(out_dir, os.path.basename(subject) + "_prob.npz")


def test_saved_probabilities_reload_to_the_written_labels(run, single_prediction):
  import nibabel as nib
  from bsf_jax.infer import metrics
  from bsf_jax.weights import prediction
  one, out_dir, _ = single_prediction
  pred = nib.load(os.path.join(out_dir, os.path.basename(one) + "_pred.nii.gz"))
  with np.load(_prob_path(out_dir, one)) as raw:
    assert raw["probabilities"].dtype == np.float16
    assert raw["probabilities"].shape == (*pred.shape, 3)
  saved = prediction.load_probabilities(_prob_path(out_dir, one))
  # The input's own orientation and affine, like the labels beside them.
  np.testing.assert_array_equal(saved["affine"], pred.affine)
  assert saved["regions"] == ["TC", "WT", "ET"] and saved["threshold"] == 0.5
  assert saved["ensemble"]["checkpoints"] == [{"checkpoint": run, "step": 2}]
  probs = saved["probabilities"]
  assert 0 <= probs.min() and probs.max() <= 1
  labels = metrics.channels_to_labels(probs, saved["convention"],
                                      saved["threshold"])
  written = np.asarray(pred.dataobj)
  assert len(np.unique(written)) > 1  # the untrained model gives a mix
  np.testing.assert_array_equal(labels, written)


def test_saved_probabilities_keep_their_side_of_the_threshold():
  from bsf_jax.infer import metrics
  from bsf_jax.weights import prediction
  # float16 rounds 0.49998 up to 0.5 and 0.30001 down below 0.3.
  for t, values in ((0.5, [0.49998, 0.5, 0.50001, 0.2, 0.9]),
                    (0.3, [0.30001, 0.29999, 0.3, 0.1])):
    p = np.asarray(values, np.float32)
    half = prediction.to_float16(p, t)
    assert half.dtype == np.float16
    np.testing.assert_array_equal(metrics.binarize(half.astype(np.float32), t),
                                  metrics.binarize(p, t))
    np.testing.assert_allclose(half, p, atol=1e-3)


def test_ensemble_of_one_checkpoint_twice_is_the_single_prediction(
    run, single_prediction, tmp_path):
  from bsf_jax.weights import prediction
  one, single_dir, _ = single_prediction
  out = tmp_path / "ensemble"
  # `--checkpoint A B`: the words after the flag are checkpoints too.
  result = _cli("bsf_jax.predict", "--checkpoint", run, run, "--input", one,
                "--output", out, "--save_probabilities")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "ensemble: 2 checkpoints: 2 sliding-window passes per volume" in (
      result.stdout), result.stdout
  single = prediction.load_probabilities(_prob_path(single_dir, one))
  twice = prediction.load_probabilities(_prob_path(out, one))
  assert len(twice["ensemble"]["checkpoints"]) == 2
  # The mean of two equal predictions is the prediction; the float32 values
  # may differ in rounding (another program around the model), so the float16
  # files agree to one float16 step.
  np.testing.assert_allclose(twice["probabilities"], single["probabilities"],
                             rtol=0, atol=1e-3)
  import nibabel as nib
  name = os.path.basename(one) + "_pred.nii.gz"
  a = np.asarray(nib.load(os.path.join(single_dir, name)).dataobj)
  b = np.asarray(nib.load(os.path.join(out, name)).dataobj)
  # Labels agree wherever no channel is within rounding of the threshold.
  clear = (np.abs(single["probabilities"] - 0.5) > 1e-3).all(-1)
  assert clear.mean() > 0.9
  np.testing.assert_array_equal(a[clear], b[clear])


def _edit_contract(run_dir, dest, **changes):
  """A copy of the run whose checkpoints record another contract."""
  shutil.copytree(run_dir, dest)
  for path in _step_metas(dest):
    with open(path) as f:
      meta = json.load(f)
    meta["contract"].update(changes)
    with open(path, "w") as f:
      json.dump(meta, f)
  return str(dest)


def test_ensemble_refuses_mismatched_contracts(run, tmp_path):
  from bsf_jax.run import checkpointing
  from bsf_jax.weights import ensemble
  swapped = _edit_contract(run, tmp_path / "swapped",
                           modalities=["flair", "t1", "t1ce", "t2"])
  with pytest.raises(checkpointing.ContractError) as e:
    ensemble.load([run, swapped], "latest")
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(
      f"{run} and {swapped} differ in modalities: ['flair', 't1ce', 't1', 't2'] "
      "vs ['flair', 't1', 't1ce', 't2']"), message
  # A folder of fold runs (sorted by name), one trained at another roi.
  folds = tmp_path / "folds"
  folds.mkdir()
  shutil.copytree(run, folds / "fold0")
  _edit_contract(run, folds / "fold1", roi=[64, 64, 64])
  paths = ensemble.resolve_checkpoints([str(folds)])
  assert paths == [str(folds / "fold0"), str(folds / "fold1")]
  with pytest.raises(checkpointing.ContractError,
                     match=r"fold0 and \S+fold1 differ in roi: \[32, 32, 32\] vs "
                     r"\[64, 64, 64\]"):
    ensemble.load(paths, "latest")
  (tmp_path / "no_runs").mkdir()
  with pytest.raises(FileNotFoundError, match="neither a run"):
    ensemble.resolve_checkpoints([str(tmp_path / "no_runs")])
  # The CLI says it in one line, before reading any input.
  result = _cli("bsf_jax.predict", "--checkpoint", run, "--checkpoint",
                swapped, "--input", "unused", "--output", tmp_path / "p",
                timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().startswith("error: ") and len(
      result.stderr.strip().splitlines()) == 1, result.stderr[-3000:]
  assert "differ in modalities" in result.stderr
  assert not (tmp_path / "p").exists()


def test_evaluate_ensemble_mirrored_on_a_datalist_and_report_side_by_side(
    cohort, run, evaluated, tmp_path, capsys):
  from bsf_jax import evaluate, report
  from bsf_jax.weights import evaluation
  held_out = tmp_path / "held_out.json"
  entry = lambda s, **kw: {"image": [s[m] for m in MODALITIES], **kw}
  subjects = cohort["subjects"]
  # Scored: the labelled entries of "validation" and "test"; not "training"
  # (what models learn from) nor entries without a label.
  held_out.write_text(json.dumps({
      "training": [entry(subjects[0], label=subjects[0]["seg"])],
      "validation": [entry(subjects[1], label=subjects[1]["seg"])],
      "test": [entry(subjects[2])]}))
  single, both = tmp_path / "single", tmp_path / "ensemble_mirror_x"
  config = config_lib.load_run_config(run)
  evaluation.evaluate_run(run, config, str(single), datalist=str(held_out))
  result = _cli("bsf_jax.evaluate", f"--workdir={run}", "--checkpoint", run, run,
                "--mirror", "--mirror_axes=x", f"--datalist={held_out}",
                f"--output={both}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith(
      "Evaluation of an ensemble of 2 checkpoints x 2 flips (mirror x): 4 "
      "sliding-window passes per volume on held_out.json"), result.stdout[:300]
  with open(both / "evaluation.json") as f:
    ens = json.load(f)
  assert [c["checkpoint"] for c in ens["inference"]["checkpoints"]] == [run, run]
  assert ens["inference"]["flips"] == 2 and ens["inference"]["mirror"] == "x"
  assert ens["data"]["datalist"] == str(held_out)
  assert [v["volume"] for v in ens["volumes"]] == [
      os.path.basename(subjects[1]["flair"])]
  with open(single / "evaluation.json") as f:
    one = json.load(f)
  assert one["inference"]["flips"] == 1 and len(one["volumes"]) == 1
  # The workdir keeps the run's own evaluation; an ensemble needs --output.
  with open(os.path.join(run, "evaluation.json")) as f:
    assert json.load(f)["data"]["datalist"] is None
  with pytest.raises(ValueError, match="--output is required"):
    evaluate.output_dir(run, None, [run, run], False, None, None)
  assert evaluate.output_dir(run, None, [], False, None, None) == run

  assert report.main([run, str(single), str(both)]) == 0
  out = capsys.readouterr().out
  main_table, side_table = out.split("side by side:")
  rows = [l for l in main_table.splitlines() if l.startswith("|")]
  cols = [c.strip() for c in rows[0].strip("|").split("|")]
  assert cols[:8] == ["depths", "modalities", "fraction", "init", "data",
                      "scoring", "inference", "n"]
  body = [dict(zip(cols, (c.strip() for c in l.strip("|").split("|"))))
          for l in rows[2:]]
  assert [(r["data"], r["inference"]) for r in body] == [
      ("held_out.json", "1 model"), ("held_out.json", "2 models x 2 flips"),
      ("validation split", "1 model")]
  # Side by side: one row per protocol and data, a column per inference.
  side = [l for l in side_table.splitlines() if l.startswith("|")]
  side_cols = [c.strip() for c in side[0].strip("|").split("|")]
  assert side_cols[-2:] == ["1 model", "2 models x 2 flips"]
  (row,) = [dict(zip(side_cols, (c.strip() for c in l.strip("|").split("|"))))
            for l in side[2:]]
  assert _number(row["1 model"]) == pytest.approx(one["mean"]["dice_mean"], abs=1e-4)
  assert _number(row["2 models x 2 flips"]) == pytest.approx(
      ens["mean"]["dice_mean"], abs=1e-4)


def test_predict_and_evaluate_import_nothing_from_the_trainers():
  # Inference tools stand below training: predicting on a new subject must
  # not pull in (or break with) trainer code.
  code = ("import sys, bsf_jax.predict, bsf_jax.evaluate, bsf_jax.export; "
          "print(sorted(m for m in sys.modules if m.startswith('bsf_jax.trainers')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True, cwd=ROOT)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr
