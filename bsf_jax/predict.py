r"""Segment new subjects with a fine-tuned checkpoint and write NIfTI labels.

  python -m bsf_jax.predict --checkpoint runs/s3_f0 --input /data/BraTS2021_00001 --output preds/
  python -m bsf_jax.predict --checkpoint runs/s3_f0 --input flair.nii.gz,t1ce.nii.gz,t1.nii.gz,t2.nii.gz --output preds/
  python -m bsf_jax.predict --checkpoint runs/s3_f0 --input brats21_folds.json --output preds/

The checkpoint carries its input contract (modality names and order,
orientation, intensity normalisation, roi). Inputs are matched to it by
modality name: a subject directory is searched for one file per modality, and
explicit file lists must name the files in the contract's order (checked
against the file names where they carry a modality). Wrong channel order is
the most common silent failure of the original, so a mismatch is an error.

The sigmoid threshold and the sliding-window settings (overlap, windows per
batch, blending) are the ones the run validated with, recorded in the
checkpoint; `--threshold`, `--overlap` and `--sw_batch_size` override them.

Subject folders may use the BraTS 2018-2021 names (`_flair`, `_t1ce`, `_t1`,
`_t2`) or the 2023+ ones (`-t2f`, `-t1c`, `-t1n`, `-t2w`): both are the same
four scans, matched by canonical name.

Predictions are written in the input's own orientation with its affine and
header, so they overlay the input in any viewer. Labels are written in the
training data's convention, recorded in the checkpoint's contract (BraTS
2018-2021: ET 4; 2023+: ET 3), or in `--labels`; the convention used is
printed. ATLAS outputs are binary masks.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import time

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from bsf_jax.run import checkpointing, config_lib, kinds
from bsf_jax.data import atomic_io
from bsf_jax.infer import inference, metrics
from bsf_jax.infer import contract as contract_lib
from bsf_jax import models
from bsf_jax.data import io as data_io
from bsf_jax.data import labels as labels_lib
from bsf_jax.data import transforms

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  checkpointing.quiet_tool_logs()
  try:
    _predict(FLAGS.checkpoint, FLAGS.input, FLAGS.output, FLAGS.step,
             overrides=dict(threshold=FLAGS.threshold,
                            sw_overlap=FLAGS.overlap,
                            sw_batch_size=FLAGS.sw_batch_size),
             label_format=FLAGS.labels)
  except (InputError, FileNotFoundError, ValueError,
          atomic_io.OutputError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def resolve_inference_settings(meta: dict,
                               overrides: dict) -> tuple[dict, str]:
  """The `config.seg` inference fields to predict with, and their source.

  The checkpoint's recorded settings (`contract.inference_settings`), else the
  defaults for checkpoints written before they were recorded; then any
  non-None override.
  """
  defaults = config_lib.seg_config()
  settings = {k: defaults[k] for k in contract_lib.INFERENCE_KEYS}
  recorded = meta.get("inference")
  if recorded is None:
    source = "defaults (the checkpoint predates recorded inference settings)"
  else:
    settings.update({k: recorded[k] for k in contract_lib.INFERENCE_KEYS
                     if k in recorded})
    source = "checkpoint"
  given = {k: v for k, v in overrides.items() if v is not None}
  if given:
    settings.update(given)
    source += " + flags " + ", ".join(sorted(given))
  if not 0 <= settings["threshold"] <= 1:
    raise ValueError(f"threshold must be in [0, 1], got "
                     f"{settings['threshold']} (from {source})")
  return settings, source


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


def _predict(checkpoint: str, inputs: str, output: str, which: str,
             overrides: dict | None = None,
             label_format: str | None = None) -> None:
  params, meta, step = checkpointing.restore_params(
      checkpoint, which, metric=kinds.SEG.best_metric, mode=kinds.SEG.best_mode)
  contract = meta.get("contract")
  if not contract or "model" not in contract:
    raise ValueError(f"{checkpoint}: checkpoint has no input contract")
  if contract["model"]["name"] != "swin_unetr":
    raise ValueError(f"{checkpoint}: a {contract['model']['name']} checkpoint "
                     "cannot segment; use a fine-tuning (stage 3) run")
  modalities = list(contract["modalities"])
  convention, convention_source = output_convention(contract, label_format)
  config = _config_from_contract(contract)
  settings, settings_source = resolve_inference_settings(meta,
                                                         overrides or {})
  config.seg.update(settings)
  model = models.from_config(config)
  predict = inference.make_volume_predictor(model, config)
  intensity = transforms.Intensity(**{
      k: contract["intensity"][k] for k in ("kind", "a_min", "a_max")
      if k in contract["intensity"]})
  subjects = resolve_inputs(inputs, modalities)
  out_paths = [os.path.join(output, f"{_output_name(files[0])}_pred.nii.gz")
               for files in subjects]
  first_input: dict[str, str] = {}
  for files, out_path in zip(subjects, out_paths):
    if out_path in first_input:
      # Checked before anything is written: one subject must never silently
      # overwrite another's prediction.
      raise InputError(
          f"{files[0]} and {first_input[out_path]} would both be written to "
          f"{out_path}; predict them into separate --output folders")
    first_input[out_path] = files[0]
  os.makedirs(output, exist_ok=True)
  print(f"checkpoint {checkpoint} step {step}: modalities {modalities}, "
        f"{len(subjects)} subject(s)")
  print("inference: " + ", ".join(f"{k}={v}" for k, v in settings.items())
        + f" ({settings_source})")
  print(f"labels: {_describe(convention)}, convention {convention_source}")
  named_2023 = [f[0] for f in subjects if re.search(r"-(t2f|t1c|t1n|t2w)\.nii", f[0])]
  if named_2023 and convention.name == "brats2021" and not label_format:
    print(f"note: {len(named_2023)} subject(s) have BraTS 2023+ file names "
          f"(e.g. {named_2023[0]}) but labels are written in the brats2021 "
          "convention (ET = 4); --labels brats2023 writes ET = 3")
  start = time.time()
  for i, (files, out_path) in enumerate(zip(subjects, out_paths), 1):
    volumes = [data_io.read_volume(f) for f in files]
    shapes = {v.data.shape for v in volumes}
    if len(shapes) != 1:
      raise InputError(f"{files}: modalities have different shapes {shapes}")
    image = np.stack([v.data for v in volumes], axis=-1)
    image = intensity.apply(image, intensity.fit(image))
    probs = np.asarray(predict(params, jnp.asarray(image)))
    labels = metrics.channels_to_labels(probs, convention,
                                        threshold=config.seg.threshold)
    write_like(out_path, np.asarray(labels), files[0])
    elapsed = time.time() - start
    print(f"[{i}/{len(subjects)}] {out_path}  ({elapsed:.0f}s, "
          f"eta {elapsed / i * (len(subjects) - i):.0f}s)", flush=True)


def _describe(convention) -> str:
  return ", ".join(f"{v} {name}" for v, name in sorted(convention.values.items()))


def _output_name(first_file: str) -> str:
  """Subject name of an output: the first modality's file name, suffix dropped."""
  return re.sub(r"([_-][a-z0-9]+)?\.nii(\.gz)?$", "", os.path.basename(first_file))


def _config_from_contract(contract: dict) -> ml_collections.ConfigDict:
  """The few config fields inference needs, rebuilt from the contract."""
  from bsf_jax.run import config_lib
  m = contract["model"]
  config = ml_collections.ConfigDict()
  config.model = config_lib.model_config("swin_unetr")
  config.model.update(depths=tuple(m["depths"]), num_heads=tuple(m["num_heads"]),
                      feature_size=m["feature_size"],
                      out_channels=m["out_channels"],
                      patch_merging=m.get("patch_merging", "all_neighbours"))
  config.data = ml_collections.ConfigDict(dict(
      modalities=tuple(contract["modalities"]), roi=tuple(contract["roi"])))
  config.seg = config_lib.seg_config()
  return config


FLAGS = flags.FLAGS

if __name__ == "__main__":
  flags.DEFINE_string("checkpoint", None, "Fine-tuning workdir or step dir.")
  flags.DEFINE_string("input", None, "Subject dir, folder of subject dirs, "
                      "comma-separated files, or a datalist json.")
  flags.DEFINE_string("output", None, "Output folder.")
  flags.DEFINE_string("step", "best", "best, latest or a step number.")
  flags.DEFINE_float("threshold", None, "Sigmoid threshold (default: the "
                     "checkpoint's config.seg.threshold).")
  flags.DEFINE_float("overlap", None, "Sliding-window overlap (default: the "
                     "checkpoint's config.seg.sw_overlap).")
  flags.DEFINE_integer("sw_batch_size", None, "Windows per batch (default: "
                       "the checkpoint's config.seg.sw_batch_size).")
  flags.DEFINE_string("labels", None, "Label convention to write, e.g. "
                      "brats2023 (default: the training data's, from the "
                      "checkpoint).")
  flags.mark_flags_as_required(["checkpoint", "input", "output"])
  app.run(main)
