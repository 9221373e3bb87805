"""A prepared store: the deterministic part of a stage's input chain, done once.

`python -m bsf_jax.data.prepare` (prepare.py) reads each subject once (NIfTI,
RAS, NaN/Inf and label checks), computes what every crop of it needs (the
intensity statistics and the k-divisible foreground box of
`transforms.crop_region`) and writes the voxels already normalised
(`Intensity.apply`, an elementwise float32 map, so a crop of the normalised
volume is bit for bit the normalised crop) with the label as one more
channel. `config.data.store=DIR` then makes the pipelines read crops from
it: no directory scan, no NIfTI header, no gzip, no statistics per sample.

Layout of DIR:

  plan.json        what is prepared: the data contract, the source sections
                   (datalist or scan) and the subject list; written once.
  subjects/XX/NAME.image.b2nd    normalised voxels, float32 (H, W, D, C) in
                   RAS, zero-padded to cover the crop region (so every crop
                   is one read of stored voxels), a Blosc2 NDArray: chunks
                   of `CHUNKS`^3 split in `BLOCKS`^3 blocks, LZ4 + byte
                   shuffle, all-zero chunks stored as a flag. A crop
                   decompresses only the blocks it touches, straight into
                   the batch (the layout nnU-Net v2 reads its data with).
  subjects/XX/NAME.regions.b2nd  segmentation only: the label's region
                   channels (`labels.to_channels`), float32 (..., K), same grid.
  subjects/XX/NAME.label.b2nd    segmentation only: the raw label values
                   (uint8 when they are integers 0..255, else float32), for
                   validation's `raw_label`.
  subjects/XX/NAME.json  the subject's entry (shape, padding origin, box,
                   statistics, affine, crc32 and size of each file); written
                   last, so its presence marks the subject finished.
  index.json       the plan plus every entry: the one file a run reads.

Refusals (`StoreError`, one line naming the store and what differs): a store
prepared for another roi, modalities, intensity or label convention; a
subject file whose bytes differ from the crc32 recorded when it was written;
a run's subject that the store does not hold.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import os
import re
from typing import Any

import numpy as np

from bsf_jax.data import DataError

FORMAT = "bsf_jax.store"
VERSION = 1
INDEX = "index.json"
PLAN = "plan.json"
SUBJECTS = "subjects"
# Chunk and block edge in voxels (all channels in one block). A 96^3 or
# 128^3 crop decompresses only the 16^3 blocks it overlaps (1.2-1.5x the crop
# instead of ~2.4x with 32^3 chunks); BENCHMARKS.md, data pipeline, has the
# measurements behind these numbers.
CHUNKS = 64
BLOCKS = 16
# The `contract.data_contract` keys a store's voxels depend on.
CONTRACT_KEYS = ("dataset", "modalities", "roi", "intensity", "label_format",
                 "labels")
# The config.data field to name when a contract key differs.
_FIELD = {"dataset": "data.dataset", "modalities": "data.modalities",
          "roi": "data.roi", "intensity": "data.intensity/a_min/a_max",
          "label_format": "data.label_format", "labels": "data.label_format"}

try:  # ISA-L's crc32 reads ~10x faster than zlib's (the same checksum).
  from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - depends on the environment.
  from zlib import crc32 as _crc32


class StoreError(ValueError):
  """The store does not match the run, changed, or lacks a subject.

  Not a `DataError`: `data.on_error="skip"` skips bad input files, never a
  store that is not the one the run needs.
  """


def contract(data_cfg) -> dict[str, Any]:
  """The part of the run's data contract that a store must match."""
  from bsf_jax.data import contract as contract_lib  # pylint: disable=g-import-not-at-top
  full = contract_lib.data_contract(data_cfg)
  return {k: full[k] for k in CONTRACT_KEYS}


def source(data_cfg) -> dict[str, Any]:
  """Where the store's records come from, and the scan rules they depend on."""
  if data_cfg.datalist:
    return {"datalist": os.path.abspath(data_cfg.datalist),
            "root": os.path.abspath(data_cfg.root) if data_cfg.root else ""}
  out = {"scan": os.path.abspath(data_cfg.root)}
  if data_cfg.dataset == "ukb":
    out["min_slices"] = int(data_cfg.min_slices)
  elif data_cfg.dataset == "brats":
    out["split_seed"] = int(data_cfg.split_seed)  # the scan draws the folds
  return out


def key(record: dict) -> str:
  """A subject's identity: its selected image paths and label path."""
  return "\n".join([*record["image"], record.get("label") or ""])


def subject_name(record: dict) -> str:
  """File name stem: the record id made file-safe, plus a hash of its key."""
  digest = hashlib.sha1(key(record).encode()).hexdigest()
  safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(record["id"]))[:64]
  return f"{digest[:2]}/{safe}-{digest[:12]}"


def array_path(store: str, name: str, array: str) -> str:
  """The file of one array ("image", "regions" or "label") of a subject."""
  return os.path.join(store, SUBJECTS, f"{name}.{array}.b2nd")


def entry_path(store: str, name: str) -> str:
  return os.path.join(store, SUBJECTS, name + ".json")


def file_crc32(path: str) -> tuple[int, int]:
  """(crc32, size) of a file, read in 8 MiB pieces."""
  crc, size = 0, 0
  with open(path, "rb") as f:
    while piece := f.read(8 << 20):
      crc = _crc32(piece, crc)
      size += len(piece)
  return crc, size


def write_array(path: str, array: np.ndarray) -> None:
  """Writes an (H, W, D[, C]) array as a Blosc2 NDArray file at `path`."""
  import blosc2  # pylint: disable=g-import-not-at-top
  chunks = tuple(min(CHUNKS, s) for s in array.shape[:3]) + array.shape[3:]
  blocks = tuple(min(BLOCKS, s) for s in chunks[:3]) + array.shape[3:]
  blosc2.asarray(np.ascontiguousarray(array), urlpath=path, mode="w",
                 chunks=chunks, blocks=blocks,
                 cparams={"codec": blosc2.Codec.LZ4, "clevel": 5,
                          "filters": [blosc2.Filter.SHUFFLE], "nthreads": 1})


# --- Reading -------------------------------------------------------------

# (path -> (size, mtime_ns, inode)) of the files this process has checked
# against their crc32: a later read re-checks only when the file changed.
_VERIFIED: dict[str, tuple[int, int, int]] = {}


def _stat_key(path: str) -> tuple[int, int, int]:
  st = os.stat(path)
  return st.st_size, st.st_mtime_ns, st.st_ino


def verify(path: str, recorded: dict, what: str) -> None:
  """Checks a store file against the crc32 and size recorded when written.

  The whole file is checksummed the first time this process reads it, and
  again whenever its size, mtime or inode changes; otherwise one `stat`.

  Raises:
    StoreError: missing file, or bytes that differ from when it was written.
  """
  try:
    now = _stat_key(path)
  except FileNotFoundError:
    raise StoreError(f"{path}: store file of {what} is missing (the store "
                     f"changed after it was written; run prepare again)") from None
  if _VERIFIED.get(path) == now:
    return
  crc, size = file_crc32(path)
  if (crc, size) != (recorded["crc32"], recorded["bytes"]):
    raise StoreError(
        f"{path}: store file of {what} changed after it was written (crc32 "
        f"{crc:08x}, {size} bytes; recorded {recorded['crc32']:08x}, "
        f"{recorded['bytes']} bytes); run prepare again to rebuild it")
  _VERIFIED[path] = now


def open_array(store: str, entry: dict, array: str):
  """One verified array of a subject, as a Blosc2 NDArray (read lazily)."""
  import blosc2  # pylint: disable=g-import-not-at-top
  path = array_path(store, entry["name"], array)
  verify(path, entry["files"][array], f"subject {entry['id']}")
  try:
    return blosc2.open(path, mode="r", dparams={"nthreads": 1})
  except Exception as e:  # blosc2 raises several types for a bad frame.
    raise StoreError(f"{path}: unreadable store file of subject "
                     f"{entry['id']} ({type(e).__name__}: {e})") from e


def read_json(path: str, what: str) -> dict:
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    raise StoreError(f"{path}: no {what} here") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise StoreError(f"{path}: {what} is not valid json ({e})") from e
  if data.get("format") != FORMAT or data.get("version") != VERSION:
    raise StoreError(f"{path}: not a {FORMAT} version {VERSION} {what} "
                     f"(format {data.get('format')!r}, version "
                     f"{data.get('version')!r})")
  return data


@contextlib.contextmanager
def _gc_paused():
  """Pauses the cyclic garbage collector while ~10^5 small objects are made.

  Building them triggers collection after collection of everything alive
  (measured: half of the time to load an 82,800-subject index); they hold no
  cycles, and the collector runs again afterwards.
  """
  was = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if was:
      gc.enable()


@functools.lru_cache(maxsize=4)
def _load_index(path: str, stamp: tuple[int, int, int]) -> dict:
  del stamp  # Part of the cache key only: a rewritten index is read again.
  return read_json(path, "store index (run python -m bsf_jax.data.prepare)")


def load_index(store: str) -> dict:
  """The store's index.json (cached per process while the file is unchanged)."""
  path = os.path.join(os.path.abspath(store), INDEX)
  try:
    stamp = _stat_key(path)
  except FileNotFoundError:
    raise StoreError(
        f"{path}: no store index here; run python -m bsf_jax.data.prepare "
        f"--out={store} (every process of it must finish)") from None
  return _load_index(path, stamp)


def _fmt(value) -> str:
  return json.dumps(value, sort_keys=True)


def check_contract(store: str, made_for: dict, data_cfg) -> None:
  """Refuses a run whose config needs other voxels than the store holds."""
  wanted = contract(data_cfg)
  for k in CONTRACT_KEYS:
    if made_for.get(k) != wanted[k]:
      raise StoreError(
          f"{store}: prepared for {k} {_fmt(made_for.get(k))}, but this run "
          f"has {_fmt(wanted[k])} ({_FIELD[k]}); prepare a store for this "
          f"config (python -m bsf_jax.data.prepare --out=NEW_DIR)")


def check_source(store: str, made_from: dict, data_cfg) -> None:
  """Refuses a run whose scan rule would pick other records than the store's."""
  for k in ("min_slices", "split_seed"):
    if k in made_from and int(data_cfg[k]) != made_from[k]:
      raise StoreError(
          f"{store}: its records come from a scan of {made_from['scan']} with "
          f"data.{k}={made_from[k]}, but this run has data.{k}={data_cfg[k]}; "
          f"set data.{k}={made_from[k]} or prepare a store for this config")


def every_record(data_cfg, sections: dict) -> list[dict]:
  """Every record a run of this config could use from `sections`: all splits
  and folds, no few-shot subset, modalities picked (ids kept)."""
  from bsf_jax.data import datalists  # pylint: disable=g-import-not-at-top
  use = ("training", "validation") if data_cfg.dataset == "ukb" else ("training",)
  everyone = [r for name in use for r in sections.get(name, [])]
  every_cfg = data_cfg.copy_and_resolve_references()
  every_cfg.update(dict(val_fraction=0.0, fraction=1.0, fold=-2))
  return datalists.load_datalist(every_cfg, sections={"training": everyone})[0]


# Index columns of the subject table, one value per subject.
COLUMNS = ("id", "name", "shape", "origin", "box", "channels", "files", "error")


def _entry(store: str, table: dict, i: int) -> dict:
  """The "store" field of a record: what a worker needs to read subject i."""
  box = table["box"][i]
  return {"store": store, "id": table["id"][i], "name": table["name"][i],
          "shape": table["shape"][i], "origin": table["origin"][i],
          "box": {"start": box[:3], "size": box[3:]},
          "channels": table["channels"][i], "files": table["files"][i]}


def load_datalist(data_cfg) -> tuple[list[dict], list[dict]]:
  """`datalists.load_datalist` for a run reading `data_cfg.store`.

  The records come from the index (split, few-shot and modalities as the run
  asks), or from `data_cfg.datalist` when one is named (its subjects must all
  be in the store). Each record gains "store", what reading it needs; under
  on_error="skip", a subject that prepare could not read gains "store_error"
  instead and is skipped when read, as it would be without a store.

  Raises:
    StoreError: the store was prepared for another config, or lacks one of
      the run's subjects (or prepare failed on it and on_error="raise").
  """
  with _gc_paused():
    return _load_datalist(data_cfg)


def _load_datalist(data_cfg):
  from bsf_jax.data import datalists  # pylint: disable=g-import-not-at-top
  store = os.path.abspath(data_cfg.store)
  index = load_index(store)
  check_contract(store, index["contract"], data_cfg)
  sections, table = index["sections"], index["subjects"]
  # Section records name their subject's row in the table.
  row = {r["id"]: r["subject"] for records in sections.values() for r in records
         if "subject" in r}
  if data_cfg.datalist:  # the run's own records, found by their files
    train, val = datalists.load_datalist(data_cfg)
    by_key = {key(r): row[r["id"]] for r in every_record(data_cfg, sections)}
    find = lambda r: by_key.get(key(r))
  else:
    check_source(store, index["source"], data_cfg)
    train, val = datalists.load_datalist(data_cfg, sections=sections)
    find = lambda r: row.get(r["id"])
  out = []
  for records in (train, val):
    attached = []
    for r in records:
      i = find(r)
      if i is None:
        raise StoreError(
            f"{store}: subject {r['id']} ({', '.join(r['image'])}) is missing "
            f"from the store; prepare it (python -m bsf_jax.data.prepare "
            f"--out=NEW_DIR with this run's datalist)")
      error = table["error"][i]
      if error is None:
        r["store"] = _entry(store, table, i)
      elif data_cfg.on_error == "skip":
        r["store_error"] = error
      else:
        raise StoreError(f"{store}: subject {r['id']} was not prepared: {error} "
                         f"(fix the file and run prepare again, or set "
                         f"data.on_error='skip')")
      attached.append(r)
    out.append(attached)
  return out[0], out[1]


class Subject:
  """One store record opened for reading (each file verified when opened).

  Attributes:
    box_start, box_size: the crop region (`transforms.crop_region` of the
      raw volume, stored by prepare).
  """

  def __init__(self, record: dict):
    if "store_error" in record:  # prepare failed on it (on_error="skip")
      raise DataError(record["store_error"])
    self.entry = e = record["store"]
    self._store = e["store"]
    self._origin = np.asarray(e["origin"])  # volume voxel of stored [0, 0, 0]
    self.box_start = e["box"]["start"]
    self.box_size = e["box"]["size"]
    self.image = open_array(self._store, e, "image")

  @property
  def affine(self) -> np.ndarray:
    """The RAS voxel-to-world matrix (from the subject's entry file)."""
    with open(entry_path(self._store, self.entry["name"])) as f:
      return np.asarray(json.load(f)["affine"], np.float64)

  def read(self, array, corner, out: np.ndarray) -> np.ndarray:
    """Decompresses the crop at volume voxel `corner` into `out` (roi, ...).

    Args:
      array: an array from `open_array` (the image or region channels).
      corner: crop corner in raw volume coordinates, inside the crop region
        (the stored grid covers it, padded with zeros where it leaves the
        volume: the normalised value of the plain path's fill).
      out: C-contiguous float32 array of the crop's shape.
    """
    start = np.asarray(corner) - self._origin
    stop = start + np.asarray(out.shape[:3])
    if (start < 0).any() or (stop > np.asarray(array.shape[:3])).any():
      raise StoreError(f"{array_path(self._store, self.entry['name'], 'image')}: crop "
                       f"at {list(corner)} leaves the stored grid {list(array.shape[:3])} "
                       f"(origin {self._origin.tolist()})")
    array.get_slice_numpy(out, (tuple(int(v) for v in start) + (0,) * (array.ndim - 3),
                                tuple(int(v) for v in stop) + tuple(array.shape[3:])))
    return out

  def regions(self):
    return open_array(self._store, self.entry, "regions")

  def volume(self):
    """(image (H, W, D, C), raw label (H, W, D) or None): the whole volume."""
    lo = -self._origin
    hi = lo + np.asarray(self.entry["shape"])
    cut = lambda a: a[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    label = (cut(open_array(self._store, self.entry, "label"))
             if "label" in self.entry["files"] else None)
    return cut(self.image), label
