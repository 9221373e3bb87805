"""Bad input: clear DataErrors naming the file, on_error="skip", the check CLI."""

import io as stdio
import json
import os

import numpy as np
import pytest

from bsf_jax.data import DataError
from bsf_jax.data import check
from bsf_jax.data import io
from bsf_jax.data import crops
from bsf_jax.data import pipeline

SHAPE = (20, 18, 16)


def _brain(rng, shape=SHAPE):
  x = np.zeros(shape, np.float32)
  x[3:-3, 3:-3, 2:-2] = rng.uniform(50, 500, (shape[0] - 6, shape[1] - 6, shape[2] - 4))
  return x


def _subject(folder, name, rng, shape=SHAPE, seg_values=(0, 1, 2, 4)):
  """A BraTS-like subject: 2 modalities + seg; returns the record."""
  paths = [io.write_volume(os.path.join(folder, f"{name}_{m}.nii.gz"), _brain(rng, shape), np.eye(4))
           for m in ("flair", "t1")]
  seg = rng.choice(seg_values, size=shape).astype(np.uint8)
  label = io.write_volume(os.path.join(folder, f"{name}_seg.nii.gz"), seg, np.eye(4), dtype=np.uint8)
  return {"id": name, "image": paths, "label": label}


@pytest.fixture
def bad_records(tmp_path):
  """name -> (record, text the error must contain)."""
  rng = np.random.default_rng(0)
  d = str(tmp_path)
  out = {}
  r = _subject(d, "truncated", rng)
  raw = open(r["image"][0], "rb").read()
  open(r["image"][0], "wb").write(raw[: len(raw) // 2])
  out["truncated"] = (r, r["image"][0])
  r = _subject(d, "corrupt", rng)
  open(r["image"][1], "wb").write(b"\x1f\x8b\x08\x00" + bytes(rng.integers(0, 255, 500, dtype=np.uint8)))
  out["corrupt"] = (r, r["image"][1])
  r = _subject(d, "four_d", rng)
  io.write_volume(r["image"][0], np.ones(SHAPE + (2,)), np.eye(4))
  out["four_d"] = (r, "expected a 3D volume")
  r = _subject(d, "nan", rng)
  x = _brain(rng)
  x[5, 5, 5] = np.nan
  x[6, 6, 6] = np.inf
  io.write_volume(r["image"][1], x, np.eye(4))
  out["nan"] = (r, "2 NaN/Inf voxels")
  r = _subject(d, "shapes", rng)
  io.write_volume(r["image"][1], _brain(rng, (20, 18, 15)), np.eye(4))
  out["shapes"] = (r, "differs from")
  r = _subject(d, "missing", rng)
  os.remove(r["image"][1])
  out["missing"] = (r, "file not found")
  r = _subject(d, "labels", rng, seg_values=(0, 1, 2, 5))
  out["labels"] = (r, "label values [5] outside")
  r = _subject(d, "empty", rng)
  io.write_volume(r["image"][0], np.zeros(SHAPE), np.eye(4))
  io.write_volume(r["image"][1], np.zeros(SHAPE), np.eye(4))
  out["empty"] = (r, "no foreground")
  return out


def _cfg(**kw):
  cfg = pipeline.default_config()
  cfg.update(dict(dataset="brats", modalities=("flair", "t1"), roi=(16, 16, 16), num_samples=1,
                  batch_size=2, workers=0, label_format="brats", intensity="zscore_nonzero"))
  cfg.update(kw)
  return cfg


@pytest.mark.parametrize("case", ["truncated", "corrupt", "four_d", "nan", "shapes", "missing",
                                  "labels", "empty"])
def test_bad_record_raises_data_error_naming_file(bad_records, case):
  record, expected = bad_records[case]
  spec = pipeline.crop_spec(_cfg(), "seg")
  with pytest.raises(DataError) as info:  # load + crop of one record
    pipeline.TrainTransform(spec, augment=True).random_map(record, np.random.default_rng(0))
  msg = str(info.value)
  assert expected in msg
  assert any(p in msg for p in record["image"] + [record["label"]]), msg
  # The same error surfaces from the training iterator, not a crash elsewhere.
  it = pipeline.make_train_iter(_cfg(), task="seg", seed=0, process_index=0, process_count=1,
                                records=[record])
  with pytest.raises(DataError, match=expected.replace("[", r"\[").replace("]", r"\]")):
    next(it)


def test_skip_drops_bad_records_and_counts(tmp_path, bad_records):
  rng = np.random.default_rng(1)
  good = [_subject(str(tmp_path), f"good{i}", rng) for i in range(2)]
  records = good + [r for r, _ in bad_records.values()]
  before = crops.SKIPPED["count"]
  it = pipeline.make_train_iter(_cfg(on_error="skip", batch_size=2), task="seg", seed=0,
                                process_index=0, process_count=1, records=records)
  for _ in range(4):
    batch = next(it)
    assert batch["image"].shape == (2, 16, 16, 16, 2)
    assert np.isfinite(batch["image"]).all()
  assert crops.SKIPPED["count"] - before >= len(bad_records)
  # Eval keeps its length: a bad record becomes a masked placeholder.
  ev = list(pipeline.make_eval_iter(_cfg(on_error="skip"), task="seg", process_index=0,
                                    process_count=1, records=good + [bad_records["nan"][0]]))
  assert [bool(e["mask"]) for e in ev] == [True, True, False]


def test_skip_with_every_record_broken_raises_instead_of_hanging(bad_records):
  records = [r for r, _ in bad_records.values()]
  it = pipeline.make_train_iter(_cfg(on_error="skip"), task="seg", seed=0, process_index=0,
                                process_count=1, records=records)
  with pytest.raises(DataError, match="in a row failed"):
    next(it)


def test_raise_from_worker_process_names_file(bad_records):
  record, expected = bad_records["truncated"]
  it = pipeline.make_train_iter(_cfg(workers=1), task="seg", seed=0, process_index=0,
                                process_count=1, records=[record])
  with pytest.raises(Exception, match="truncated or corrupt gzip") as info:
    next(it)
  assert expected in str(info.value)


def test_empty_datalist_and_small_volume(tmp_path):
  path = tmp_path / "empty.json"
  path.write_text(json.dumps({"training": []}))
  with pytest.raises(DataError, match="empty training datalist"):
    pipeline.make_train_iter(_cfg(datalist=str(path)), task="seg", seed=0, process_index=0,
                             process_count=1)
  # A volume smaller than the roi is padded, not an error.
  rng = np.random.default_rng(2)
  small = _subject(str(tmp_path), "small", rng, shape=(12, 10, 9))
  it = pipeline.make_train_iter(_cfg(roi=(24, 24, 24)), task="seg", seed=0, process_index=0,
                                process_count=1, records=[small])
  batch = next(it)
  assert batch["image"].shape == (2, 24, 24, 24, 2)
  assert batch["label"].shape == (2, 24, 24, 24, 3)


def test_check_cli_lists_every_problem(tmp_path, bad_records):
  rng = np.random.default_rng(3)
  good = _subject(str(tmp_path), "good", rng)
  items = [{"image": r["image"], "label": r["label"], "fold": 0}
           for r in [good] + [r for r, _ in bad_records.values()]]
  path = tmp_path / "folds.json"
  path.write_text(json.dumps({"training": items}))
  out = stdio.StringIO()
  assert check.run_check(str(path), workers=0, roi=(24, 24, 24), out=out) > 0
  text = out.getvalue()
  for name, (record, expected) in bad_records.items():
    if name == "empty":
      expected = "empty volume"
    assert expected in text, (name, text)
  problem_lines = [l for l in text.splitlines() if l.startswith("PROBLEM")]
  assert not any("good_" in l for l in problem_lines)
  # A clean datalist passes, also with worker processes.
  clean = tmp_path / "clean.json"
  clean.write_text(json.dumps({"training": [items[0]]}))
  assert check.main(["--datalist", str(clean), "--workers", "1"]) == 0
  assert check.main(["--datalist", str(path)]) == 1
