"""Datalists: which files make up the training and validation sets.

A record is a plain dict (picklable, cheap for Grain to index):
  {"id": str, "image": [path per selected modality, in the requested order],
   "label": path or ""}.

Sources (`config.data.dataset`):
* ukb: BrainSegFounder's json `{"training": [{"image": [t1, t2_flair]}],
  "validation": [...]}`, or a scan of the UKB layout with the paper's rule
  (both modalities present, >= 100 slices).
* brats: the folds json `{"training": [{"fold": k, "image": [4], "label"}]}`,
  fold k is validation; or a scan with seeded folds of subject folders in
  either layout, 2018-2021 `BraTS2021_00000/BraTS2021_00000_{flair,t1ce,t1,
  t2,seg}.nii.gz` or 2023+ `BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t2f,t1c,
  t1n,t2w,seg}.nii.gz` (any challenge: GLI, MEN, MET, PED, SSA).
* atlas: a BIDS scan, seeded train/held-out split.
Few-shot subsets (`fraction`, `repeat_seed`) are drawn from the training part.
"""

import glob
import json
import os
import re

import numpy as np

from bsf_jax.data import DataError

# Canonical modality names and on-disk order per dataset. BraTS order is the
# one of the MONAI/BrainSegFounder folds json.
MODALITIES = {
    "ukb": ("t1", "flair"),
    "brats": ("flair", "t1ce", "t1", "t2"),
    "atlas": ("t1",),
}
_ALIASES = {
    "ukb": {"t1": ("t1",), "t1w": ("t1",), "t2": ("flair",), "flair": ("flair",),
            "t2_flair": ("flair",), "t2flair": ("flair",), "t1t2": ("t1", "flair")},
    # BraTS 2023+ file names (t2f, t1c, t1n, t2w) are the same four scans.
    "brats": {"flair": ("flair",), "t1ce": ("t1ce",), "t1gd": ("t1ce",),
              "t1": ("t1",), "t2": ("t2",), "t2f": ("flair",), "t1c": ("t1ce",),
              "t1n": ("t1",), "t2w": ("t2",), "all": MODALITIES["brats"]},
    "atlas": {"t1": ("t1",), "t1w": ("t1",)},
}
UKB_T1 = os.path.join("T1", "T1_brain_to_MNI.nii.gz")
UKB_FLAIR = os.path.join("T2_FLAIR", "T2_FLAIR_brain_to_MNI.nii.gz")
ATLAS_MASK_SUFFIX = "_label-L_desc-T1lesion_mask.nii.gz"
# File-name suffix of each BraTS modality: 2018-2021 layout, 2023+ layout.
BRATS_SUFFIXES = {
    "brats2021": {"flair": "_flair", "t1ce": "_t1ce", "t1": "_t1", "t2": "_t2",
                  "seg": "_seg"},
    "brats2023": {"flair": "-t2f", "t1ce": "-t1c", "t1": "-t1n", "t2": "-t2w",
                  "seg": "-seg"},
}
_BRATS_SUFFIX = re.compile(r"(_flair|_t1ce|_t1|_t2|-t2f|-t1c|-t1n|-t2w)\.nii(\.gz)?$")


def resolve_modalities(dataset: str, modalities) -> tuple[str, ...]:
  """Canonical modality names for a selection such as "T1T2" or ("t1ce", "t2").

  Args:
    dataset: "ukb", "brats" or "atlas".
    modalities: a name, a preset ("T1", "T2", "T1T2", "all") or a sequence.

  Returns:
    Tuple of canonical names in the requested order.
  """
  if dataset not in MODALITIES:
    raise ValueError(f"data.dataset={dataset!r}; expected one of {tuple(MODALITIES)}")
  names = [modalities] if isinstance(modalities, str) else list(modalities)
  out = []
  for name in names:
    key = name.lower()
    if key not in _ALIASES[dataset]:
      raise ValueError(f"modality {name!r} unknown for {dataset}; "
                       f"choose from {sorted(_ALIASES[dataset])}")
    out.extend(_ALIASES[dataset][key])
  if not out or len(set(out)) != len(out):
    raise ValueError(f"modalities {modalities!r} for {dataset}: empty or repeated")
  return tuple(out)


def _resolve(path: str, base: str) -> str:
  return path if os.path.isabs(path) or not base else os.path.join(base, path)


def _pick(images, dataset, wanted, where):
  """Selects `wanted` modalities from a record's image list."""
  canon = MODALITIES[dataset]
  if len(images) != len(canon):
    raise DataError(f"{where}: expected {len(canon)} images {list(canon)}, "
                    f"got {len(images)}")
  by_name = dict(zip(canon, images))
  if dataset == "brats":
    # Real fold files are not always in canonical order: trust the suffix.
    for p in images:
      m = _BRATS_SUFFIX.search(os.path.basename(p))
      if m:
        by_name[brats_modality(m.group(1))] = p
  return [by_name[m] for m in wanted]


def read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise DataError(f"{path}: datalist file not found")
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: not valid json ({e})") from e


def json_records(path: str, root: str = "") -> dict[str, list[dict]]:
  """All sections of a datalist json, every image kept, paths resolved.

  Relative paths are taken against `root`, or the json's folder if unset.
  """
  data = read_json(path)
  base = root or os.path.dirname(os.path.abspath(path))
  sections = {}
  for name, items in data.items():
    if not isinstance(items, list):
      continue
    recs = []
    for i, item in enumerate(items):
      if not isinstance(item, dict) or "image" not in item:
        raise DataError(f"{path}: {name}[{i}] has no 'image' entry")
      images = item["image"] if isinstance(item["image"], list) else [item["image"]]
      label = item.get("label", "")
      # Scans write their subject ids (`run_datalist`); splits sort by id.
      recs.append({"id": str(item.get("id", f"{name}[{i}]")),
                   "image": [_resolve(p, base) for p in images],
                   "label": _resolve(label, base) if label else "",
                   "fold": int(item.get("fold", -1))})
    sections[name] = recs
  return sections


def ukb_scan(root: str, min_slices: int = 100) -> list[dict]:
  """UKB layout scan with the paper's rule: T1 and FLAIR both present, >= 100 slices."""
  from bsf_jax.data import io  # nibabel only when scanning.
  records = []
  for t1_dir in sorted(glob.glob(os.path.join(root, "*_20252_2_0"))):
    eid = os.path.basename(t1_dir).split("_")[0]
    t1 = os.path.join(t1_dir, UKB_T1)
    flair = os.path.join(root, f"{eid}_20253_2_0", UKB_FLAIR)
    if not (os.path.isfile(t1) and os.path.isfile(flair)):
      continue
    try:
      if min(io.header_shape(t1)[2], io.header_shape(flair)[2]) < min_slices:
        continue
    except DataError:
      pass  # Unreadable headers stay in, so the check and pipeline report them.
    records.append({"id": eid, "image": [t1, flair], "label": ""})
  return sorted(records, key=lambda r: r["id"])


def brats_modality(suffix: str) -> str:
  """Canonical modality of a BraTS file suffix such as "_t1ce" or "-t1c"."""
  for suffixes in BRATS_SUFFIXES.values():
    for name, suf in suffixes.items():
      if suf == suffix:
        return name
  raise KeyError(suffix)


def brats_layout(subject_dir: str) -> str:
  """"brats2021" or "brats2023": which file naming a subject folder uses."""
  sid = os.path.basename(os.path.normpath(subject_dir))
  for layout, suffixes in BRATS_SUFFIXES.items():
    if glob.glob(os.path.join(subject_dir, f"{sid}{suffixes['flair']}.nii*")):
      return layout
  raise DataError(f"{subject_dir}: no {sid}_flair.nii.gz (BraTS 2018-2021) or "
                  f"{sid}-t2f.nii.gz (BraTS 2023+) in this subject folder")


def brats_subject(subject_dir: str) -> dict:
  """One BraTS subject folder (either layout) -> record, canonical order."""
  sid = os.path.basename(os.path.normpath(subject_dir))
  suffixes = BRATS_SUFFIXES[brats_layout(subject_dir)]
  path = lambda k: os.path.join(subject_dir, f"{sid}{suffixes[k]}.nii.gz")
  label = path("seg")
  return {"id": sid, "label": label if os.path.exists(label) else "",
          "image": [path(m) for m in MODALITIES["brats"]]}


def brats_scan(root: str, num_folds: int = 5, seed: int = 0) -> list[dict]:
  """BraTS scan (2018-2021 or 2023+ layout); seeded folds 0..num_folds-1.

  Subject folders are found at `root/`, one level below it (the challenge
  zips unpack to `TrainingData/` or `ASNR-MICCAI-BraTS2023-GLI-Challenge-
  TrainingData/`), or `root` itself.
  """
  pattern = re.compile(r"^(BraTS20\d\d_|Brats\d\d_|BraTS-[A-Z]+-)")
  dirs = {os.path.normpath(d) for g in ("*", os.path.join("*", "*"))
          for d in glob.glob(os.path.join(root, g))
          if os.path.isdir(d) and pattern.match(os.path.basename(d))}
  if not dirs and pattern.match(os.path.basename(os.path.normpath(root))):
    dirs = {os.path.normpath(root)}
  subjects = sorted(dirs, key=os.path.basename)
  order = np.random.default_rng(seed).permutation(len(subjects))
  records = []
  for rank, i in enumerate(order):
    records.append({**brats_subject(subjects[i]), "fold": rank % num_folds})
  return sorted(records, key=lambda r: r["id"])


def atlas_scan(root: str) -> list[dict]:
  """ATLAS v2.0 BIDS scan: every `sub-*_T1w.nii.gz` with its lesion mask."""
  t1s = sorted(glob.glob(os.path.join(root, "**", "sub-*_T1w.nii.gz"), recursive=True))
  return [{"id": os.path.basename(p).split("_")[0], "image": [p],
           "label": p[: -len("_T1w.nii.gz")] + ATLAS_MASK_SUFFIX} for p in t1s]


def scan_settings(cfg) -> dict:
  """The `config.data` fields a directory scan's result depends on."""
  settings = {"dataset": cfg.dataset, "root": os.path.abspath(cfg.root)}
  if cfg.dataset == "ukb":
    settings["min_slices"] = int(cfg.min_slices)
  elif cfg.dataset == "brats":
    settings["split_seed"] = int(cfg.split_seed)  # draws the folds
  return settings


def scan(cfg) -> list[dict]:
  """Every subject a scan of `cfg.root` finds, all modalities, sorted by id.

  Raises:
    DataError: the scan finds no subject.
  """
  if cfg.dataset == "ukb":
    records = ukb_scan(cfg.root, cfg.min_slices)
  elif cfg.dataset == "brats":
    records = brats_scan(cfg.root, seed=cfg.split_seed)
  elif cfg.dataset == "atlas":
    records = atlas_scan(cfg.root)
  else:
    raise ValueError(f"data.dataset={cfg.dataset!r}; expected one of {tuple(MODALITIES)}")
  if not records:
    raise DataError(f"{cfg.root}: no {cfg.dataset} subjects found (data.root; "
                    "docs/data.md has the layouts)")
  return sorted(records, key=lambda r: r["id"])


# A run without a datalist scans its data once and keeps the result here.
RUN_DATALIST = "datalist.json"
# How long the other processes wait for process 0's scan.
SCAN_TIMEOUT_S = 4 * 3600


def run_datalist(cfg, workdir: str) -> str:
  """The datalist json of a run that has none: one directory scan per run.

  Process 0 scans `cfg.root` and writes every subject found, with absolute
  paths, ids and (BraTS) folds, to WORKDIR/datalist.json (atomically), so
  `load_datalist` reads from it exactly the records a scan gives. The other
  processes wait for it and read it; none of them scans. A later start of
  the same run (a resume, a requeue) reads the file again instead of
  scanning, so it resumes over the same records; a changed `scan_settings`
  scans again. Delete the file to pick up new subjects.

  Args:
    cfg: the `config.data` block (`datalist` unset).
    workdir: the run's workdir (shared by all processes).

  Returns:
    The path to set as `cfg.datalist`.

  Raises:
    DataError: the scan failed or found nothing (on every process).
  """
  import jax  # Only here: process topology and the wait for process 0.
  from bsf_jax.data import atomic_io
  path = os.path.join(os.path.abspath(workdir), RUN_DATALIST)
  # Why process 0's scan failed, for the other processes to say too.
  reason_path = path + ".error"
  error = None
  if jax.process_index() == 0:
    try:
      _scan_once(cfg, path)
    except Exception as e:  # pylint: disable=broad-exception-caught
      error = e  # Raised below, once the others know.
    if error is not None and jax.process_count() > 1:
      atomic_io.write_text(reason_path, f"{error}\n")
    elif os.path.exists(reason_path):
      os.remove(reason_path)
  if jax.process_count() > 1:
    # The scan may take minutes: the others wait at the distributed client's
    # barrier, which has a timeout, not in a device collective.
    from jax.experimental import multihost_utils
    from orbax.checkpoint import multihost
    multihost.get_barrier_sync_fn()(key=f"bsf_jax_run_datalist:{path}",
                                    timeout_ms=SCAN_TIMEOUT_S * 1000)
    ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not ok and error is None:
      try:
        with open(reason_path) as f:
          reason = f.read().strip()
      except OSError:
        reason = "its log says why"
      error = DataError(f"{path}: process 0 could not scan {cfg.root}: {reason}")
  if error is not None:
    raise error
  return path


def _scan_once(cfg, path: str) -> None:
  """Process 0: keeps `path` if it holds the same scan, else scans into it."""
  import logging
  from bsf_jax.data import atomic_io
  settings = scan_settings(cfg)
  if os.path.isfile(path):
    previous = read_json(path).get("scan")
    if previous == settings:
      logging.info("Datalist %s: this run's scan of %s, reused (delete it to "
                   "scan again)", path, settings["root"])
      return
    logging.warning("Datalist %s was scanned with %s; scanning again with %s",
                    path, previous, settings)
  records = scan(cfg)
  training = [{**r, "image": [os.path.abspath(p) for p in r["image"]],
               "label": os.path.abspath(r["label"]) if r["label"] else ""}
              for r in records]
  atomic_io.write_text(path, json.dumps({"scan": settings, "training": training},
                                        indent=1))
  logging.info("Datalist %s: %d subjects scanned in %s", path, len(training),
               settings["root"])


def split(records, val_fraction: float, seed: int):
  """Seeded train/held-out split (order-independent: sorted by id first)."""
  records = sorted(records, key=lambda r: r["id"])
  n_val = int(round(val_fraction * len(records)))
  if val_fraction > 0 and len(records) > 1:
    n_val = min(max(n_val, 1), len(records) - 1)
  held = set(np.random.default_rng(seed).permutation(len(records))[:n_val].tolist())
  train = [r for i, r in enumerate(records) if i not in held]
  val = [r for i, r in enumerate(records) if i in held]
  return train, val


def few_shot(records, fraction: float, repeat_seed: int):
  """Deterministic subset: round(fraction * n) records (>= 1), drawn with repeat_seed."""
  if not 0 < fraction <= 1:
    raise ValueError(f"data.fraction={fraction}; expected 0 < fraction <= 1")
  if fraction == 1:
    return list(records)
  n = max(1, int(round(fraction * len(records))))
  keep = np.sort(np.random.default_rng(repeat_seed).permutation(len(records))[:n])
  return [records[i] for i in keep]


def source_sections(cfg) -> dict[str, list[dict]]:
  """Every record `config.data` names, before any split or modality selection.

  The datalist json's sections, or {"training": [...]} from a scan of
  `cfg.root` (BraTS scans carry their seeded folds). A prepared store keeps
  these (`bsf_jax.data.store`), so a run reading it splits its records as
  `load_datalist` would without opening the json or scanning a folder.
  """
  if cfg.datalist:
    return json_records(cfg.datalist, cfg.root)
  if cfg.dataset == "ukb":
    return {"training": ukb_scan(cfg.root, cfg.min_slices)}
  if cfg.dataset == "brats":
    return {"training": brats_scan(cfg.root, seed=cfg.split_seed)}
  return {"training": atlas_scan(cfg.root)}


def load_datalist(cfg, sections=None) -> tuple[list[dict], list[dict]]:
  """Train and validation records for `config.data`.

  Args:
    cfg: the `config.data` block (see `pipeline.default_config`).
    sections: `source_sections(cfg)` when already at hand (a store's
      index); by default they are read from the datalist or a scan.

  Returns:
    (train, val) lists of records with modalities selected and the few-shot
    subset applied to train.

  Raises:
    DataError: missing/invalid datalist, or an empty training list.
  """
  dataset = cfg.dataset
  wanted = resolve_modalities(dataset, cfg.modalities)
  where = cfg.datalist or cfg.root
  if sections is None:
    sections = source_sections(cfg)
  train, val = sections.get("training", []), sections.get("validation", [])
  if dataset == "ukb":
    # A scan's records are sorted by id, so splitting nothing keeps them.
    if not val and cfg.val_fraction > 0:
      train, val = split(train, cfg.val_fraction, cfg.split_seed)
  elif dataset == "brats":
    train, val = ([r for r in train if r["fold"] != cfg.fold],
                  [r for r in train if r["fold"] == cfg.fold])
  else:
    train, val = split(train, cfg.val_fraction, cfg.split_seed)
  if not train:
    raise DataError(f"{where}: empty training datalist for dataset={dataset} "
                    f"(fold={cfg.fold})")
  train = few_shot(train, cfg.fraction, cfg.repeat_seed)
  select = lambda r: {"id": r["id"], "label": r["label"],
                      "image": _pick(r["image"], dataset, wanted, f"{where}: {r['id']}")}
  return [select(r) for r in train], [select(r) for r in val]


def labelled_records(path: str, dataset: str, modalities,
                     sections=("validation", "test")) -> list[dict]:
  """The labelled entries of a datalist's held-out sections, for evaluation.

  Args:
    path: a datalist json; relative paths are taken against its folder.
    dataset: "brats" or "atlas" (how image lists are ordered, `_pick`).
    modalities: the modalities to select, in model-channel order.
    sections: the json sections read ("training" is what models learn from).

  Returns:
    Records {"id", "image", "label"} of every entry with a label.

  Raises:
    DataError: no labelled entry in those sections.
  """
  wanted = resolve_modalities(dataset, modalities)
  found = json_records(path)
  records = [{"id": r["id"], "label": r["label"],
              "image": _pick(r["image"], dataset, wanted, f"{path}: {r['id']}")}
             for name in sections for r in found.get(name, []) if r["label"]]
  if not records:
    raise DataError(f"{path}: no labelled entries in its {list(sections)} "
                    "sections")
  return records
