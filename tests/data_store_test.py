"""The prepared store: bit-identical crops, refusals, parallel/resumable prepare."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from bsf_jax.run import config_lib
from bsf_jax.data import datalists
from bsf_jax.data import demo
from bsf_jax.data import io
from bsf_jax.data import crops
from bsf_jax.data import pipeline
from bsf_jax.data import prepare
from bsf_jax.data import store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = lambda *_: None


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  return demo.write_demo_cohort(str(tmp_path_factory.mktemp("demo")), subjects=5, seed=0,
                                small=True, workers=1, datasets=("ukb", "brats"))


def _stage(name, arg, **data):
  config = config_lib.load_file(os.path.join(ROOT, "configs", name), arg)
  config.data.update(dict(workers=0, **data))
  return config.data


def stage1(cohort, **kw):
  """configs/stage1.py (ct_window, 2 crops per volume), runlocal roi 64x64x32."""
  return _stage("stage1.py", "runlocal", **{"datalist": cohort["ukb"]["datalist"],
                                            "batch_size": 4, **kw})


def stage3(cohort, **kw):
  """configs/stage3.py BraTS 2021 (z-score, labels, host augmentation), roi 32^3."""
  return _stage("stage3.py", "dataset=brats2021,runlocal",
                **{"datalist": cohort["brats"]["datalist"], "batch_size": 2, **kw})


def _with_store(cfg, out, datalist=None):
  """cfg reading the store at `out` (by default its records come from the
  store's index: no datalist)."""
  cfg = cfg.copy_and_resolve_references()
  cfg.store = str(out)
  cfg.datalist = "" if datalist is None else datalist
  return cfg


@pytest.fixture(scope="module")
def stores(cohort, tmp_path_factory):
  out = tmp_path_factory.mktemp("stores")
  for name, cfg in (("s1", stage1(cohort)), ("s3", stage3(cohort))):
    assert prepare.run(cfg, str(out / name), log=QUIET)["index"]
  return {"s1": str(out / "s1"), "s3": str(out / "s3")}


def _bits(x):
  x = np.asarray(x)
  return x.view(np.uint32) if x.dtype == np.float32 else x


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    if isinstance(a[k], np.ndarray):
      assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
      np.testing.assert_array_equal(_bits(a[k]), _bits(b[k]), err_msg=k)
    else:
      assert a[k] == b[k], k


@pytest.fixture
def no_nifti(monkeypatch):
  """Makes any NIfTI read, header read or folder scan fail."""
  def refuse(*args, **kwargs):
    raise AssertionError(f"NIfTI or scan access {args[:1]} while reading a store")
  for fn in ("read_volume", "load_image", "header_shape"):
    monkeypatch.setattr(io, fn, refuse)
  monkeypatch.setattr(datalists.glob, "glob", refuse)
  monkeypatch.setattr(datalists, "json_records", refuse)


def test_stage1_store_crops_equal_plain_bit_for_bit(cohort, stores, monkeypatch, request):
  cfg = stage1(cohort)
  plain = pipeline.make_train_iter(cfg, task="ssl", seed=5, process_index=0, process_count=1)
  plain_eval = list(pipeline.make_eval_iter(cfg, task="ssl", process_index=0,
                                            process_count=1))
  expected = [next(plain) for _ in range(5)]
  request.getfixturevalue("no_nifti")  # from here on: no NIfTI, no json, no scan
  cfg = _with_store(cfg, stores["s1"])
  it = pipeline.make_train_iter(cfg, task="ssl", seed=5, process_index=0, process_count=1)
  for batch in expected[:4]:
    assert batch["image"].shape == (4, 64, 64, 32, 2)
    _assert_same(batch, next(it))
  got_eval = list(pipeline.make_eval_iter(cfg, task="ssl", process_index=0, process_count=1))
  assert len(got_eval) == len(plain_eval) > 0
  for a, b in zip(plain_eval, got_eval):
    _assert_same(a, b)
  # Resuming from an iterator state gives the same crops as the plain path.
  state = it.get_state()
  resumed = pipeline.make_train_iter(cfg, task="ssl", seed=5, process_index=0,
                                     process_count=1)
  resumed.set_state(state)
  _assert_same(expected[4], next(resumed))


def test_stage3_store_crops_equal_plain_bit_for_bit(cohort, stores, request):
  cfg = stage3(cohort)
  assert cfg.augment and cfg.num_samples == 1 and cfg.intensity == "zscore_nonzero"
  plain = pipeline.make_train_iter(cfg, task="seg", seed=2, process_index=0, process_count=1)
  expected = [next(plain) for _ in range(4)]
  plain_eval = list(pipeline.make_eval_iter(cfg, task="seg", process_index=0,
                                            process_count=1))
  request.getfixturevalue("no_nifti")
  cfg = _with_store(cfg, stores["s3"])
  it = pipeline.make_train_iter(cfg, task="seg", seed=2, process_index=0, process_count=1)
  for batch in expected:
    assert batch["label"].shape == (2, 32, 32, 32, 3)
    _assert_same(batch, next(it))
  got_eval = list(pipeline.make_eval_iter(cfg, task="seg", process_index=0, process_count=1))
  assert len(got_eval) == len(plain_eval) == 1  # fold 0 of 5 subjects
  for a, b in zip(plain_eval, got_eval):
    assert a["label_path"].endswith("_seg.nii.gz")
    _assert_same(a, b)


def _absolute(datalist):
  """The datalist json with absolute paths (to be rewritten elsewhere)."""
  sections = datalists.json_records(datalist)
  return {name: [{"image": r["image"]} for r in recs] for name, recs in sections.items()}


def _one_line_refusal(cfg, match):
  with pytest.raises(store.StoreError, match=match) as e:
    store.load_datalist(cfg)
  assert "\n" not in str(e.value), str(e.value)
  return str(e.value)


def test_refuses_a_store_of_another_roi_modalities_intensity_or_labels(cohort, stores):
  s1 = _with_store(stage1(cohort), stores["s1"])
  _one_line_refusal(_with_store(stage1(cohort, roi=(32, 32, 32)), stores["s1"]),
                    r"roi \[64, 64, 32\].*\[32, 32, 32\] \(data.roi\)")
  _one_line_refusal(_with_store(stage1(cohort, modalities=("t1",)), stores["s1"]),
                    r"modalities.*data.modalities")
  msg = _one_line_refusal(_with_store(stage1(cohort, intensity="zscore_nonzero"),
                                      stores["s1"]), r"intensity.*ct_window")
  assert "python -m bsf_jax.data.prepare" in msg
  _one_line_refusal(_with_store(stage3(cohort, label_format="brats2023"), stores["s3"]),
                    r"label_format \"brats2021\".*\"brats2023\"")
  # The stage-1 store read with its own config: accepted.
  assert len(store.load_datalist(s1)[0]) == 4


def test_refuses_a_scan_rule_other_than_the_stores(cohort, tmp_path):
  """A store made from a scan keeps the scan's records; a run whose rule
  would pick others (here the slice minimum) is refused."""
  scan = stage1(cohort, datalist="", root=cohort["ukb"]["root"], min_slices=50)
  prepare.run(scan, str(tmp_path / "s"), log=QUIET)  # small volumes: 61 slices
  assert len(store.load_datalist(_with_store(scan, tmp_path / "s"))[0]) == 4
  _one_line_refusal(_with_store(stage1(cohort, min_slices=100), tmp_path / "s"),
                    r"scan of .* data.min_slices=50, but this run has data.min_slices=100")


def test_refuses_a_subject_missing_from_the_store(cohort, tmp_path):
  full = _absolute(cohort["ukb"]["datalist"])
  part = tmp_path / "part.json"
  part.write_text(json.dumps({"training": full["training"][:3]}))
  prepare.run(stage1(cohort, datalist=str(part), val_fraction=0.0), str(tmp_path / "s"),
              log=QUIET)
  # The run names the full datalist: its 4th training subject is not stored.
  _one_line_refusal(_with_store(stage1(cohort), tmp_path / "s", cohort["ukb"]["datalist"]),
                    r"subject training\[3\] .*T1_brain_to_MNI.nii.gz.* is missing from the store")


def test_refuses_a_store_changed_after_it_was_written(cohort, stores, tmp_path):
  copy = tmp_path / "s1"
  shutil.copytree(stores["s1"], copy)  # a copy keeps the crc32 (content, not mtime)
  cfg = _with_store(stage1(cohort), copy)
  records = store.load_datalist(cfg)[0]
  assert crops.store_crops(records[0], np.random.default_rng(0),
                              pipeline.crop_spec(cfg, "ssl"), False)["image"].size
  path = store.array_path(str(copy), records[1]["store"]["name"], "image")
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0xFF
  with open(path, "wb") as f:
    f.write(bytes(data))
  it = pipeline.make_train_iter(cfg, task="ssl", seed=0, process_index=0, process_count=1)
  with pytest.raises(store.StoreError, match="changed after it was written") as e:
    for _ in range(8):  # an epoch reads every subject
      next(it)
  assert "\n" not in str(e.value) and path in str(e.value)
  # Nothing is lost: the file is as it was, and under on_error="skip" too the
  # run refuses (a changed store is not a bad input file).
  assert open(path, "rb").read() == bytes(data)
  skip = _with_store(stage1(cohort, on_error="skip"), copy)
  it = pipeline.make_train_iter(skip, task="ssl", seed=0, process_index=0, process_count=1)
  with pytest.raises(store.StoreError, match="changed after it was written"):
    for _ in range(8):
      next(it)


def test_prepare_in_parallel_resumes_verified_and_skips_a_bad_file(cohort, tmp_path):
  full = _absolute(cohort["ukb"]["datalist"])
  bad = tmp_path / "bad_T1.nii.gz"
  good = full["training"][0]["image"][0]
  bad.write_bytes(open(good, "rb").read()[:3000])  # truncated gzip
  full["training"].append({"image": [str(bad), full["training"][0]["image"][1]]})
  datalist = tmp_path / "datalist.json"
  datalist.write_text(json.dumps(full))
  cfg = stage1(cohort, datalist=str(datalist), on_error="skip")
  out = str(tmp_path / "store")
  lines = []
  # Two processes, each its share; the last to finish writes the index.
  first = prepare.run(cfg, out, process_index=0, process_count=2, log=lines.append)
  assert not first["index"] and not os.path.exists(os.path.join(out, store.INDEX))
  assert not prepare.run(cfg, out, index_only=True, log=lines.append)["index"]
  second = prepare.run(cfg, out, process_index=1, process_count=2, log=lines.append)
  assert second["index"] and first["subjects"] == 6
  assert first["prepared"] + second["prepared"] == 5
  assert first["skipped"] + second["skipped"] == 1
  (skip_line,) = [l for l in lines if l.startswith("skipped")]
  assert "bad_T1.nii.gz: truncated or corrupt gzip" in skip_line and "\n" not in skip_line
  # A rerun verifies every finished subject and redoes only what changed: a
  # subject whose file was altered, one whose entry is missing (a process
  # killed before its last write), and the one that failed.
  names = store.load_index(out)["subjects"]["name"]
  with open(store.array_path(out, names[0], "image"), "r+b") as f:
    f.seek(100)
    f.write(b"\0\0\0\0")
  os.remove(store.entry_path(out, names[1]))
  lines.clear()
  again = prepare.run(cfg, out, log=lines.append)
  assert (again["prepared"], again["verified"], again["skipped"]) == (2, 3, 1), lines
  assert again["index"]
  # The run: under "raise" the failed subject is a one-line refusal before
  # anything starts; under "skip" it is skipped like a bad file on the plain path.
  with pytest.raises(store.StoreError, match="was not prepared: .*truncated") as e:
    store.load_datalist(_with_store(stage1(cohort), out, str(datalist)))
  assert "\n" not in str(e.value)
  skip = _with_store(cfg, out)
  skip.val_fraction = 0.0
  before = crops.SKIPPED["count"]
  it = pipeline.make_train_iter(skip, task="ssl", seed=0, process_index=0, process_count=1)
  for _ in range(6):
    assert next(it)["image"].shape == (4, 64, 64, 32, 2)
  assert crops.SKIPPED["count"] > before


def test_prepare_refuses_another_config_in_the_same_folder(cohort, stores):
  with pytest.raises(store.StoreError, match=r"roi.*data.roi"):
    prepare.run(stage1(cohort, roi=(32, 32, 32)), stores["s1"], log=QUIET)


def test_share_from_flags_or_slurm_array(monkeypatch):
  monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
  monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT", raising=False)
  assert prepare.share(None, None) == (0, 1)
  monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
  monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
  monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")
  assert prepare.share(None, None) == (6, 8)
  assert prepare.share(2, 4) == (2, 4)
  with pytest.raises(ValueError, match="outside"):
    prepare.share(4, 4)


def test_index_of_82800_subjects_loads_in_seconds(cohort, stores, tmp_path):
  """A UKB-sized index (generated from a real entry) loads fast and right."""
  small = store.load_index(stores["s1"])
  table = small["subjects"]
  n = 82_800
  sections, columns = [], {k: [] for k in store.COLUMNS}
  for i in range(n):
    eid = str(1_000_000 + i)
    image = [f"/data/ukb/{eid}_20252_2_0/T1/T1_brain_to_MNI.nii.gz",
             f"/data/ukb/{eid}_20253_2_0/T2_FLAIR/T2_FLAIR_brain_to_MNI.nii.gz"]
    sections.append({"id": eid, "image": image, "label": "", "fold": -1, "subject": i})
    for k in store.COLUMNS:
      columns[k].append(table[k][0])
    columns["id"][i] = eid
    columns["name"][i] = store.subject_name({"id": eid, "image": image, "label": ""})
  big = tmp_path / "big"
  big.mkdir()
  index = {**small, "sections": {"training": sections}, "subjects": columns,
           "source": {"scan": "/data/ukb", "min_slices": 100}}
  (big / store.INDEX).write_text(json.dumps(index))
  cfg = _with_store(stage1(cohort, datalist="", val_fraction=0.2), big)
  t0 = time.perf_counter()
  train, val = store.load_datalist(cfg)
  seconds = time.perf_counter() - t0
  # The plain path's split of the same records (no scan: sections given).
  plain_train, plain_val = datalists.load_datalist(cfg, sections={"training": sections})
  assert [r["id"] for r in train] == [r["id"] for r in plain_train]
  assert [r["id"] for r in val] == [r["id"] for r in plain_val]
  assert len(train) + len(val) == n and len(val) == round(0.2 * n)
  r = train[123]
  assert r["store"]["name"] == columns["name"][int(r["id"]) - 1_000_000]
  assert r["store"]["box"]["size"] == table["box"][0][3:]
  assert seconds < 5, f"{n} subjects took {seconds:.1f} s"


def test_prepare_command_line(cohort, tmp_path):
  out = tmp_path / "s3"
  cmd = [sys.executable, "-m", "bsf_jax.data.prepare",
         "--config=" + os.path.join(ROOT, "configs", "stage3.py") + ":dataset=brats2021,runlocal",
         f"--config.data.datalist={cohort['brats']['datalist']}", f"--out={out}",
         "--workers=2"]
  env = dict(os.environ, PYTHONPATH=ROOT)
  run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert run.returncode == 0, run.stderr
  assert "wrote index.json (5 subjects)" in run.stdout + run.stderr
  index = store.load_index(str(out))
  assert index["contract"]["roi"] == [32, 32, 32]
  assert all(f is not None and set(f) == {"image", "regions", "label"}
             for f in index["subjects"]["files"])


def test_bench_data_runs_every_side(tmp_path):
  """`bench data` on small synthetic volumes: every side runs and is reported."""
  from bsf_jax.bench import data as bench_data  # pylint: disable=g-import-not-at-top
  out = tmp_path / "rates.json"
  assert bench_data.main(["--small-demo", "--stages", "1", "--subjects", "2",
                          "--seconds", "0.1", "--rounds", "1", "--json", str(out)]) == 0
  result = json.loads(out.read_text())["stage1"]
  assert set(result["rates"]) == {"plain", "cache", "store", "monai_persistent"}
  assert all(v > 0 for v in result["rates"].values())
  assert result["store"]["bytes_per_subject"] > 0
