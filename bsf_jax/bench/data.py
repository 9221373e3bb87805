"""Data pipeline benchmark: crops/s per core, bsf_jax's input paths vs MONAI's.

    python -m bsf_jax.bench data [--real DIR] [--stages 1,3] [--subjects 4]
        [--seconds 5] [--rounds 3] [--core 0] [--json OUT] [--small-demo]
    python -m bsf_jax.bench data --memory-only [--memory 100] [--workers 2]

One process pinned to one core (`os.sched_setaffinity`, inherited by every
thread it starts; torch and Blosc2 set to one thread), no worker processes,
every side in the same run. Full-size real scans (`--real`, default the
repository's sibling shared/real-mri; never copied, only linked):

* stage 1: the MS patient's T1 + FLAIR on the 182x218x182 MNI grid (UK
  Biobank's), linked as `--subjects` UKB subjects; the reference stage-1
  chain: load, RAS, ScaleIntensityRange(-1000..1000 -> 0..1, clip),
  SpatialPad(96), CropForeground(k_divisible=96), RandSpatialCropSamples(96,
  num_samples=2).
* stage 3: the BraTS 2018 case (4 modalities + labels, 240x240x155), linked
  as `--subjects` BraTS 2021 subjects; load, RAS, label -> TC/WT/ET,
  NormalizeIntensity(nonzero, channel_wise), CropForeground(k_divisible=128),
  RandSpatialCrop(128). Augmentation runs on the device in stage 3, so the
  host reads crops only; the "+ host augmentation" rows add RandFlip x3 and
  RandScale/ShiftIntensity(0.1) on both sides.

Paths timed: bsf_jax `make_train_iter` from the NIfTI files ("plain"), from
a warm `data.cache_dir` ("cache") and from a prepared store ("store"; its
preparation time and bytes per subject beside the NIfTI's are printed);
MONAI `PersistentDataset` + `DataLoader(num_workers=0)` with the
deterministic transforms cached on disk and warm ("MONAI persistent").
Caches are filled first (one epoch each); then the sides take turns,
`--rounds` times, each timed for `--seconds` after one untimed volume, and
the median of each side is reported with its ratio to MONAI (the host
augmentation rows against MONAI's with augmentation).
Each rate is given per wall-clock second and per CPU second of the process
(all its threads, on its one core): where other work shares the core, the
second is what a core of its own delivers. `--json` writes both; `bench
scale --data-rates` reads the per-CPU-second rates.
`--small-demo` runs the same on small synthetic volumes with 16^3 crops
(checks the bench itself, in seconds).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time

from absl import flags
import numpy as np
import psutil

from bsf_jax import tool_flags
from bsf_jax.bench import common
from bsf_jax.data import demo
from bsf_jax.data import pipeline

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REAL = os.path.join(os.path.dirname(_REPO), "shared", "real-mri")
_MS = ("ms_patient19", "patient19_T1_MNI.nii.gz", "patient19_FLAIR_MNI.nii.gz")
_BRATS = "Brats18_TCIA05_396_1"

FLAGS = tool_flags.flag_values(__name__)
flags.DEFINE_string("real", REAL, "folder of the real scans", flag_values=FLAGS)
flags.DEFINE_string("stages", "1,3", "stages to time, of 1 and 3", flag_values=FLAGS)
flags.DEFINE_integer("subjects", 4, "subjects per stage (links to the one real case)",
                     flag_values=FLAGS)
flags.DEFINE_float("seconds", 5.0, "timed seconds per side", flag_values=FLAGS)
flags.DEFINE_integer("rounds", 3, "every side this many times in turn; medians reported",
                     flag_values=FLAGS)
flags.DEFINE_integer("core", 0, "the one core to run on", flag_values=FLAGS)
flags.DEFINE_string("json", "", "write the rates here", flag_values=FLAGS)
flags.DEFINE_bool("small-demo", False,
                  "small synthetic volumes, 16^3 crops (a check of the bench)", flag_values=FLAGS)
flags.DEFINE_integer("memory", 0, "stream N small subjects, peak RSS", flag_values=FLAGS)
flags.DEFINE_bool("memory-only", False, "only the memory check", flag_values=FLAGS)
flags.DEFINE_integer("workers", 2, "Grain workers (memory check)", flag_values=FLAGS)


def _link(src, dst):
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  os.symlink(os.path.abspath(src), dst)
  return dst


def ukb_cohort(out: str, t1: str, flair: str, subjects: int) -> str:
  """`subjects` UKB-layout subjects linking to one T1 + FLAIR; the datalist."""
  records = []
  for i in range(subjects):
    eid = 5000001 + i
    records.append({"image": [
        _link(t1, os.path.join(out, f"{eid}_20252_2_0", "T1", "T1_brain_to_MNI.nii.gz")),
        _link(flair, os.path.join(out, f"{eid}_20253_2_0", "T2_FLAIR",
                                  "T2_FLAIR_brain_to_MNI.nii.gz"))]})
  path = os.path.join(out, "datalist.json")
  with open(path, "w") as f:
    json.dump({"training": records}, f)
  return path


def brats_cohort(out: str, case_dir: str, subjects: int) -> str:
  """`subjects` BraTS 2021 subjects linking to one case; a folds json (fold 0)."""
  case = os.path.basename(os.path.normpath(case_dir))
  records = []
  for i in range(subjects):
    sid = f"BraTS2021_{i:05d}"
    link = lambda m, sid=sid: _link(os.path.join(case_dir, f"{case}_{m}.nii.gz"),
                                    os.path.join(out, sid, f"{sid}_{m}.nii.gz"))
    records.append({"fold": 0, "image": [link(m) for m in ("flair", "t1ce", "t1", "t2")],
                    "label": link("seg")})
  path = os.path.join(out, "folds.json")
  with open(path, "w") as f:
    json.dump({"training": records}, f)
  return path


def stage_config(stage: int, datalist: str, roi: int):
  """`config.data` of the benchmarked chain: no workers, one volume per batch."""
  cfg = pipeline.default_config()
  if stage == 1:
    cfg.update(dict(dataset="ukb", modalities=("t1", "flair"), num_samples=2,
                    intensity="ct_window", label_format="none"))
  else:
    cfg.update(dict(dataset="brats", modalities=("flair", "t1ce", "t1", "t2"),
                    num_samples=1, intensity="zscore_nonzero", label_format="brats2021",
                    fold=-1, augment=False))
  cfg.update(dict(datalist=datalist, roi=(roi,) * 3, val_fraction=0.0, workers=0,
                  read_threads=1))
  cfg.batch_size = cfg.num_samples
  return cfg


def _rate(next_batch, seconds: float) -> tuple[float, float]:
  """Crops per second of `next_batch()` for `seconds` after one untimed call.

  Returns:
    (per wall-clock second, per CPU second of this process): on a core that
    others share, the second is what a core of its own would deliver.
  """
  next_batch()
  crops, t0, c0 = 0, time.perf_counter(), time.process_time()
  while True:
    crops += next_batch()
    dt = time.perf_counter() - t0
    if dt >= seconds and crops >= 4:
      return crops / dt, crops / (time.process_time() - c0)


def _task(cfg) -> str:
  return "ssl" if cfg.label_format == "none" else "seg"


def _records(datalist: str) -> list[dict]:
  with open(datalist) as f:
    return json.load(f)["training"]


def time_bsf(cfg, seconds: float) -> tuple[float, float]:
  it = pipeline.make_train_iter(cfg, task=_task(cfg), seed=0, process_index=0,
                                process_count=1)

  def next_batch():
    batch = next(it)
    assert batch["image"].shape[1:] == (*cfg.roi, len(cfg.modalities)), batch["image"].shape
    return batch["image"].shape[0]
  return _rate(next_batch, seconds)


def monai_chain(stage: int, roi: int, augment: bool):
  """The MONAI reference chain of a stage (deterministic part first)."""
  from monai import transforms as mt  # pylint: disable=g-import-not-at-top
  size = [roi] * 3
  if stage == 1:
    keys = ["image"]
    steps = [
        mt.LoadImaged(keys=keys, image_only=True), mt.EnsureChannelFirstd(keys=keys),
        mt.Orientationd(keys=keys, axcodes="RAS"),
        mt.ScaleIntensityRanged(keys=keys, a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0,
                                clip=True),
        mt.SpatialPadd(keys=keys, spatial_size=size),
        mt.CropForegroundd(keys=keys, source_key="image", k_divisible=size),
        mt.RandSpatialCropSamplesd(keys=keys, roi_size=size, num_samples=2,
                                   random_size=False)]
  else:
    keys = ["image", "label"]
    steps = [
        mt.LoadImaged(keys=keys, image_only=True), mt.EnsureChannelFirstd(keys=keys),
        mt.Orientationd(keys=keys, axcodes="RAS"),
        mt.ConvertToMultiChannelBasedOnBratsClassesd(keys="label"),
        mt.NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
        mt.CropForegroundd(keys=keys, source_key="image", k_divisible=size),
        mt.RandSpatialCropd(keys=keys, roi_size=size, random_size=False)]
    if augment:
      steps += [mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=a) for a in range(3)]
      steps += [mt.RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
                mt.RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0)]
  return mt.Compose(steps + [mt.ToTensord(keys=keys)])


def time_monai(stage: int, datalist: str, roi: int, cache_dir: str, seconds: float,
               augment: bool = False) -> tuple[float, float]:
  """Crops/s of MONAI PersistentDataset + DataLoader(num_workers=0), cache warm."""
  import torch  # pylint: disable=g-import-not-at-top
  from monai import data as md  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)
  files = [{k: r[k] for k in ("image", "label") if k in r} for r in _records(datalist)]
  chain = monai_chain(stage, roi, augment)
  chain.set_random_state(seed=0)
  dataset = md.PersistentDataset(files, transform=chain, cache_dir=cache_dir)
  for i in range(len(files)):  # fills the cache: warm, as in a later epoch
    dataset[i]
  state = {"it": None}

  def next_batch():
    try:
      batch = next(state["it"])
    except (StopIteration, TypeError):
      state["it"] = iter(md.DataLoader(dataset, batch_size=1, shuffle=True, num_workers=0))
      batch = next(state["it"])
    assert tuple(batch["image"].shape[-3:]) == (roi,) * 3, batch["image"].shape
    return batch["image"].shape[0]
  return _rate(next_batch, seconds)


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


_NAMES = {"plain": "bsf_jax plain NIfTI", "cache": "bsf_jax warm data.cache_dir",
          "store": "bsf_jax store", "monai_persistent": "MONAI PersistentDataset",
          "store_host_augment": "bsf_jax store + host augmentation",
          "monai_persistent_host_augment": "MONAI persistent + host augmentation"}


def run_stage(stage: int, datalist: str, roi: int, seconds: float, rounds: int, tmp: str,
              log=print) -> dict:
  """Every side of one stage, `rounds` times in turn (median rates kept).

  Returns:
    {"rates": {side: median crops per CPU second}, "wall_rates": {side:
     median crops per wall second}, "rounds": {side: [[wall, cpu] per
     round]}, "store": {bytes and prepare time per subject}}.
  """
  from bsf_jax.data import prepare  # pylint: disable=g-import-not-at-top
  cfg = stage_config(stage, datalist, roi)
  cached = cfg.copy_and_resolve_references()
  cached.cache_dir = os.path.join(tmp, f"cache{stage}")
  warm = pipeline.make_train_iter(cached, task=_task(cached), seed=1, process_index=0,
                                  process_count=1)
  for _ in _records(datalist):  # one epoch decodes every file into the cache
    next(warm)
  out = os.path.join(tmp, f"store{stage}")
  t0 = time.perf_counter()
  counts = prepare.run(cfg, out, log=lambda *_: None)
  n = counts["subjects"]
  prep_s = (time.perf_counter() - t0) / n
  stored = cfg.copy_and_resolve_references()
  stored.store = out
  store_bytes = _dir_bytes(os.path.join(out, "subjects")) / n
  nifti = sum(os.path.getsize(p) for r in _records(datalist)
              for p in r["image"] + ([r["label"]] if r.get("label") else [])) / n
  log(f"  store: prepare {prep_s:.2f} s/subject on this core; {store_bytes / 2**20:.1f} "
      f"MiB/subject (NIfTI {nifti / 2**20:.1f} MiB)")
  monai_cache = os.path.join(tmp, f"monai{stage}")
  sides = {"plain": lambda: time_bsf(cfg, seconds),
           "cache": lambda: time_bsf(cached, seconds),
           "store": lambda: time_bsf(stored, seconds),
           "monai_persistent": lambda: time_monai(stage, datalist, roi, monai_cache, seconds)}
  if stage == 3:
    augmented = stored.copy_and_resolve_references()
    augmented.augment = True
    sides["store_host_augment"] = lambda: time_bsf(augmented, seconds)
    sides["monai_persistent_host_augment"] = lambda: time_monai(
        stage, datalist, roi, monai_cache, seconds, augment=True)
  measured = {k: [] for k in sides}
  for r in range(rounds):
    for k, side in sides.items():
      measured[k].append(side())
    log(f"  round {r + 1}, crops/s (wall, CPU): " + ", ".join(
        f"{k} {v[-1][0]:.1f} {v[-1][1]:.1f}" for k, v in measured.items())
        + f" (load average {os.getloadavg()[0]:.1f})")
  wall = {k: float(np.median([w for w, _ in v])) for k, v in measured.items()}
  rates = {k: float(np.median([c for _, c in v])) for k, v in measured.items()}
  log(f"  {'median of the rounds':40s} {'per wall s':>10s} {'vs MONAI':>8s} "
      f"{'per CPU s':>10s} {'vs MONAI':>8s}")
  for k in rates:
    ref = "monai_persistent_host_augment" if "augment" in k else "monai_persistent"
    log(f"  {_NAMES[k]:40s} {wall[k]:10.2f} {wall[k] / wall[ref]:7.2f}x "
        f"{rates[k]:10.2f} {rates[k] / rates[ref]:7.2f}x")
  return {"rates": rates, "wall_rates": wall, "rounds": measured,
          "store": {"bytes_per_subject": store_bytes, "nifti_bytes_per_subject": nifti,
                    "prepare_seconds_per_subject": prep_s}}


class _PeakRss:
  """Samples the RSS of this process and its children every 50 ms."""

  def __init__(self):
    self.peak = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    me = psutil.Process()
    while not self._stop.is_set():
      total = me.memory_info().rss
      for child in me.children(recursive=True):
        try:
          total += child.memory_info().rss
        except psutil.Error:
          pass
      self.peak = max(self.peak, total)
      time.sleep(0.05)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def _memory(out, subjects, workers):
  """Streams `subjects` small UKB demo subjects once; returns (volumes, peak RSS)."""
  paths = demo.write_demo_cohort(out, subjects=subjects, seed=1, small=True, datasets=("ukb",))
  cfg = stage_config(1, paths["ukb"]["datalist"], 32)
  cfg.update(dict(batch_size=4, workers=workers, intensity="ct_window"))
  it = pipeline.make_train_iter(cfg, task="ssl", seed=0, process_index=0, process_count=1)
  steps = subjects // 2
  with _PeakRss() as rss:
    for _ in range(steps):
      next(it)
  del it
  return 2 * steps * 2, rss.peak


def _inputs(args, tmp: str) -> tuple[dict, int]:
  """{stage: datalist} and the roi edge."""
  stages = [int(s) for s in args.stages.split(",")]
  if args.small_demo:
    paths = demo.write_demo_cohort(os.path.join(tmp, "demo"), subjects=args.subjects,
                                   seed=0, small=True, datasets=("ukb", "brats"))
    ukb = paths["ukb"]["subjects"][0]
    brats = os.path.dirname(paths["brats"]["subjects"][0]["flair"])
    t1, flair, case_dir = ukb["t1"], ukb["flair"], os.path.join(tmp, "case")
    os.makedirs(case_dir)
    for m in ("flair", "t1ce", "t1", "t2", "seg"):  # the case's naming
      _link(os.path.join(brats, f"{os.path.basename(brats)}_{m}.nii.gz"),
            os.path.join(case_dir, f"case_{m}.nii.gz"))
    roi = 16
  else:
    t1, flair = (os.path.join(args.real, _MS[0], f) for f in _MS[1:])
    case_dir, roi = os.path.join(args.real, _BRATS), 0
  lists = {}
  if 1 in stages:
    lists[1] = ukb_cohort(os.path.join(tmp, "ukb"), t1, flair, args.subjects)
  if 3 in stages:
    lists[3] = brats_cohort(os.path.join(tmp, "brats"), case_dir, args.subjects)
  return lists, roi


def _pin(cores) -> None:
  """Every thread of this process (and those it starts later) onto `cores`."""
  for tid in os.listdir("/proc/self/task"):
    try:
      os.sched_setaffinity(int(tid), cores)
    except ProcessLookupError:  # the thread ended meanwhile
      pass


def _throughput(args, tmp: str) -> dict:
  """Every stage's sides, on the one core this process is pinned to."""
  import blosc2  # pylint: disable=g-import-not-at-top
  blosc2.set_nthreads(1)
  lists, roi = _inputs(args, tmp)
  results = {"core": args.core, "cpus": os.cpu_count(), "load_avg": os.getloadavg()[0]}
  for stage, datalist in lists.items():
    edge = roi or (96 if stage == 1 else 128)
    print(f"stage {stage}: {edge}^3 crops, {args.subjects} subjects, one process on "
          f"core {args.core}, {args.rounds} rounds of {args.seconds:g} s per side "
          f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    results[f"stage{stage}"] = run_stage(stage, datalist, edge, args.seconds, args.rounds,
                                         tmp, log=lambda s: print(s, flush=True))
  return results


def main(argv: list[str]) -> int:
  args = common.parse(FLAGS, argv)
  with tempfile.TemporaryDirectory(prefix="bsf_bench_data_") as tmp:
    if args.memory_only:
      volumes, peak = _memory(os.path.join(tmp, "mem"), args.memory or 100, args.workers)
      print(f"memory: streamed {volumes} small volumes with workers={args.workers}: "
            f"peak RSS (main + workers) {peak / 2**20:.0f} MiB")
      return 0
    cores = os.sched_getaffinity(0)
    _pin({args.core})
    try:
      results = _throughput(args, tmp)
    finally:  # the caller's cores back (a test runs this in process)
      _pin(cores)
    if args.memory:
      volumes, peak = _memory(os.path.join(tmp, "mem"), args.memory, args.workers)
      print(f"memory: streamed {volumes} small volumes with workers={args.workers}: "
            f"peak RSS (main + workers) {peak / 2**20:.0f} MiB")
    if args.json:
      with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
  return 0
