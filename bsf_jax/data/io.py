"""NIfTI reading and writing; the only module of bsf_jax that imports nibabel.

`read_volume` returns float32 voxels reoriented to RAS together with the
matching affine, and turns every way a file can be broken (missing, truncated
gzip, not 3D, NaN/Inf voxels, not NIfTI) into a `DataError` naming the file.

Gzip decoding dominates the cost of reading a volume, so compressed files are
inflated in one call with `isal` (Intel ISA-L, ~2x faster than zlib) when it
is installed, and the whole uncompressed file is handed to nibabel from
memory. An optional cache directory keeps the decoded RAS arrays as `.npy`
files, which later epochs read at memory-copy speed.
"""

import gzip
import hashlib
import json
import os
from typing import NamedTuple

import nibabel as nib
from nibabel import orientations
import numpy as np

from bsf_jax.data import DataError

try:  # Optional accelerator for gzip; falls back to the standard library.
  from isal import igzip as _fast_gzip
  from isal import isal_zlib as _fast_zlib
except ImportError:  # pragma: no cover - depends on the environment.
  _fast_gzip = _fast_zlib = None


class Volume(NamedTuple):
  """A decoded volume: `data` float32 (H, W, D) in RAS, `affine` (4, 4)."""
  data: np.ndarray
  affine: np.ndarray
  path: str


def _decompress(raw: bytes, path: str) -> bytes:
  try:
    if _fast_zlib is None:
      return gzip.decompress(raw)
    # One-member fast path (every NIfTI writer we know makes one member);
    # ~25% faster than igzip.decompress, which scans for further members.
    d = _fast_zlib.decompressobj(wbits=31)
    out = d.decompress(raw)
    if not d.eof:
      raise EOFError("compressed stream ended before the end-of-stream marker")
    return _fast_gzip.decompress(raw) if d.unused_data else out
  except MemoryError:
    raise
  except Exception as e:  # EOFError, zlib.error, gzip.BadGzipFile, IsalError, ...
    raise DataError(f"{path}: truncated or corrupt gzip ({e})") from e


def _nifti_from_bytes(raw: bytes, path: str):
  errors = []
  for klass in (nib.Nifti1Image, nib.Nifti2Image):
    try:
      return klass.from_bytes(raw)
    except Exception as e:  # nibabel raises many types for bad headers.
      errors.append(f"{klass.__name__}: {e}")
  raise DataError(f"{path}: not a readable NIfTI file ({'; '.join(errors)})")


def load_image(path: str):
  """Opens a NIfTI image with its header (voxels decoded lazily by nibabel).

  Args:
    path: a `.nii` or `.nii.gz` file.

  Returns:
    (image, raw): the nibabel image, and for gzip files the decoded bytes it
    reads from (None for `.nii`, which nibabel memory-maps).

  Raises:
    DataError: the file is missing, unreadable, or a corrupt gzip.
  """
  if not os.path.isfile(path):
    raise DataError(f"{path}: file not found")
  if path.endswith(".gz"):
    with open(path, "rb") as f:
      raw = _decompress(f.read(), path)
    return _nifti_from_bytes(raw, path), raw
  try:
    return nib.load(path), None
  except Exception as e:
    raise DataError(f"{path}: not a readable NIfTI file ({e})") from e


def header_shape(path: str) -> tuple[int, ...]:
  """Shape from the header only (reads a few hundred bytes, even for gzip)."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: file not found")
  try:
    return tuple(nib.load(path).shape)
  except Exception as e:
    raise DataError(f"{path}: not a readable NIfTI header ({e})") from e


def to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Reorients a 3D array to RAS, like MONAI `Orientation(axcodes="RAS")`.

  Args:
    data: (H, W, D) array in the storage orientation given by `affine`.
    affine: (4, 4) voxel-to-world matrix.

  Returns:
    (data, affine) with axes permuted/flipped so voxel axes point to
    Right, Anterior, Superior; the returned affine maps the new voxel grid
    to the same world coordinates.
  """
  current = orientations.io_orientation(affine)
  transform = orientations.ornt_transform(
      current, orientations.axcodes2ornt(("R", "A", "S")))
  if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
    return data, affine
  new_affine = affine @ orientations.inv_ornt_aff(transform, data.shape[:3])
  return orientations.apply_orientation(data, transform), new_affine


def _cache_path(path: str, cache_dir: str) -> str:
  st = os.stat(path)
  key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
  return os.path.join(cache_dir, hashlib.sha1(key.encode()).hexdigest())


def _voxels(img, raw, shape, path):
  """float32 voxels; zero-copy view of the decoded bytes when already float32."""
  proxy = img.dataobj
  slope, inter = img.header.get_slope_inter()
  dtype = img.get_data_dtype()
  if (raw is not None and dtype == np.dtype(np.float32) and slope in (None, 1.0)
      and inter in (None, 0.0) and proxy.offset + 4 * int(np.prod(shape)) <= len(raw)):
    # Little-endian float32 without scaling (UKB): no conversion pass needed.
    return np.frombuffer(raw, np.float32, int(np.prod(shape)), proxy.offset).reshape(
        shape, order="F")
  try:
    return np.asarray(proxy, dtype=np.float32).reshape(shape)
  except Exception as e:  # short data block inside a valid gzip stream etc.
    raise DataError(f"{path}: cannot read voxel data ({e})") from e


def _decode(path: str) -> Volume:
  img, raw = load_image(path)
  shape = img.shape
  # A trailing singleton time/channel axis (H, W, D, 1) is still one volume.
  while len(shape) > 3 and shape[-1] == 1:
    shape = shape[:-1]
  if len(shape) != 3:
    raise DataError(f"{path}: expected a 3D volume, got shape {img.shape}")
  data, affine = to_ras(_voxels(img, raw, shape, path), img.affine)
  # Flips stay views: the caller's channel stack or crop makes the one copy.
  return Volume(data, affine.astype(np.float64), path)


def read_volume(path: str, *, cache_dir: str = "",
                check_finite: bool = True) -> Volume:
  """Reads a NIfTI volume as float32 RAS voxels (scaling slope applied).

  Args:
    path: `.nii` or `.nii.gz` file.
    cache_dir: if set, decoded RAS arrays are stored there as `.npy` on the
      first read and memory-mapped on later reads (keyed by absolute path,
      size and mtime, so an edited file is decoded again).
    check_finite: raise on NaN/Inf voxels.

  Returns:
    `Volume(data float32 (H, W, D), affine (4, 4), path)`.

  Raises:
    DataError: naming `path` and the problem.
  """
  cached = _cache_path(path, cache_dir) if cache_dir and os.path.isfile(path) else ""
  if cached and os.path.isfile(cached + ".json"):
    with open(cached + ".json") as f:
      affine = np.asarray(json.load(f)["affine"])
    vol = Volume(np.load(cached + ".npy", mmap_mode="r"), affine, path)
  else:
    vol = _decode(path)
    if cached:
      os.makedirs(cache_dir, exist_ok=True)
      # Write-then-rename: concurrent workers never see a half-written file,
      # and the json (written last) marks the entry complete.
      tmp = f"{cached}.{os.getpid()}.tmp"
      np.save(tmp + ".npy", vol.data)
      os.replace(tmp + ".npy", cached + ".npy")
      with open(tmp, "w") as f:
        json.dump({"path": os.path.abspath(path),
                   "affine": vol.affine.tolist()}, f)
      os.replace(tmp, cached + ".json")
  # A float64 sum of float32 values cannot overflow, so it is finite exactly
  # when every voxel is: one cheap pass instead of a boolean mask.
  if check_finite and not np.isfinite(vol.data.sum(dtype=np.float64)):
    bad = np.size(vol.data) - np.count_nonzero(np.isfinite(vol.data))
    raise DataError(f"{path}: {bad} NaN/Inf voxels")
  return vol


def write_volume(path: str, data: np.ndarray, affine: np.ndarray,
                 dtype=np.float32, compresslevel: int = 2) -> str:
  """Writes a NIfTI-1 file (gzip-compressed if `path` ends in `.gz`).

  The gzip header carries no timestamp, so equal arrays give equal NIfTI
  bytes once decompressed. The compressed stream itself is not guaranteed
  equal with ISA-L (https://github.com/intel/isa-l/issues/140): two writes of
  the same array have been seen to differ in one bit of the stream that
  decodes to the same data.

  Args:
    path: output `.nii` / `.nii.gz` path; parent folders are created.
    data: 3D array, stored as `dtype` in the given orientation.
    affine: (4, 4) voxel-to-world matrix (sform and qform).
    dtype: on-disk voxel type.
    compresslevel: gzip level (isal levels 0-3, zlib 0-9).

  Returns:
    `path`.
  """
  img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
  img.header.set_xyzt_units("mm", "sec")
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  raw = img.to_bytes()
  if path.endswith(".gz"):
    if _fast_gzip is not None:
      raw = _fast_gzip.compress(raw, min(compresslevel, 3), mtime=0)
    else:
      raw = gzip.compress(raw, compresslevel, mtime=0)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    f.write(raw)
  return path
