"""Data pipeline benchmark: stage-1 crops/s, bsf_jax (Grain) vs MONAI.

    python -m bsf_jax.bench data [--demo DIR] [--subjects 8] [--workers 2]
        [--epochs 2] [--roi 96] [--cache] [--memory N] [--memory-only]

Both sides read the same full-size UKB-layout demo files (T1 + T2-FLAIR,
182x218x182 float32 .nii.gz) with the same worker count, in the same run,
through the reference stage-1 chain: load, RAS, ScaleIntensityRange(-1000,
1000 -> 0..1, clip), SpatialPad(roi), CropForeground(k_divisible=roi),
RandSpatialCropSamples(roi, num_samples=2). MONAI runs `monai.data.Dataset` +
`DataLoader`; bsf_jax runs `make_train_iter`. Throughput counts roi crops
delivered per second after the first batch (worker start-up excluded on
both sides). `--cache` adds a bsf_jax run over a warm `data.cache_dir`.
`--memory N` also streams N small demo subjects (2N volumes) and reports the
peak RSS of the main process plus its workers.
"""

import argparse
import os
import tempfile
import threading
import time

import psutil

from bsf_jax.data import demo
from bsf_jax.data import pipeline


def _config(datalist, roi, workers, cache_dir=""):
  cfg = pipeline.default_config()
  cfg.update(dict(dataset="ukb", datalist=datalist, modalities=("t1", "flair"),
                  roi=(roi,) * 3, num_samples=2, batch_size=2, workers=workers,
                  intensity="ct_window", a_min=-1000.0, a_max=1000.0, val_fraction=0.0,
                  cache_dir=cache_dir, prefetch=2))
  return cfg


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


def _time_bsf(cfg, n_volumes):
  """Crops/s of `make_train_iter` over n_volumes after the first batch."""
  it = pipeline.make_train_iter(cfg, task="ssl", seed=0, process_index=0, process_count=1)
  batch = next(it)
  crops = 0
  t0 = time.perf_counter()
  for _ in range(n_volumes - 1):
    batch = next(it)
    crops += batch["image"].shape[0]
  dt = time.perf_counter() - t0
  assert batch["image"].shape[1:] == (*cfg.roi, 2), batch["image"].shape
  del it
  return crops / dt


def _time_monai(datalist, roi, workers, n_volumes):
  """Crops/s of the reference MONAI chain over n_volumes after the first batch."""
  import torch
  from monai import data as md
  from monai import transforms as mt
  from bsf_jax.data import datalists
  records = datalists.json_records(datalist)["training"]
  files = [{"image": r["image"]} for r in records]
  files = (files * (n_volumes // len(files) + 2))[: n_volumes + 1]
  chain = mt.Compose([
      mt.LoadImaged(keys=["image"], image_only=True),
      mt.EnsureChannelFirstd(keys=["image"]),
      mt.Orientationd(keys=["image"], axcodes="RAS"),
      mt.ScaleIntensityRanged(keys=["image"], a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0,
                              clip=True),
      mt.SpatialPadd(keys=["image"], spatial_size=[roi] * 3),
      mt.CropForegroundd(keys=["image"], source_key="image", k_divisible=[roi] * 3),
      mt.RandSpatialCropSamplesd(keys=["image"], roi_size=[roi] * 3, num_samples=2,
                                 random_center=True, random_size=False),
      mt.ToTensord(keys=["image"]),
  ])
  chain.set_random_state(seed=0)
  torch.set_num_threads(1)
  loader = md.DataLoader(md.Dataset(files, transform=chain), batch_size=1, shuffle=False,
                         num_workers=workers)
  it = iter(loader)
  batch = next(it)
  crops = 0
  t0 = time.perf_counter()
  for batch in it:
    crops += batch["image"].shape[0]
  dt = time.perf_counter() - t0
  assert tuple(batch["image"].shape[1:]) == (2, roi, roi, roi), batch["image"].shape
  return crops / dt


def _memory(out, subjects, workers):
  """Streams `subjects` small UKB demo subjects once; returns (volumes, peak RSS)."""
  paths = demo.write_demo_cohort(out, subjects=subjects, seed=1, small=True, datasets=("ukb",))
  cfg = _config(paths["ukb"]["datalist"], 32, workers)
  cfg.batch_size = 4
  it = pipeline.make_train_iter(cfg, task="ssl", seed=0, process_index=0, process_count=1)
  steps = subjects // 2
  with _PeakRss() as rss:
    for _ in range(steps):
      next(it)
  del it
  return 2 * steps * 2, rss.peak


def main(argv) -> int:
  parser = argparse.ArgumentParser(prog=argv[0], description=__doc__.split("\n")[0])
  parser.add_argument("--demo", default="", help="demo cohort folder (made if missing)")
  parser.add_argument("--subjects", type=int, default=8)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--epochs", type=int, default=2, help="passes over the subjects")
  parser.add_argument("--roi", type=int, default=96)
  parser.add_argument("--cache", action="store_true", help="also time a warm .npy cache")
  parser.add_argument("--memory", type=int, default=0, help="stream N small subjects, peak RSS")
  parser.add_argument("--memory-only", action="store_true", help="skip the throughput comparison")
  args = parser.parse_args(argv[1:])
  tmp = tempfile.TemporaryDirectory(prefix="bsf_bench_data_")
  if args.memory_only:
    args.memory = args.memory or 100
    volumes, peak = _memory(os.path.join(tmp.name, "mem"), args.memory, args.workers)
    print(f"memory: streamed {volumes} small volumes with workers={args.workers}: "
          f"peak RSS (main + workers) {peak / 2**20:.0f} MiB")
    tmp.cleanup()
    return 0
  folder = args.demo or os.path.join(tmp.name, "demo")
  datalist = os.path.join(folder, "ukb", "ukb_datalist.json")
  if not os.path.isfile(datalist):
    t0 = time.time()
    demo.write_demo_cohort(folder, subjects=args.subjects, seed=0, datasets=("ukb",))
    print(f"demo cohort: {args.subjects} UKB subjects written in {time.time() - t0:.1f}s")
  n_train = len(pipeline.datalists.json_records(datalist)["training"])
  n_volumes = args.epochs * n_train
  print(f"stage-1 chain, roi {args.roi}^3, 2 crops/volume, T1+FLAIR 182x218x182, "
        f"{n_volumes} volumes, workers={args.workers}, cpus={os.cpu_count()}")
  ours = _time_bsf(_config(datalist, args.roi, args.workers), n_volumes)
  print(f"bsf_jax (Grain):           {ours:7.2f} crops/s")
  ref = _time_monai(datalist, args.roi, args.workers, n_volumes)
  print(f"MONAI Dataset+DataLoader:  {ref:7.2f} crops/s")
  print(f"ratio bsf_jax / MONAI:     {ours / ref:7.2f}x (higher is better)")
  if args.cache:
    cache = os.path.join(tmp.name, "cache")
    cfg = _config(datalist, args.roi, args.workers, cache)
    _time_bsf(cfg, n_train + 1)  # fills the cache
    cached = _time_bsf(cfg, n_volumes)
    print(f"bsf_jax, warm .npy cache:  {cached:7.2f} crops/s ({cached / ref:.2f}x MONAI)")
  if args.memory:
    volumes, peak = _memory(os.path.join(tmp.name, "mem"), args.memory, args.workers)
    print(f"memory: streamed {volumes} small volumes with workers={args.workers}: "
          f"peak RSS (main + workers) {peak / 2**20:.0f} MiB")
  tmp.cleanup()
  return 0
