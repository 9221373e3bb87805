"""The input half of a checkpoint's contract: what the weights expect of their inputs.

Built from `config.data` alone (the dataset, the modalities and their order,
orientation, layout, intensity transform, roi and label convention), so that a
preprocessed store (`data.store`) can be checked against a run without the
model; `bsf_jax.infer.contract` adds the model's shape and the inference
settings.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np


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
      # as the training data had them (`labels.of_contract` reads it).
      "labels": convention.to_contract() if convention else {},
      "label_channels": list(convention.regions) if convention else [],
  })


def json_clean(value: Any) -> Any:
  """Tuples to lists, numpy scalars to Python, recursively (JSON-stable)."""
  if isinstance(value, dict):
    return {str(k): json_clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_clean(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value
