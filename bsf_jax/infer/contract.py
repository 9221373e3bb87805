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

from bsf_jax import models
from bsf_jax.data.contract import data_contract, json_clean

# The `config.seg` fields that turn a segmentation model's logits into the
# masks it was validated with. Saved beside the contract (not in it: changing
# them on resume is legitimate), so `bsf_jax.predict` segments new subjects
# the way validation did.
INFERENCE_KEYS = ("threshold", "sw_overlap", "sw_batch_size", "sw_mode")


def in_channels(config: ml_collections.ConfigDict) -> int:
  """The model's input channels: one per modality."""
  return len(config.data.modalities)


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


def upgrade(saved: dict[str, Any]) -> dict[str, Any]:
  """A contract as this version writes it.

  Contracts written before the patch-merging order was recorded computed
  MONAI 1.5's order ("all_neighbours"); they get it, so such runs resume,
  evaluate and predict unchanged. A current contract is returned as it is.
  """
  if "model" in saved and "patch_merging" not in saved["model"]:
    saved = dict(saved, model=dict(saved["model"], patch_merging="all_neighbours"))
  return saved


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
