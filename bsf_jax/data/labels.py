"""Label conventions as data: which value means what, and the scored regions.

A convention names every foreground value of a label map and defines the
regions a model predicts (one sigmoid channel each, in order) as sets of
values. It is stored whole in a checkpoint's input contract
(`contract.data_contract`), so `bsf_jax.predict` writes labels the way the
training data had them, whatever the naming of the files it is given.

Sources:
* brats2021: BraTS 2017-2021 (Menze et al. 2015, Bakas et al. 2018; MONAI
  `ConvertToMultiChannelBasedOnBratsClasses`): NCR 1, ED 2, ET 4.
* brats2023: BraTS 2023 GLI/MEN/MET/PED/SSA (rachitsaluja/BraTS-2023-Metrics,
  `get_tissue_wise_mask`): NETC 1, SNFH 2, ET 3; TC = {1, 3}, WT = {1, 2, 3}.
* brats2024: BraTS 2024 post-treatment glioma (rachitsaluja/BraTS-2024-Metrics
  `metrics_GLI.py`, `get_TissueWiseSeg`): as 2023 plus resection cavity RC 4,
  which is in no tumour region.
* atlas: ATLAS R2.0 / ISLES binary lesion masks (values >= 0.5 are lesion).
"""

from __future__ import annotations

import dataclasses

from bsf_jax.data import DataError


@dataclasses.dataclass(frozen=True)
class Convention:
  """One label convention.

  Attributes:
    name: e.g. "brats2023".
    kind: "brats" (overlapping tumour regions) or "atlas" (binary lesion).
    values: foreground value -> tissue name (0 is background).
    regions: region name -> values it is made of, in model-channel order.
  """
  name: str
  kind: str
  values: dict
  regions: dict

  def allowed(self) -> set[int]:
    return {0, *self.values}

  def to_contract(self) -> dict:
    """JSON-safe form stored in a checkpoint's input contract."""
    return {"name": self.name, "kind": self.kind,
            "values": {str(k): v for k, v in self.values.items()},
            "regions": {k: list(v) for k, v in self.regions.items()}}

  @classmethod
  def from_contract(cls, c: dict) -> "Convention":
    return cls(c["name"], c["kind"], {int(k): v for k, v in c["values"].items()},
               {k: tuple(v) for k, v in c["regions"].items()})


CONVENTIONS = {
    "brats2021": Convention("brats2021", "brats", {1: "NCR", 2: "ED", 4: "ET"},
                            {"TC": (1, 4), "WT": (1, 2, 4), "ET": (4,)}),
    "brats2023": Convention("brats2023", "brats", {1: "NETC", 2: "SNFH", 3: "ET"},
                            {"TC": (1, 3), "WT": (1, 2, 3), "ET": (3,)}),
    "brats2024": Convention("brats2024", "brats",
                            {1: "NETC", 2: "SNFH", 3: "ET", 4: "RC"},
                            {"TC": (1, 3), "WT": (1, 2, 3), "ET": (3,)}),
    "atlas": Convention("atlas", "atlas", {1: "lesion"}, {"lesion": (1,)}),
}
# Names accepted for `config.data.label_format` besides the conventions:
# "brats" is the 2018-2021 convention (configs and checkpoints before 2023).
ALIASES = {"brats": "brats2021"}
NONE = "none"


def canonical(name: str) -> str:
  """Convention name for a `label_format` value ("none" stays "none")."""
  name = ALIASES.get(name, name)
  if name != NONE and name not in CONVENTIONS:
    raise ValueError(f"data.label_format={name!r}; expected one of "
                     f"{[NONE, *CONVENTIONS, *ALIASES]}")
  return name


def get(name: str) -> Convention | None:
  """The convention of a `label_format` value; None for "none"."""
  name = canonical(name)
  return None if name == NONE else CONVENTIONS[name]


def of_contract(contract: dict) -> Convention | None:
  """The convention a checkpoint's contract records; None for an SSL run's."""
  return Convention.from_contract(contract["labels"]) if contract.get("labels") else None


def check_values(label, conv: Convention, path: str):
  """Raises DataError naming the file if `label` has values outside `conv`."""
  import numpy as np
  label = np.asarray(label)
  if conv.kind == "atlas":
    lo, hi = float(label.min()), float(label.max())
    if lo < 0 or hi > 1:
      raise DataError(f"{path}: lesion mask values outside [0, 1] "
                      f"(min {lo}, max {hi})")
    return
  allowed = conv.allowed()
  if not np.array_equal(label, np.round(label)):
    raise DataError(f"{path}: {conv.name} label map has non-integer values")
  lo, hi = float(label.min()), float(label.max())
  if lo < 0 or hi > 255:  # keeps the bincount below small
    raise DataError(f"{path}: label values outside {sorted(allowed)} "
                    f"({conv.name}; min {lo}, max {hi})")
  present = {int(v) for v in np.flatnonzero(np.bincount(label.astype(np.int64).ravel()))}
  if present - allowed:
    raise DataError(f"{path}: label values {sorted(present - allowed)} outside "
                    f"the expected set {sorted(allowed)} "
                    f"({conv.name}{_hint(present, conv)})")


def _hint(present, conv):
  if conv.name == "brats2021" and 3 in present:
    return "; label 3 is BraTS 2023+ ET: use label_format brats2023"
  if conv.name == "brats2023" and 4 in present:
    return ("; label 4 is BraTS 2018-2021 ET (use brats2021) or the 2024 "
            "resection cavity (use brats2024)")
  return ""


def to_channels(label, conv: Convention):
  """Label map -> float32 (..., K) region channels (K = len(conv.regions))."""
  import numpy as np
  label = np.asarray(label)
  if conv.kind == "atlas":
    return (label >= 0.5).astype(np.float32)[..., None]
  return np.stack([np.isin(label, v) for v in conv.regions.values()],
                  -1).astype(np.float32)


def from_channels(on, conv: Convention):
  """Binary (..., K) region channels -> uint8 label map in `conv`.

  Regions are painted largest first, so nested ones end up as their own
  value: BraTS writes 2 (edema) where WT, 1 where TC, ET where ET. A voxel
  gets the smallest value that its regions share and no wider region has.
  """
  import numpy as np
  on = np.asarray(on, bool)
  names = list(conv.regions)
  if on.shape[-1] != len(names):
    raise ValueError(f"{conv.name}: expected [..., {len(names)}] channels "
                     f"{names}, got shape {on.shape}")
  out = np.zeros(on.shape[:-1], np.uint8)
  order = sorted(range(len(names)), key=lambda k: -len(conv.regions[names[k]]))
  for k in order:
    # The value this region adds over the next smaller nested regions.
    own = set(conv.regions[names[k]])
    for j in order:
      if len(conv.regions[names[j]]) < len(own) and set(conv.regions[names[j]]) <= own:
        own -= set(conv.regions[names[j]])
    out[on[..., k]] = min(own) if own else min(conv.regions[names[k]])
  return out
