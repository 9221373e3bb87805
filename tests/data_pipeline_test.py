"""Grain pipelines and datalists on a small demo cohort."""

import os

import jax
import numpy as np
import psutil
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bsf_jax.infer import contract as contract_lib
from bsf_jax.data import DataError
from bsf_jax.data import datalists
from bsf_jax.data import demo
from bsf_jax.data import io
from bsf_jax.data import pipeline

ROI = (16, 16, 16)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  return demo.write_demo_cohort(str(tmp_path_factory.mktemp("demo")), subjects=5, seed=0, small=True,
                                  workers=1)


def _cfg(cohort, dataset="ukb", **kw):
  cfg = pipeline.default_config()
  cfg.roi, cfg.batch_size, cfg.workers, cfg.num_samples = ROI, 4, 0, 2
  if dataset == "ukb":
    cfg.datalist = cohort["ukb"]["datalist"]
  elif dataset == "brats":
    cfg.update(dict(dataset="brats", datalist=cohort["brats"]["datalist"], label_format="brats",
                    modalities=("flair", "t1ce", "t1", "t2"), fold=0))
  else:
    cfg.update(dict(dataset="atlas", root=cohort["atlas"]["root"], label_format="atlas",
                    modalities=("t1",), val_fraction=0.4))
  cfg.update(kw)
  return cfg


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_ssl_batches_are_seeded(cohort):
  cfg = _cfg(cohort, intensity="ct_window")
  a = _take(pipeline.make_train_iter(cfg, task="ssl", seed=3, process_index=0, process_count=1), 2)
  b = _take(pipeline.make_train_iter(cfg, task="ssl", seed=3, process_index=0, process_count=1), 2)
  c = _take(pipeline.make_train_iter(cfg, task="ssl", seed=4, process_index=0, process_count=1), 2)
  assert set(a[0]) == {"image"}
  assert a[0]["image"].shape == (4, *ROI, 2) and a[0]["image"].dtype == np.float32
  # ct_window: values in [0, 1], brain > 0.5 (raw >= 0 maps to >= 0.5).
  assert a[0]["image"].min() >= 0 and a[0]["image"].max() <= 1
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert not np.array_equal(a[0]["image"], c[0]["image"])


# One worker process is enough to cover resuming across processes; each
# spawned worker costs seconds of start-up.
@pytest.mark.parametrize("workers", [0, 1])
def test_iterator_state_resumes_exactly(cohort, workers):
  cfg = _cfg(cohort, "brats", workers=workers, num_samples=1, batch_size=2)
  it = pipeline.make_train_iter(cfg, task="seg", seed=0, process_index=0, process_count=1)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 3)
  resumed = pipeline.make_train_iter(cfg, task="seg", seed=0, process_index=0, process_count=1)
  resumed.set_state(state)
  for x, y in zip(expected, _take(resumed, 3)):
    for k in ("image", "label"):
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("dataset,k", [("brats", 3), ("atlas", 1)])
def test_seg_batches(cohort, dataset, k):
  cfg = _cfg(cohort, dataset, num_samples=1, batch_size=2)
  batch = next(pipeline.make_train_iter(cfg, task="seg", seed=0, process_index=0, process_count=1))
  assert batch["image"].shape == (2, *ROI, len(cfg.modalities))
  assert batch["label"].shape == (2, *ROI, k) and batch["label"].dtype == np.float32
  assert set(np.unique(batch["label"])) <= {0.0, 1.0}
  if dataset == "brats":  # ET within TC within WT
    lab = batch["label"]
    assert np.all(lab[..., 2] <= lab[..., 0]) and np.all(lab[..., 0] <= lab[..., 1])


def test_eval_is_deterministic_padded_and_sharded(cohort):
  cfg = _cfg(cohort, "brats", num_samples=1)
  val = datalists.load_datalist(cfg)[1]
  per_process = [list(pipeline.make_eval_iter(cfg, task="seg", process_index=i, process_count=2))
                 for i in range(2)]
  assert len(per_process[0]) == len(per_process[1])
  paths = [e["path"] for elems in per_process for e in elems if e["mask"]]
  assert sorted(paths) == sorted(r["image"][0] for r in val)
  e = per_process[0][0]
  assert e["image"].shape[:3] == e["label"].shape[:3] == e["raw_label"].shape
  assert e["affine"].shape == (4, 4) and e["label_path"].endswith("_seg.nii.gz")
  # SSL eval: fixed crops, last batch padded with mask False.
  cfg = _cfg(cohort)  # ukb: 4 training, 1 validation subject
  records = datalists.load_datalist(cfg)[0][:3]
  batches = list(pipeline.make_eval_iter(cfg, task="ssl", process_index=0, process_count=1,
                                         records=records))
  again = list(pipeline.make_eval_iter(cfg, task="ssl", process_index=0, process_count=1,
                                       records=records))
  assert len(batches) == 2 and batches[-1]["image"].shape == (4, *ROI, 2)
  np.testing.assert_array_equal(batches[-1]["mask"], [True, True, False, False])
  for x, y in zip(batches, again):
    np.testing.assert_array_equal(x["image"], y["image"])


def test_to_global_batch_on_8_devices(cohort):
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  cfg = _cfg(cohort, batch_size=8)
  batch = next(pipeline.make_train_iter(cfg, task="ssl", seed=0, process_index=0, process_count=1))
  out = pipeline.to_global_batch({**batch, "path": "x"}, NamedSharding(mesh, P("data")))
  assert set(out) == {"image"}
  assert out["image"].shape == (8, *ROI, 2) and len(out["image"].sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(out["image"]), batch["image"])


def test_input_contract(cohort):
  contract = contract_lib.data_contract(_cfg(cohort, "brats", intensity="ct_window"))
  assert contract["modalities"] == ["flair", "t1ce", "t1", "t2"]
  assert contract["orientation"] == "RAS" and contract["roi"] == list(ROI)
  assert contract["intensity"] == {"kind": "ct_window", "a_min": -1000.0, "a_max": 1000.0,
                                   "b_min": 0.0, "b_max": 1.0, "clip": True}
  assert contract["label_channels"] == ["TC", "WT", "ET"]


def test_datalists(cohort):
  cfg = _cfg(cohort, "brats", modalities=("t2", "t1ce"), fold=1)
  train, val = datalists.load_datalist(cfg)
  assert len(train) + len(val) == 5
  assert all(r["image"][0].endswith("_t2.nii.gz") and r["image"][1].endswith("_t1ce.nii.gz")
             for r in train + val)
  assert datalists.resolve_modalities("ukb", "T1T2") == ("t1", "flair")
  assert datalists.resolve_modalities("ukb", "T2") == ("flair",)
  with pytest.raises(ValueError, match="unknown"):
    datalists.resolve_modalities("brats", ("t1", "dwi"))
  # Few-shot: deterministic in repeat_seed, different across seeds.
  recs = [{"id": str(i)} for i in range(50)]
  a = datalists.few_shot(recs, 0.2, 1)
  assert len(a) == 10 and a == datalists.few_shot(recs, 0.2, 1)
  assert a != datalists.few_shot(recs, 0.2, 2)
  # UKB scan with the slice rule (small volumes have 61 slices).
  ukb = _cfg(cohort, datalist="", root=cohort["ukb"]["root"], val_fraction=0.2)
  with pytest.raises(DataError, match="empty training datalist"):
    datalists.load_datalist(ukb)
  ukb.min_slices = 50
  train, val = datalists.load_datalist(ukb)
  assert (len(train), len(val)) == (4, 1)
  assert all(r["image"][1].endswith("T2_FLAIR_brain_to_MNI.nii.gz") for r in train)
  # ATLAS split is seeded.
  atlas = _cfg(cohort, "atlas")
  a_train, a_val = datalists.load_datalist(atlas)
  assert (len(a_train), len(a_val)) == (3, 2)
  assert a_val == datalists.load_datalist(atlas)[1]
  assert all(os.path.isfile(r["label"]) for r in a_train + a_val)


def test_run_datalist_scans_once_and_reads_as_the_scan(cohort, tmp_path, monkeypatch):
  """`run_datalist` writes the scan; loading it gives the scan's records."""
  scans = []
  real_scan = datalists.scan
  monkeypatch.setattr(datalists, "scan", lambda cfg: scans.append(cfg.root) or real_scan(cfg))
  # Relative roots: the written paths are absolute, so they read from anywhere.
  monkeypatch.chdir(os.path.dirname(cohort["ukb"]["root"]))
  cases = {"ukb": dict(root="ukb", min_slices=50, val_fraction=0.4),
           "brats": dict(root="brats", fold=2),
           "atlas": dict(root="atlas")}
  for dataset, kw in cases.items():
    scanned = _cfg(cohort, dataset, datalist="", **kw)
    workdir = str(tmp_path / dataset)
    path = datalists.run_datalist(scanned, workdir)
    assert path == os.path.join(workdir, datalists.RUN_DATALIST)
    from_file = scanned.copy_and_resolve_references()
    from_file.datalist = path
    absolute = lambda recs: [{**r, "image": [os.path.abspath(p) for p in r["image"]],
                              "label": r["label"] and os.path.abspath(r["label"])}
                             for r in recs]
    got, want = datalists.load_datalist(from_file), datalists.load_datalist(scanned)
    assert [absolute(r) for r in got] == [absolute(r) for r in want], dataset
    assert all(os.path.isabs(p) for r in got[0] for p in r["image"])
    # A restart reuses it; other scan settings scan again.
    before = len(scans)
    assert datalists.run_datalist(scanned, workdir) == path and len(scans) == before
    if dataset == "ukb":
      scanned.min_slices = 1000
      with pytest.raises(DataError, match="no ukb subjects found"):
        datalists.run_datalist(scanned, workdir)
      assert len(scans) == before + 1
  assert len(scans) == 4


def test_memory_is_bounded_by_buffers_not_dataset(tmp_path):
  """One epoch over 60 volumes (140 MB decoded): RSS stays flat."""
  rng = np.random.default_rng(0)
  records = []
  x = np.zeros((96, 96, 64), np.float32)
  for i in range(60):
    x[8:88, 8:88, 4:60] = rng.uniform(1, 100)
    records.append({"id": str(i), "label": "", "image": [
        io.write_volume(str(tmp_path / f"v{i}.nii"), x, np.eye(4))]})
  cfg = pipeline.default_config()
  cfg.update(dict(modalities=("t1",), roi=(32, 32, 32), batch_size=4, num_samples=2, workers=0))
  it = pipeline.make_train_iter(cfg, task="ssl", seed=0, process_index=0, process_count=1,
                                records=records)
  proc = psutil.Process()
  _take(it, 5)
  start = proc.memory_info().rss
  peak = start
  for _ in range(30):  # 60 volumes
    next(it)
    peak = max(peak, proc.memory_info().rss)
  # Holding the epoch would add 140 MB; buffers hold a few volumes.
  assert peak - start < 48 * 2**20, (start, peak)
