"""Fine-tuned checkpoints segment new subjects: inputs matched, NIfTI labels written.

What `python -m bsf_jax.predict` runs (`predict_subjects`; its docstring
describes the behaviour): subjects' files are matched to the checkpoints'
input contract by modality name (`resolve_inputs`), predicted by the
ensemble (`bsf_jax.weights.ensemble`), and written in each input's own
orientation (`write_like`), with optional probabilities
(`write_probabilities` / `load_probabilities`).
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from typing import Any, TypeVar

import jax.numpy as jnp
import numpy as np

from bsf_jax.data import atomic_io
from bsf_jax.data import io as data_io
from bsf_jax.data import labels as labels_lib
from bsf_jax.data import transforms
from bsf_jax.infer import inference, metrics
from bsf_jax.infer import postprocess as postprocess_lib
from bsf_jax.weights import ensemble


# File-name patterns of each modality in the supported layouts.
_MODALITY_PATTERNS = {
    "flair": (r"_flair\.nii", r"-t2f\.nii", r"T2_FLAIR", r"FLAIR"),
    "t1ce": (r"_t1ce\.nii", r"-t1c\.nii"),
    "t1": (r"_t1\.nii", r"-t1n\.nii", r"_T1w\.nii", r"T1_brain", r"/T1\.nii"),
    "t2": (r"_t2\.nii", r"-t2w\.nii"),
}


class InputError(ValueError):
  """The inputs do not fit the checkpoint's input contract."""


def _matches(path: str, modality: str) -> bool:
  return any(re.search(p, path) for p in _MODALITY_PATTERNS.get(modality, ()))


def subject_files(subject_dir: str, modalities: list[str]) -> list[str]:
  """Finds one file per modality (in contract order) inside a subject dir."""
  candidates = sorted(glob.glob(os.path.join(subject_dir, "**", "*.nii*"),
                                recursive=True))
  candidates = [c for c in candidates if not re.search(r"(seg|mask)\.nii", c)]
  files = []
  for m in modalities:
    found = [c for c in candidates if _matches(c, m)]
    if len(found) != 1:
      raise InputError(
          f"{subject_dir}: expected exactly one {m!r} file for the checkpoint's "
          f"modalities {modalities}, found {found or 'none'}")
    files.append(found[0])
  return files


def resolve_inputs(spec: str, modalities: list[str]) -> list[list[str]]:
  """Turns --input into a list of subjects, each a list of files in order."""
  if spec.endswith(".json"):
    with open(spec) as f:
      datalist = json.load(f)
    base = os.path.dirname(os.path.abspath(spec))
    entries = [e for key in ("validation", "training", "test")
               for e in datalist.get(key, [])]
    subjects = [[p if os.path.isabs(p) else os.path.join(base, p)
                 for p in e["image"]] for e in entries]
  elif os.path.isdir(spec):
    subject_dirs = [spec]
    if not any(glob.glob(os.path.join(spec, "*.nii*"))):
      # A folder of subject folders.
      subject_dirs = sorted(d for d in glob.glob(os.path.join(spec, "*"))
                            if os.path.isdir(d))
    subjects = [subject_files(d, modalities) for d in subject_dirs]
  else:
    subjects = [spec.split(",")]
  for files in subjects:
    if len(files) != len(modalities):
      raise InputError(f"{files}: {len(files)} files, but the checkpoint expects "
                       f"{len(modalities)} modalities {modalities} in that order")
    for f, m in zip(files, modalities):
      if not os.path.exists(f):
        raise InputError(f"{f}: file not found")
      named = [k for k in _MODALITY_PATTERNS if _matches(f, k)]
      if named and m not in named:
        raise InputError(
            f"{f} looks like {named[0]!r} but is in the position of {m!r}: the "
            f"checkpoint expects modalities in the order {modalities}")
  if not subjects:
    raise InputError(f"--input {spec}: no subjects found")
  return subjects


def from_ras(data: np.ndarray, original_affine: np.ndarray) -> np.ndarray:
  """Inverse of `data_io.to_ras`: back to the file's storage orientation."""
  from nibabel import orientations
  ras = orientations.axcodes2ornt(("R", "A", "S"))
  back = orientations.ornt_transform(
      ras, orientations.io_orientation(original_affine))
  return orientations.apply_orientation(data, back)


def write_like(path: str, data: np.ndarray, reference: str) -> None:
  """Writes `data` (RAS) with `reference`'s orientation, affine and header."""
  import nibabel as nib
  ref = nib.load(reference)
  out = from_ras(data, ref.affine).astype(np.uint8)
  header = ref.header.copy()
  header.set_data_dtype(np.uint8)
  header["scl_slope"], header["scl_inter"] = 1, 0
  # Complete or absent: an interrupted subject leaves no partial NIfTI.
  with atomic_io.atomic_path(path) as tmp:
    nib.save(nib.Nifti1Image(out, ref.affine, header), tmp)


def output_convention(contract: dict, label_format: str | None = None):
  """The label convention to write, and a sentence saying where it is from.

  The checkpoint's (the training data's), else `label_format`, which must
  have the same regions (a BraTS 2021 model can write 2023 labels).
  """
  trained = labels_lib.of_contract(contract)
  if trained is None:
    raise ValueError("the checkpoint's contract records no label convention "
                     "(not a segmentation run)")
  if not label_format:
    return trained, f"{trained.name}, the training data's (checkpoint contract)"
  chosen = labels_lib.get(label_format)
  if chosen is None or list(chosen.regions) != list(trained.regions):
    raise ValueError(
        f"--labels {label_format}: regions "
        f"{list(chosen.regions) if chosen else []} differ from the "
        f"checkpoint's {list(trained.regions)} ({trained.name})")
  return chosen, f"{chosen.name} (--labels; trained on {trained.name})"


T = TypeVar("T")


def read_ahead(read: Callable[[T], Any], items: Iterable[T]
               ) -> Iterator[tuple[T, Any]]:
  """(item, read(item)) in order, the next item read in a thread meanwhile.

  Decompressing and normalising the next subject's NIfTI files overlaps the
  device's work on the current one; an error is raised for its own item.
  """
  with futures.ThreadPoolExecutor(max_workers=1) as pool:
    pending = collections.deque()
    for item in items:
      pending.append((item, pool.submit(read, item)))
      if len(pending) > 1:
        first, future = pending.popleft()
        yield first, future.result()
    while pending:
      first, future = pending.popleft()
      yield first, future.result()


def to_float16(probs: np.ndarray, threshold: float) -> np.ndarray:
  """float16 probabilities on the same side of `threshold` as the float32 ones.

  Rounding to float16 can carry a probability just below the threshold onto
  it (0.49998 rounds to 0.5); such values are stepped one float16 back, so
  the saved probabilities threshold to the labels written beside them.
  """
  probs = np.asarray(probs, np.float32)
  half = probs.astype(np.float16)
  above = metrics.binarize(probs, threshold)
  crossed = metrics.binarize(half.astype(np.float32), threshold) != above
  half[crossed] = np.nextafter(
      half[crossed], np.where(above[crossed], np.float16(np.inf),
                              np.float16(-np.inf)).astype(np.float16))
  return half


def write_probabilities(path: str, probs: np.ndarray, reference: str,
                       threshold: float, convention,
                       description: dict) -> None:
  """Writes RAS probabilities [H, W, D, K] in `reference`'s orientation.

  An `.npz` (NIfTI has no float16 type) holding `probabilities` (float16,
  the reference's storage orientation, regions last), `affine` (the
  reference's), `regions`, `threshold`, `labels` (the convention, JSON) and
  `ensemble` (what was averaged, JSON).
  """
  import nibabel as nib
  ref = nib.load(reference)
  with atomic_io.open_atomic(path, "wb") as f:
    np.savez_compressed(
        f, probabilities=to_float16(from_ras(probs, ref.affine), threshold),
        affine=np.asarray(ref.affine, np.float64),
        regions=np.asarray(list(convention.regions)),
        threshold=np.float64(threshold),
        labels=json.dumps(convention.to_contract()),
        ensemble=json.dumps(description))


def load_probabilities(path: str) -> dict:
  """What `write_probabilities` wrote: float32 probabilities, affine, threshold,
  regions and the label convention (`labels.Convention`)."""
  with np.load(path) as data:
    return {"probabilities": data["probabilities"].astype(np.float32),
            "affine": data["affine"], "threshold": float(data["threshold"]),
            "regions": [str(r) for r in data["regions"]],
            "convention": labels_lib.Convention.from_contract(
                json.loads(str(data["labels"]))),
            "ensemble": json.loads(str(data["ensemble"]))}


def predict_subjects(checkpoints: str | list[str], inputs: str, output: str,
             which: str, overrides: dict | None = None,
             label_format: str | None = None, mirror: str = "",
             save_probabilities: bool = False,
             postprocess: str | None = None) -> None:
  if isinstance(checkpoints, str):
    checkpoints = [checkpoints]
  members = ensemble.load(ensemble.resolve_checkpoints(checkpoints), which)
  contract = members[0].contract
  modalities = list(contract["modalities"])
  convention, convention_source = output_convention(contract, label_format)
  steps = postprocess_lib.parse(postprocess, convention.regions)
  settings, settings_source = ensemble.inference_settings(members,
                                                          overrides or {})
  config = ensemble.inference_config(contract, settings)
  intensity = transforms.Intensity(**{
      k: contract["intensity"][k] for k in ("kind", "a_min", "a_max")
      if k in contract["intensity"]})
  subjects = resolve_inputs(inputs, modalities)
  first_input: dict[str, str] = {}
  for files in subjects:
    out_path = _output_path(output, files, "_pred.nii.gz")
    if out_path in first_input:
      # Checked before anything is written: one subject must never silently
      # overwrite another's prediction.
      raise InputError(
          f"{files[0]} and {first_input[out_path]} would both be written to "
          f"{out_path}; predict them into separate --output folders")
    first_input[out_path] = files[0]
  mesh = inference.window_mesh(config.seg.sw_batch_size)
  model = ensemble.Ensemble(members, config, mirror=mirror, mesh=mesh)
  os.makedirs(output, exist_ok=True)
  for m in members:
    print(f"checkpoint {m.checkpoint} step {m.step}")
  print(f"modalities {modalities}, {len(subjects)} subject(s); ensemble: "
        f"{model.summary()}" + (f", windows split over {mesh.size} devices"
                                 if mesh is not None else ""))
  print("inference: " + ", ".join(f"{k}={v}" for k, v in settings.items())
        + f" ({settings_source})")
  print(f"labels: {_describe(convention)}, convention {convention_source}")
  if steps:
    print("post-processing: " + ", ".join(f"{k}={v}" for k, v in steps))
  named_2023 = [f[0] for f in subjects if re.search(r"-(t2f|t1c|t1n|t2w)\.nii", f[0])]
  if named_2023 and convention.name == "brats2021" and not label_format:
    print(f"note: {len(named_2023)} subject(s) have BraTS 2023+ file names "
          f"(e.g. {named_2023[0]}) but labels are written in the brats2021 "
          "convention (ET = 4); --labels brats2023 writes ET = 3")

  def read(files):
    volumes = [data_io.read_volume(f) for f in files]
    shapes = {v.data.shape for v in volumes}
    if len(shapes) != 1:
      raise InputError(f"{files}: modalities have different shapes {shapes}")
    image = np.stack([v.data for v in volumes], axis=-1)
    return intensity.apply(image, intensity.fit(image))

  start = time.time()
  results = model.stream(read_ahead(read, subjects),
                         lambda item: jnp.asarray(item[1]))
  for i, ((files, _), probs) in enumerate(results, 1):
    out_path = _output_path(output, files, "_pred.nii.gz")
    masks = postprocess_lib.apply(
        metrics.binarize(probs, config.seg.threshold), steps,
        convention.regions)
    write_like(out_path, metrics.channels_to_labels(masks, convention),
               files[0])
    if save_probabilities:
      write_probabilities(_output_path(output, files, "_prob.npz"), probs,
                          files[0], config.seg.threshold, convention,
                          model.describe())
    elapsed = time.time() - start
    print(f"[{i}/{len(subjects)}] {out_path}  ({elapsed:.0f}s, "
          f"eta {elapsed / i * (len(subjects) - i):.0f}s)", flush=True)


def _describe(convention) -> str:
  return ", ".join(f"{v} {name}" for v, name in sorted(convention.values.items()))


def _output_path(output: str, files: list[str], suffix: str) -> str:
  """A subject's output file: the first modality's file name, its modality
  suffix replaced by `suffix`."""
  name = re.sub(r"([_-][a-z0-9]+)?\.nii(\.gz)?$", "", os.path.basename(files[0]))
  return os.path.join(output, name + suffix)
