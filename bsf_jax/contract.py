"""What a checkpoint's weights expect of their inputs, and how they segment.

Every checkpoint's `meta` holds the run's input contract (the dataset, the
modalities and their order, orientation, layout, intensity transform, roi,
label convention and the model's shape) and its inference settings. A resume
checks the contract (`checkpointing.check_contract`), so a changed config
cannot silently continue a run; `bsf_jax.predict` and `bsf_jax.evaluate`
rebuild the model and the preprocessing from it, so new subjects are read and
segmented the way the training data was.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from bsf_jax import models

# The `config.seg` fields that turn a segmentation model's logits into the
# masks it was validated with. Saved beside the contract (not in it: changing
# them on resume is legitimate), so `bsf_jax.predict` segments new subjects
# the way validation did.
INFERENCE_KEYS = ("threshold", "sw_overlap", "sw_batch_size", "sw_mode")


def in_channels(config: ml_collections.ConfigDict) -> int:
  """The model's input channels: one per modality."""
  return len(config.data.modalities)


def data_contract(data: ml_collections.ConfigDict) -> dict[str, Any]:
  """The input half of the contract, from `config.data` alone."""
  # pylint: disable=g-import-not-at-top
  from bsf_jax.data import datalists
  from bsf_jax.data import labels
  from bsf_jax.data import transforms
  intensity = transforms.Intensity(data.intensity, float(data.a_min),
                                   float(data.a_max))
  convention = labels.get(data.label_format)
  return json_clean({
      "dataset": data.dataset,
      "modalities": list(datalists.resolve_modalities(data.dataset,
                                                      data.modalities)),
      "orientation": "RAS",
      "layout": "HWDC (channels last)",
      "intensity": intensity.spec(),
      "roi": [int(r) for r in data.roi],
      "label_format": labels.canonical(data.label_format),
      # The convention whole (values and regions), so predictions are written
      # as the training data had them (`labels.from_legacy_contract` reads it).
      "labels": convention.to_contract() if convention else {},
      "label_channels": list(convention.regions) if convention else [],
  })


def input_contract(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """A run's whole contract: its inputs and the model's shape."""
  contract = data_contract(config.data)
  contract["model"] = dict(
      name=config.model.name, depths=list(config.model.depths),
      num_heads=list(config.model.num_heads),
      feature_size=config.model.feature_size,
      in_channels=in_channels(config),
      out_channels=config.model.out_channels,
      patch_merging=models.patch_merging_of(config))
  return json_clean(contract)


def inference_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The `INFERENCE_KEYS` of `config.seg`, as a checkpoint records them."""
  return json_clean({k: config.seg[k] for k in INFERENCE_KEYS})


def json_clean(value: Any) -> Any:
  """Tuples to lists, numpy scalars to Python, recursively (JSON-stable)."""
  if isinstance(value, dict):
    return {str(k): json_clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_clean(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def upgrade(saved: dict[str, Any]) -> dict[str, Any]:
  """A contract as this version writes it, from any earlier version's.

  Contracts written before label conventions were stored name the format
  "brats" (with `et_label` 4 or 3) or "atlas" and carry no `labels`; they
  are rewritten to the convention they meant (`labels.from_legacy_contract`),
  so runs started by an earlier version resume, evaluate and predict
  unchanged. A current contract is returned as it is.
  """
  if "model" in saved and "patch_merging" not in saved["model"]:
    # Runs written before the order was recorded computed MONAI 1.5's.
    saved = dict(saved, model=dict(saved["model"], patch_merging="all_neighbours"))
  if "labels" in saved or "et_label" not in saved:
    return saved
  from bsf_jax.data import labels  # pylint: disable=g-import-not-at-top
  convention = labels.from_legacy_contract(saved)
  out = {k: v for k, v in saved.items() if k != "et_label"}
  out.update(
      label_format=convention.name if convention else labels.NONE,
      labels=convention.to_contract() if convention else {},
      label_channels=list(convention.regions) if convention else [])
  return json_clean(out)


def input_mismatch(a: dict[str, Any], b: dict[str, Any]) -> str | None:
  """The first contract field two checkpoints differ in, the model aside.

  Checkpoints whose predictions are averaged must read their inputs the same
  way (dataset, modalities and their order, orientation, layout, intensity,
  roi) and mean the same by each output channel (label convention); their
  architectures may differ. Contracts of earlier versions are compared as
  this version writes them (`upgrade`).

  Returns:
    The field's name, or None when they agree.
  """
  a, b = upgrade(a), upgrade(b)
  for key in sorted((set(a) | set(b)) - {"model"}):
    if a.get(key) != b.get(key):
      return key
  return None
