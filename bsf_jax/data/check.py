"""Scan a dataset for bad files before a long run.

    python -m bsf_jax.data.check --datalist JSON [--root DIR] [--workers N]
    python -m bsf_jax.data.check --dataset brats --root DIR   # scan, no json

Reads every image and label of every section of the datalist (UKB, BraTS folds
or any MONAI-style json), or of a directory scan in the dataset's layout
(UKB, BraTS 2018-2021 or 2023+, ATLAS), and lists each problem by file: missing file,
truncated/corrupt gzip, not NIfTI, not 3D, NaN/Inf voxels, empty (all-zero)
volume, modalities of different shapes, label shape mismatch, label values
outside the expected set. Volumes smaller than the roi are reported as notes
(the pipeline pads them). Exits 1 if any problem was found, 0 otherwise.
"""

import multiprocessing
import os
import re
import sys
import time

from absl import app, flags
import numpy as np

from bsf_jax import tool_flags
from bsf_jax.data import DataError
from bsf_jax.data import datalists
from bsf_jax.data import io
from bsf_jax.data import labels as L

# `--label-format` choices: a convention, "none", or "auto" (from file names).
LABEL_FORMATS = ("auto", "none", *L.CONVENTIONS, *L.ALIASES)

FLAGS = tool_flags.flag_values(__name__)
flags.DEFINE_string("datalist", "", "datalist json (or --dataset + --root)", flag_values=FLAGS)
flags.DEFINE_string("root", "", "base of relative paths (default: json folder); without "
                    "--datalist, the folder to scan", flag_values=FLAGS)
flags.DEFINE_enum("dataset", "", ("", "ukb", "brats", "atlas"),
                  "layout of --root to scan when there is no --datalist", flag_values=FLAGS)
flags.DEFINE_integer("workers", 0, "reader processes (0: in process)", flag_values=FLAGS)
flags.DEFINE_enum("label-format", "auto", LABEL_FORMATS,
                  "label convention; auto: BraTS 2021 for *_seg, 2023 for *-seg, else ATLAS",
                  flag_values=FLAGS)
flags.DEFINE_string("roi", "", "e.g. 96,96,96: note volumes smaller than this", flag_values=FLAGS)


def auto_label_format(label_path: str) -> str:
  """Convention from a label file name: BraTS 2018-2021 `_seg`, 2023+ `-seg`."""
  name = os.path.basename(label_path)
  if re.search(r"_seg\.nii", name):
    return "brats2021"
  if re.search(r"-seg\.nii", name):
    return "brats2023"
  return "atlas"


def _read(path, problems):
  try:
    return io.read_volume(path)
  except DataError as e:
    problems.append(str(e))
  except Exception as e:  # Anything else still names the file; never crash the scan.
    problems.append(f"{path}: unexpected {type(e).__name__}: {e}")
  return None


def check_record(record: dict, label_format: str = "auto",
                 roi=None) -> tuple[list[str], list[str]]:
  """All problems (and notes) of one record; each message starts with a path.

  Args:
    record: {"image": [paths], "label": path or ""}.
    label_format: a convention of `labels.CONVENTIONS`, "none", or "auto"
      (`auto_label_format`: from the label's file name).
    roi: optional crop size; smaller volumes give a note.

  Returns:
    (problems, notes).
  """
  problems, notes = [], []
  vols = [v for v in (_read(p, problems) for p in record["image"]) if v is not None]
  for v in vols:
    if not np.any(v.data != 0):
      problems.append(f"{v.path}: empty volume (all voxels are 0)")
    if roi is not None and any(s < r for s, r in zip(v.data.shape, roi)):
      notes.append(f"{v.path}: shape {v.data.shape} smaller than roi {tuple(roi)} (will be padded)")
  for v in vols[1:]:
    if v.data.shape != vols[0].data.shape:
      problems.append(f"{v.path}: shape {v.data.shape} differs from {vols[0].path} "
                      f"{vols[0].data.shape}")
  label = record.get("label", "")
  if label:
    if label_format == "auto":
      label_format = auto_label_format(label)
    lab = _read(label, problems)
    if lab is not None:
      if vols and lab.data.shape != vols[0].data.shape:
        problems.append(f"{label}: label shape {lab.data.shape} differs from image "
                        f"{vols[0].path} {vols[0].data.shape}")
      conv = L.get(label_format)
      if conv is not None:
        try:
          L.check_values(lab.data, conv, label)
        except DataError as e:
          problems.append(str(e))
  return problems, notes


def _check(args):
  record, label_format, roi = args
  return record, *check_record(record, label_format, roi)


def scan_records(dataset: str, root: str) -> list[dict]:
  """Every record of a directory scan in `dataset`'s layout."""
  if dataset == "ukb":
    return datalists.ukb_scan(root, min_slices=0)
  if dataset == "brats":
    return datalists.brats_scan(root)
  if dataset == "atlas":
    return datalists.atlas_scan(root)
  raise ValueError(f"--dataset {dataset!r}; expected ukb, brats or atlas")


def run_check(datalist: str, root: str = "", workers: int = 0, label_format: str = "auto",
              roi=None, out=sys.stdout, dataset: str = "") -> int:
  """Checks every record of `datalist` (or, without one, of a scan of `root`
  in `dataset`'s layout); prints problems; returns the count."""
  source = datalist or root
  try:
    if datalist:
      sections = datalists.json_records(datalist, root)
      records = [r for recs in sections.values() for r in recs]
    else:
      records = scan_records(dataset, root)
  except DataError as e:
    print(f"PROBLEM {e}", file=out)
    return 1
  if not records:
    print(f"PROBLEM {source}: empty datalist (no records found)", file=out)
    return 1
  jobs = [(r, label_format, roi) for r in records]
  n_problems = n_notes = 0
  t0 = time.time()
  pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 0 else None
  try:
    results = pool.imap(_check, jobs, chunksize=1) if pool else map(_check, jobs)
    for record, problems, notes in results:
      for p in problems:
        print(f"PROBLEM [{record['id']}] {p}", file=out)
      for n in notes:
        print(f"note    [{record['id']}] {n}", file=out)
      n_problems += len(problems)
      n_notes += len(notes)
  finally:
    if pool:
      pool.close()
      pool.join()
  n_files = sum(len(r["image"]) + bool(r.get("label")) for r in records)
  print(f"checked {len(records)} records ({n_files} files) from {source} in "
        f"{time.time() - t0:.1f}s: {n_problems} problems, {n_notes} notes", file=out)
  return n_problems


def main(argv=None) -> int:
  """The command line (module docstring); argv: the words after the program name."""
  tool_flags.parse(FLAGS, argv)
  roi = tuple(int(r) for r in FLAGS.roi.split(",")) if FLAGS.roi else None
  if not FLAGS.datalist and not (FLAGS.dataset and FLAGS.root):
    raise app.UsageError("give --datalist JSON, or --dataset and --root to scan a folder")
  return 1 if run_check(FLAGS.datalist, FLAGS.root, FLAGS.workers, FLAGS["label-format"].value,
                        roi, dataset=FLAGS.dataset) else 0


if __name__ == "__main__":
  tool_flags.run(main)
