r"""Prepares a store (store.py) for a stage config: the deterministic part, once.

  python -m bsf_jax.data.prepare --config=configs/stage1.py \
      --config.data.datalist=/data/ukb/datalist.json --out=/data/ukb_store
  python -m bsf_jax.data.prepare --config=configs/stage3.py:dataset=brats2021 \
      --config.data.datalist=/data/brats/brats21_folds.json --out=/data/brats_store
  # then: python -m bsf_jax.main --config=... --config.data.store=/data/ukb_store

Per subject: read the NIfTI files (RAS, NaN/Inf and label checks, as the
pipeline does), compute the intensity statistics and the crop region
(`transforms.crop_region`), normalise, and write the subject's file then its
entry, each atomically. The subjects are those of the config's datalist (or
scan of `data.root`) in every split and fold, whatever `data.fraction`.

Parallel: `--process_index=i --process_count=n` takes every n-th subject
from the i-th (default from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT, so
an array job needs no flags; launch/slurm_prepare.sbatch), and `--workers`
processes share a process's part. The first process writes plan.json (the
subject list; `--plan_only` writes it and stops, so a cluster scans once);
the process that finishes last writes index.json (`--index_only` writes it
from the finished entries).

Resumable: a rerun skips every subject whose file matches the crc32 and
size its entry recorded, and redoes the others. With
`--config.data.on_error=skip` a subject that cannot be read is reported in
one line, recorded in the index as failed, and retried by the next rerun.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import multiprocessing
import os
import sys
import time

from absl import flags
import ml_collections
from ml_collections import config_flags
import numpy as np

from bsf_jax import tool_flags
from bsf_jax.data import atomic_io
from bsf_jax.data import DataError
from bsf_jax.data import datalists
from bsf_jax.data import store

FLAGS = tool_flags.flag_values(__name__)
config_flags.DEFINE_config_file(
    "config", None, "Stage config whose data chain to prepare, e.g. "
    "configs/stage1.py.", lock_config=True, flag_values=FLAGS)
flags.DEFINE_string("out", None, "Store folder (created; a rerun resumes).", flag_values=FLAGS)
flags.DEFINE_integer("process_index", None, "This process's share "
                     "(default: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, or 0).",
                     flag_values=FLAGS)
flags.DEFINE_integer("process_count", None, "Number of shares (default: "
                     "SLURM_ARRAY_TASK_COUNT, or 1).", flag_values=FLAGS)
flags.DEFINE_integer("workers", 1, "Local processes sharing this share.", flag_values=FLAGS)
flags.DEFINE_bool("plan_only", False, "Only write plan.json (the subject list).",
                  flag_values=FLAGS)
flags.DEFINE_bool("index_only", False, "Only write index.json from finished entries.",
                  flag_values=FLAGS)
flags.mark_flags_as_required(["config", "out"], flag_values=FLAGS)


def _task(data_cfg) -> str:
  return "ssl" if data_cfg.label_format == "none" else "seg"


def _plan_of(data_cfg) -> dict:
  """The store's plan: contract, source sections and subjects to prepare."""
  sections = datalists.source_sections(data_cfg)
  subjects, row, by_id = [], {}, {}
  for r in store.every_record(data_cfg, sections):
    k = store.key(r)
    if k not in row:
      row[k] = len(subjects)
      subjects.append({**r, "name": store.subject_name(r)})
    by_id[r["id"]] = row[k]
  # Each usable section record names its subject's row of the index table.
  for records in sections.values():
    for r in records:
      if r["id"] in by_id:
        r["subject"] = by_id[r["id"]]
  return {"format": store.FORMAT, "version": store.VERSION,
          "contract": store.contract(data_cfg), "source": store.source(data_cfg),
          "layout": {"chunks": store.CHUNKS, "blocks": store.BLOCKS,
                     "codec": "blosc2 lz4 clevel 5 shuffle", "dtype": "float32"},
          "sections": sections, "subjects": subjects}


def load_or_write_plan(data_cfg, out: str) -> dict:
  """plan.json of `out`, written from the config if absent, else checked."""
  path = os.path.join(out, store.PLAN)
  if os.path.isfile(path):
    plan = store.read_json(path, "store plan")
    store.check_contract(out, plan["contract"], data_cfg)
    if plan["source"] != store.source(data_cfg):
      raise store.StoreError(
          f"{out}: planned from {json.dumps(plan['source'], sort_keys=True)}, "
          f"but this run names {json.dumps(store.source(data_cfg), sort_keys=True)} "
          f"(data.datalist / data.root / scan rule); use another --out")
    return plan
  plan = _plan_of(data_cfg)
  atomic_io.write_text(path, json.dumps(plan))
  return plan


def _padded(x: np.ndarray, origin: np.ndarray, shape: np.ndarray) -> np.ndarray:
  """x placed at -origin in zeros of `shape` (+ x's trailing axes)."""
  out = np.zeros(tuple(shape) + x.shape[3:], x.dtype)
  lo = -origin
  out[lo[0]:lo[0] + x.shape[0], lo[1]:lo[1] + x.shape[1], lo[2]:lo[2] + x.shape[2]] = x
  return out


def prepare_subject(record: dict, spec) -> tuple[dict[str, np.ndarray], dict]:
  """(arrays, entry) of one subject.

  Arrays: "image", the normalised (H', W', D', C) float32 volume zero-padded
  to cover the crop region, and for segmentation "regions" (..., K) and the
  raw "label" on the same grid; `entry["origin"]` is the volume voxel of the
  grid's [0, 0, 0].

  Raises:
    DataError: naming the subject's file(s) and the problem.
  """
  from bsf_jax.data import labels as L  # pylint: disable=g-import-not-at-top
  from bsf_jax.data import crops  # pylint: disable=g-import-not-at-top
  loaded = crops.load_record(record, spec)
  chans, label = loaded.chans, loaded.label
  try:
    params, start, size = crops.intensity_and_region(loaded, spec)
  except DataError as e:  # e.g. no foreground: name the record's files
    raise DataError(f"{', '.join(record['image'])}: {e}") from e
  shape = np.asarray(chans[0].shape)
  origin = np.minimum(start, 0)
  grid = np.maximum(shape, start + size) - origin
  arrays = {"image": _padded(spec.intensity.apply(np.stack(chans, -1), params),
                             origin, grid)}
  if label is not None:
    arrays["regions"] = _padded(L.to_channels(label, spec.labels), origin, grid)
    small = label.astype(np.uint8)
    arrays["label"] = _padded(small if np.array_equal(small, label) else label,
                              origin, grid)
  entry = {"id": record["id"], "image": record["image"], "label": record["label"],
           "name": record["name"], "shape": shape.tolist(), "origin": origin.tolist(),
           "channels": len(chans),
           "box": {"start": [int(v) for v in start], "size": [int(v) for v in size]},
           "stats": [np.asarray(p).tolist() for p in params],
           "affine": loaded.affine.tolist()}
  return arrays, entry


def _finished(out: str, subject: dict) -> dict | None:
  """The subject's entry if its files are there and match it, else None."""
  path = store.entry_path(out, subject["name"])
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    entry = json.load(f)
  if "error" in entry:
    return None  # Failed last time: try again.
  for name, recorded in entry["files"].items():
    data = store.array_path(out, subject["name"], name)
    if (not os.path.isfile(data)
        or store.file_crc32(data) != (recorded["crc32"], recorded["bytes"])):
      return None
  return entry


@functools.lru_cache(maxsize=2)
def _spec(data_cfg_json: str):
  """(config.data, pipeline spec) of a prepare run, built once per process."""
  from bsf_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  data_cfg = ml_collections.ConfigDict(json.loads(data_cfg_json))
  return data_cfg, pipeline.crop_spec(data_cfg, _task(data_cfg))


def _one(out: str, subject: dict, data_cfg_json: str) -> tuple[str, str]:
  """Prepares one subject unless finished: (status, message) for the log."""
  data_cfg, spec = _spec(data_cfg_json)
  if _finished(out, subject) is not None:
    return "verified", subject["id"]
  t0 = time.perf_counter()
  try:
    arrays, entry = prepare_subject(subject, spec)
  except DataError as e:
    if data_cfg.on_error != "skip":
      raise
    atomic_io.write_text(store.entry_path(out, subject["name"]),
                         json.dumps({**subject, "error": str(e)}))
    return "skipped", f"{subject['id']}: {e}"
  entry["files"] = {}
  for name, array in arrays.items():
    path = store.array_path(out, subject["name"], name)
    with atomic_io.atomic_path(path) as tmp:
      store.write_array(tmp, array)
    crc, size = store.file_crc32(path)
    entry["files"][name] = {"crc32": crc, "bytes": size}
  atomic_io.write_text(store.entry_path(out, subject["name"]), json.dumps(entry))
  stored = sum(f["bytes"] for f in entry["files"].values())
  nifti = sum(os.path.getsize(p) for p in subject["image"] + [subject["label"]] if p)
  return "prepared", (f"{subject['id']} in {time.perf_counter() - t0:.2f} s: "
                      f"{stored / 2**20:.1f} MiB (NIfTI {nifti / 2**20:.1f} MiB)")


def build_index(out: str, plan: dict) -> bool:
  """Writes index.json when every planned subject has an entry; True if so."""
  paths = [store.entry_path(out, s["name"]) for s in plan["subjects"]]
  if not all(os.path.isfile(p) for p in paths):
    return False
  entries = []
  for p in paths:
    with open(p) as f:
      entries.append(json.load(f))
  index = {k: plan[k] for k in ("format", "version", "contract", "source",
                                "layout", "sections")}
  # One list per column (store.COLUMNS), one value per subject: a compact
  # file that loads fast at 82,800 subjects.
  ok = lambda e, f: None if "error" in e else f(e)
  index["subjects"] = {
      "id": [e["id"] for e in entries], "name": [e["name"] for e in entries],
      "shape": [ok(e, lambda e: e["shape"]) for e in entries],
      "origin": [ok(e, lambda e: e["origin"]) for e in entries],
      "box": [ok(e, lambda e: e["box"]["start"] + e["box"]["size"]) for e in entries],
      "channels": [ok(e, lambda e: e["channels"]) for e in entries],
      "files": [ok(e, lambda e: e["files"]) for e in entries],
      "error": [e.get("error") for e in entries]}
  atomic_io.write_text(os.path.join(out, store.INDEX), json.dumps(index))
  return True


def share(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(index, count) of this process: the flags, else the SLURM array's."""
  env = os.environ
  if process_count is None:
    process_count = int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
  if process_index is None:
    process_index = (int(env.get("SLURM_ARRAY_TASK_ID", 0))
                     - int(env.get("SLURM_ARRAY_TASK_MIN", 0)))
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} outside 0..{process_count - 1}")
  return process_index, process_count


def run(data_cfg, out: str, *, process_index: int = 0, process_count: int = 1,
        workers: int = 1, plan_only: bool = False, index_only: bool = False,
        log=print) -> dict:
  """Prepares this process's share of the store at `out`.

  Returns:
    Counts {"prepared", "verified", "skipped", "subjects", "index": bool}.

  Raises:
    DataError: a subject could not be read and data.on_error="raise".
    store.StoreError: `out` holds a store planned for another config.
  """
  out = os.path.abspath(out)
  # Prepare reads the NIfTI files themselves: no .npy cache, no store.
  data_cfg = ml_collections.ConfigDict(data_cfg.to_dict())
  data_cfg.update(dict(cache_dir="", store=""))
  plan = load_or_write_plan(data_cfg, out)
  counts = {"prepared": 0, "verified": 0, "skipped": 0,
            "subjects": len(plan["subjects"]), "index": False}
  if plan_only:
    log(f"{out}: planned {len(plan['subjects'])} subjects")
    return counts
  if not index_only:
    mine = plan["subjects"][process_index::process_count]
    cfg_json = data_cfg.to_json()
    log(f"{out}: process {process_index} of {process_count}: {len(mine)} of "
        f"{len(plan['subjects'])} subjects, {workers} worker(s)")
    if workers > 1:
      ctx = multiprocessing.get_context("spawn")
      with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        results = pool.map(_one, [out] * len(mine), mine, [cfg_json] * len(mine),
                           chunksize=1)
        for status, message in results:
          counts[status] += 1
          if status != "verified":
            log(f"{status} {message}")
    else:
      for subject in mine:
        status, message = _one(out, subject, cfg_json)
        counts[status] += 1
        if status != "verified":
          log(f"{status} {message}")
    log(f"{out}: {counts['prepared']} prepared, {counts['verified']} already "
        f"done (verified), {counts['skipped']} skipped")
  counts["index"] = build_index(out, plan)
  if counts["index"]:
    log(f"{out}: wrote {store.INDEX} ({len(plan['subjects'])} subjects)")
  else:
    log(f"{out}: {store.INDEX} not written yet: other processes' subjects "
        f"are unfinished (the last to finish writes it; or rerun with "
        f"--index_only)")
  return counts


def main(argv=None):
  """The command line (module docstring); argv: the words after the program name."""
  tool_flags.parse(FLAGS, argv)
  try:
    index, count = share(FLAGS.process_index, FLAGS.process_count)
    run(FLAGS.config.data, FLAGS.out, process_index=index, process_count=count,
        workers=FLAGS.workers, plan_only=FLAGS.plan_only, index_only=FLAGS.index_only)
  except (DataError, store.StoreError, atomic_io.OutputError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  tool_flags.run(main)
