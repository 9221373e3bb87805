"""What a checkpoint's weights expect of their inputs, and how they segment.

Every checkpoint's `meta` holds the run's input contract (the dataset, the
modalities and their order, orientation, layout, intensity transform, roi,
label convention and the model's architecture, `models.architecture`) and its
inference settings. A resume checks the contract
(`checkpointing.check_contract`), so a changed config cannot silently
continue a run; `bsf_jax.predict` and `bsf_jax.evaluate` rebuild the model
(`models.from_architecture`) and the preprocessing from it, so new subjects
are read and segmented the way the training data was.
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


def input_contract(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """A run's whole contract: its inputs and the model's shape."""
  contract = data_contract(config.data)
  contract["model"] = models.architecture(config)
  return json_clean(contract)


def inference_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The `INFERENCE_KEYS` of `config.seg`, as a checkpoint records them."""
  return json_clean({k: config.seg[k] for k in INFERENCE_KEYS})


def input_mismatch(a: dict[str, Any], b: dict[str, Any]) -> str | None:
  """The first contract field two checkpoints differ in, the model aside.

  Checkpoints whose predictions are averaged must read their inputs the same
  way (dataset, modalities and their order, orientation, layout, intensity,
  roi) and mean the same by each output channel (label convention); their
  architectures may differ.

  Returns:
    The field's name, or None when they agree.
  """
  for key in sorted((set(a) | set(b)) - {"model"}):
    if a.get(key) != b.get(key):
      return key
  return None
