"""Weight files: PyTorch and safetensors state dicts, and bsf_jax params checkpoints.

Files read (`read_torch_file`): MONAI state dicts (.pt/.pth/.safetensors),
BrainSegFounder checkpoints `{"state_dict": {"module.*": ...}, "global_step",
"epoch", "optimizer"}`, and the original `model_swinvit.pt`
(`module.patch_embed.*`, `module.layers1.0.*`, `mlp.fc1/fc2`). Their keys are
normalised and their kind and architecture read by `bsf_jax.weights.convert`.
PyTorch files are opened with `torch.load(..., weights_only=True)`; a pickled
model object is refused with the way to turn it into a state dict.

Patch-merging order (`swin_config.PATCH_MERGING_ORDERS`): weights trained
before MONAI 1.5 expect the "duplicated_neighbours" order, later ones
"all_neighbours", and the file itself cannot tell. Files bsf_jax writes
(`save_torch_file`, `torch_blob`, `safetensors_metadata`) record their order
(`MERGING_RECORD`: safetensors metadata, a key of the BrainSegFounder dict, the
`_metadata` of a MONAI state dict, which `load_state_dict` ignores) and are
read back with it. A `{"state_dict": ...}` checkpoint without a record
(BrainSegFounder's releases, `model_swinvit.pt`) is taken as
"duplicated_neighbours", and the import report says so; a bare state dict of
unknown origin does not say (`TorchFile.patch_merging` is None).

A bsf_jax params checkpoint (`save_params`, `load_params`) is an orbax
`{"params": ...}` directory beside `model_config.json`, which names the kind
and the `models.build` arguments.
"""

import collections
import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np

from bsf_jax import models
from bsf_jax.data import atomic_io
from bsf_jax.models.swin_config import MONAI_VERSIONS, PATCH_MERGING_ORDERS
from bsf_jax.weights import convert

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
# Where files written by bsf_jax record the patch-merging order: a key of the
# `_metadata` entry "" of a MONAI state dict, a top-level key of a
# BrainSegFounder dict and of safetensors metadata.
MERGING_RECORD = "bsf_jax_patch_merging"


@dataclasses.dataclass(frozen=True)
class TorchFile:
  """What a PyTorch/safetensors weight file holds (`read_torch_file`).

  Attributes:
    path: the file.
    layout: the file's layout, in words.
    state_dict: NumPy arrays keyed like MONAI (`convert.normalize_keys`).
    kind: "swin_unetr", "ssl_head" or "encoder" (`convert.detect_kind`).
    patch_merging: the order its weights were trained with, or None when the
      file does not say and its layout does not imply one.
    merging_reason: why `patch_merging` is what it is.
  """
  path: str
  layout: str
  state_dict: dict[str, np.ndarray]
  kind: str
  patch_merging: str | None
  merging_reason: str

  def architecture(self, kind: str | None = None) -> dict[str, Any]:
    """`convert.model_kwargs_from_state_dict` of this file as `kind` (default: its own)."""
    kind = kind or self.kind
    return convert.model_kwargs_from_state_dict(self.tensors_for(kind), kind)

  def tensors_for(self, kind: str) -> dict[str, np.ndarray]:
    """The tensors a model of `kind` takes: all of them, or the encoder's.

    An encoder target drops an SSL head's heads or a SwinUNETR's decoder.
    """
    if kind == "encoder":
      return convert.encoder_state_dict(self.state_dict)
    if kind == self.kind:
      return self.state_dict
    raise convert.ConversionError(
        f"{self.path} holds a {self.kind}, which cannot be read as a {kind} "
        f"(an encoder can be taken from any kind: --kind encoder)")

  def describe(self, kind: str | None = None) -> str:
    """The import report: layout, kind, sizes, merging order, kept and dropped keys."""
    kind = kind or self.kind
    arch = self.architecture(kind)
    sizes = ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in arch.items())
    if self.patch_merging is None:
      order = f"patch merging: not recorded ({self.merging_reason})"
    else:
      order = (f"patch merging: {self.patch_merging} ({self.merging_reason}; computed by "
               f"{MONAI_VERSIONS[self.patch_merging]})")
    lines = [f"{self.path}: {self.layout}", f"  {self.kind}: {sizes}", f"  {order}"]
    kept = set(self.tensors_for(kind))
    if kind == "encoder" and any(k.startswith("swinViT.") for k in self.state_dict):
      kept = {"swinViT." + k for k in kept}
    dropped = sorted({k.split(".")[0] for k in set(self.state_dict) - kept})
    if dropped:
      lines.append(f"  as a {kind}: dropped {', '.join(dropped)}")
    return "\n".join(lines)


_PICKLED_OBJECT_HELP = (
    "bsf_jax reads state dicts only. If you trust the file, load it with weights_only=False "
    "where the code that saved it is importable, and torch.save its model.state_dict() "
    "(model.module.state_dict() for a DistributedDataParallel wrapper)")


def _read_raw(path: str) -> tuple[Mapping[str, Any], str | None, str]:
  """(tensors, recorded merging order or None, layout) of a file, as stored."""
  if path.endswith(".safetensors"):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    with safe_open(path, "np") as f:
      metadata = f.metadata() or {}
      tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, metadata.get(MERGING_RECORD), "safetensors"
  import torch  # pylint: disable=g-import-not-at-top
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-exception-caught
    if type(e).__name__ != "UnpicklingError":  # what weights_only raises for objects
      raise
    reason = str(e).strip().splitlines()[0]
    raise convert.ConversionError(
        f"{path}: weights_only=True refuses it: it pickles Python objects, such as a whole "
        f"model saved with torch.save(model) ({reason}). {_PICKLED_OBJECT_HELP}") from e
  if isinstance(obj, Mapping) and "state_dict" in obj:
    info = ", ".join(f"{k} {obj[k]}" for k in ("epoch", "global_step") if k in obj)
    layout = "a {'state_dict': ...} checkpoint" + (f" ({info})" if info else "")
    recorded = obj.get(MERGING_RECORD)
    return obj["state_dict"], recorded if isinstance(recorded, str) else None, layout
  metadata = getattr(obj, "_metadata", None) or {}
  recorded = metadata.get("", {}).get(MERGING_RECORD)
  return obj, recorded if isinstance(recorded, str) else None, "a state dict"


def read_torch_file(path: str) -> TorchFile:
  """Reads a .safetensors or torch weight file (weights_only=True), strictly.

  Raises:
    convert.ConversionError: a file that is not a state dict (naming what it
      holds), a pickled object (with the way to make a state dict of it), or
      an unknown recorded merging order.
  """
  raw, recorded, layout = _read_raw(path)
  if not isinstance(raw, Mapping) or not all(hasattr(v, "shape") for v in raw.values()):
    top = list(raw)[:10] if isinstance(raw, Mapping) else type(raw).__name__
    raise convert.ConversionError(f"{path}: not a state dict nor {{'state_dict': ...}}: {top}")
  sd = convert.normalize_keys({k: convert.as_numpy(v) for k, v in raw.items()})
  if recorded is not None:
    if recorded not in PATCH_MERGING_ORDERS:
      raise convert.ConversionError(f"{path}: recorded patch merging {recorded!r} is not one of "
                                    f"{tuple(PATCH_MERGING_ORDERS)}")
    order, why = recorded, "recorded in the file by bsf_jax"
  elif layout.startswith("a {'state_dict'"):
    order, why = "duplicated_neighbours", (
        "not recorded; the {'state_dict': ...} layout of BrainSegFounder's releases and "
        "model_swinvit.pt, trained before MONAI 1.5")
  else:
    order, why = None, "a bare state dict does not say which order its weights were trained with"
  if any(k.startswith("module.") for k in raw):
    layout += ", DistributedDataParallel 'module.' keys"
  return TorchFile(path=path, layout=layout, state_dict=sd, kind=convert.detect_kind(sd),
                   patch_merging=order, merging_reason=why)


def load_torch_file(path: str) -> dict[str, np.ndarray]:
  """The tensors of a weight file, keyed like MONAI (`read_torch_file`)."""
  return read_torch_file(path).state_dict


def monai_export_note(patch_merging: str) -> str:
  """Which MONAI computes the function of weights with `patch_merging`."""
  return (f"patch merging {patch_merging}: {MONAI_VERSIONS[patch_merging]} computes the same "
          "function with these weights")


def torch_blob(sd: Mapping[str, Any], patch_merging: str, bsf: bool = False,
               global_step: int = 0, epoch: int = 0) -> Any:
  """What `torch.save` writes for a state dict, with its merging order recorded.

  Args:
    sd: tensors keyed like MONAI.
    patch_merging: the order the weights compute with.
    bsf: the BrainSegFounder layout, `{"state_dict": {"module.<key>": ...},
      "global_step", "epoch"}` plus the record; otherwise a state dict that
      MONAI's `load_state_dict(strict=True)` accepts, the record in its
      `_metadata`.
    global_step, epoch: stored with `bsf`.
  """
  if bsf:
    return {"state_dict": {"module." + k: v for k, v in sd.items()},
            "global_step": int(global_step), "epoch": int(epoch),
            MERGING_RECORD: patch_merging}
  out = collections.OrderedDict(sd)
  out._metadata = collections.OrderedDict({"": {MERGING_RECORD: patch_merging}})  # pylint: disable=protected-access
  return out


def safetensors_metadata(patch_merging: str, **extra: str) -> dict[str, str]:
  """The metadata bsf_jax writes into a .safetensors file."""
  return {MERGING_RECORD: patch_merging, **extra}


def save_torch_file(sd: Mapping[str, Any], path: str, patch_merging: str, bsf: bool = False,
                    global_step: int = 0, epoch: int = 0) -> None:
  """Writes a state dict as .safetensors or a torch .pt file, atomically.

  Args:
    sd: arrays or tensors keyed like MONAI.
    path: output file; ".safetensors" selects safetensors, anything else torch.save.
    patch_merging: the order the weights compute with, recorded in the file.
    bsf: write the BrainSegFounder layout (`torch_blob`; torch files only).
    global_step, epoch: stored with `bsf`.
  """
  arrays = {k: np.ascontiguousarray(convert.as_numpy(v)) for k, v in sd.items()}
  if path.endswith(".safetensors"):
    if bsf:
      raise ValueError("the BSF wrapper needs a torch file (.pt), not safetensors")
    from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
    atomic_io.write_bytes(path, save(arrays, metadata=safetensors_metadata(patch_merging)))
    return
  import torch  # pylint: disable=g-import-not-at-top
  tensors = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}
  with atomic_io.open_atomic(path, "wb") as f:
    torch.save(torch_blob(tensors, patch_merging, bsf, global_step, epoch), f)


def save_params(directory: str, params: Mapping, kind: str, model_kwargs: Mapping,
                force: bool = False) -> None:
  """Save `{"params": params}` with orbax `StandardCheckpointer` plus `model_config.json`.

  Layout: `<directory>/params/` (orbax) and `<directory>/model_config.json`
  (`{"kind": ..., "model_kwargs": {...}}`).

  Args:
    directory: output directory (created).
    params: model params.
    kind: model kind.
    model_kwargs: JSON-serialisable kwargs for `models.build(kind, **model_kwargs)`.
    force: overwrite an existing checkpoint.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, PARAMS_DIR), {"params": convert.strip_params(params)},
               force=force)
    ckptr.wait_until_finished()
  cfg = {"kind": kind, "model_kwargs": {k: list(v) if isinstance(v, tuple) else v
                                        for k, v in model_kwargs.items()}}
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(cfg, f, indent=2, default=str)


def load_params(directory: str):
  """Load a checkpoint written by `save_params`.

  Returns:
    (params, kind, model_kwargs); `models.build(kind, **model_kwargs)` gives the module.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(directory)
  cfg_path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{cfg_path} not found: not a bsf_jax params checkpoint")
  with open(cfg_path) as f:
    cfg = json.load(f)
  kind, kwargs = cfg["kind"], cfg["model_kwargs"]
  model = models.build(kind, **kwargs)
  target = {"params": convert.abstract_params(model)}
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(os.path.join(directory, PARAMS_DIR), target)
  return restored["params"], kind, {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
