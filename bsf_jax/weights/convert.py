"""Two-way weight conversion between bsf_jax (Flax) and PyTorch/MONAI checkpoints.

Kinds and their PyTorch key spaces:
  "swin_unetr": MONAI `SwinUNETR.state_dict()` (`swinViT.*`, `encoder1.*`, ..., `out.*`).
  "ssl_head":   BrainSegFounder SSL head (`swinViT.*`, `rotation_head.*`,
                `contrastive_head.*`, `conv.<i>.*`), see `bsf_jax/reference/ssl_head.py`.
  "encoder":    MONAI `SwinTransformer.state_dict()` (`patch_embed.*`, `layers1.0.*`, ...).

Files read (`read_torch_file`): MONAI state dicts (.pt/.pth/.safetensors),
BrainSegFounder checkpoints `{"state_dict": {"module.*": ...}, "global_step",
"epoch", "optimizer"}`, and the original `model_swinvit.pt`
(`module.patch_embed.*`, `module.layers1.0.*`, `mlp.fc1/fc2`). The `module.`
prefix, `swin_vit.` and `fc1/fc2` names are normalised on import; the kind and
the architecture are read from the keys and tensor shapes. PyTorch files are
opened with `torch.load(..., weights_only=True)`; a pickled model object is
refused with the way to turn it into a state dict. Every missing key,
unexpected key and shape mismatch is reported by name.

Patch-merging order (`swin_config.PATCH_MERGING_ORDERS`): weights trained
before MONAI 1.5 expect the "duplicated_neighbours" order, later ones
"all_neighbours", and the file itself cannot tell. Files bsf_jax writes record
their order (safetensors metadata, a key of the BrainSegFounder dict, the
`_metadata` of a MONAI state dict, which `load_state_dict` ignores) and are read
back with it. A `{"state_dict": ...}` checkpoint without a record (BrainSegFounder's
releases, `model_swinvit.pt`) is taken as "duplicated_neighbours", and the
import report says so; a bare state dict of unknown origin needs the order
stated (`--patch_merging`).

CLI:
  python -m bsf_jax.convert --inspect model.pt
  python -m bsf_jax.convert --from model.pt [--kind swin_unetr] [--patch_merging ORDER] --to ckpt_dir
  python -m bsf_jax.convert --from ckpt_dir --to model.safetensors [--bsf]
"""

import argparse
import collections
import dataclasses
import json
import logging
import os
import re
from typing import Any, Mapping

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from bsf_jax.data import atomic_io
from bsf_jax import models
from bsf_jax.models.swin import relative_position_index
from bsf_jax.models.swin_config import MONAI_VERSIONS, PATCH_MERGING_ORDERS

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
_INDEX_KEY = "relative_position_index"
_TABLE_KEY = "relative_position_bias_table"
_CONV_WRAPPED = ("conv1", "conv2", "conv3", "transp_conv")  # MONAI `Convolution` wraps `.conv`
# Where files written by bsf_jax record the patch-merging order: a key of the
# `_metadata` entry "" of a MONAI state dict, a top-level key of a
# BrainSegFounder dict and of safetensors metadata.
MERGING_RECORD = "bsf_jax_patch_merging"


class ConversionError(ValueError):
  """A state dict does not match the model: lists every offending key."""


# --------------------------------------------------------------------------- names
def _torch_key(path: tuple[str, ...]) -> str:
  """Flax param path -> PyTorch key (the name table)."""
  parts = []
  for i, p in enumerate(path[:-1]):
    if re.fullmatch(r"layers\d", p):
      parts += [p, "0"]
    elif m := re.fullmatch(r"(blocks|conv)_(\d+)", p):
      parts += [m.group(1), m.group(2)]
    else:
      parts.append(p)
  leaf = {"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1])
  parent = path[-2] if len(path) > 1 else ""
  if parent in _CONV_WRAPPED or path[:2] == ("out", "conv"):
    parts.append("conv")
  return ".".join(parts + [leaf])


def _is_transposed(path) -> bool:
  return len(path) > 1 and path[-2] == "transp_conv"


def _to_torch_layout(path, a: np.ndarray) -> np.ndarray:
  if path[-1] != "kernel":
    return a
  if a.ndim == 2:  # Dense (in, out) -> Linear (out, in)
    return a.T
  if _is_transposed(path):  # (k, k, k, in, out) -> ConvTranspose3d (in, out, k, k, k)
    return a.transpose(3, 4, 0, 1, 2)
  return a.transpose(4, 3, 0, 1, 2)  # DHWIO -> OIDHW


def _from_torch_layout(path, a: np.ndarray) -> np.ndarray:
  if path[-1] != "kernel":
    return a
  if a.ndim == 2:
    return a.T
  if _is_transposed(path):
    return a.transpose(2, 3, 4, 0, 1)
  return a.transpose(2, 3, 4, 1, 0)


def _window_from_table(rows: int, key: str) -> tuple[int, int, int]:
  w = int(round((round(rows ** (1 / 3)) + 1) / 2))
  if (2 * w - 1) ** 3 != rows:
    raise ConversionError(f"{key}: {rows} rows is not (2w-1)^3 for a cubic window")
  return (w, w, w)


def _strip_params(params: Mapping) -> Mapping:
  return params["params"] if set(params) == {"params"} else params


def _check_kind(kind: str, top: set[str]) -> None:
  if kind not in models.KINDS:
    raise ValueError(f"unknown kind {kind!r}; use one of {models.KINDS}")
  marker = {"swin_unetr": "encoder1", "ssl_head": "rotation_head", "encoder": "patch_embed"}[kind]
  if marker not in top:
    raise ConversionError(f"params do not look like kind {kind!r} (no {marker!r}; top-level: {sorted(top)})")


# --------------------------------------------------------------------------- export
def params_to_numpy(params: Mapping, kind: str) -> dict[str, np.ndarray]:
  """Flax params -> PyTorch-named NumPy arrays (buffers included). See `params_to_torch`."""
  params = _strip_params(params)
  _check_kind(kind, set(params))
  out = {}
  for path, v in flax.traverse_util.flatten_dict(params).items():
    key = _torch_key(path)
    out[key] = np.ascontiguousarray(_to_torch_layout(path, np.asarray(v)))
    if path[-1] == _TABLE_KEY:
      index_key = key[: -len(_TABLE_KEY)] + _INDEX_KEY
      out[index_key] = relative_position_index(_window_from_table(v.shape[0], key))
  return out


def params_to_torch(params: Mapping, kind: str) -> dict[str, Any]:
  """Flax params -> a PyTorch state dict that `load_state_dict(strict=True)` accepts.

  Args:
    params: the model's params (`variables["params"]` or `{"params": ...}`).
    kind: "swin_unetr", "ssl_head" or "encoder".

  Returns:
    dict of torch.Tensor keyed like MONAI (bf16 params are exported as float32).
  """
  import torch  # pylint: disable=g-import-not-at-top
  out = {}
  for k, v in params_to_numpy(params, kind).items():
    if v.dtype not in (np.float32, np.float64, np.int64):
      v = v.astype(np.float32)
    out[k] = torch.from_numpy(np.array(v, copy=True))  # writable, contiguous copy
  return out


# --------------------------------------------------------------------------- import
def _as_numpy(v) -> np.ndarray:
  if isinstance(v, np.ndarray):
    return v
  if hasattr(v, "detach"):  # torch.Tensor, without importing torch
    v = v.detach().cpu()
    if str(v.dtype) == "torch.bfloat16":
      v = v.float()
    return v.numpy()
  return np.asarray(v)


def normalize_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """MONAI >= 0.9 key names from any released layout.

  Strips the DistributedDataParallel `module.` prefix, names the encoder
  `swinViT.` where older research code wrote `swin_vit.`, and maps the old
  `mlp.fc1/fc2` names to `mlp.linear1/linear2`.

  Args:
    state_dict: raw state dict.

  Returns:
    A new dict with MONAI >= 0.9 key names.
  """
  out = {}
  for k, v in state_dict.items():
    if k.startswith("module."):
      k = k[len("module."):]
    if k.startswith("swin_vit."):
      k = "swinViT." + k[len("swin_vit."):]
    k = k.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
    if k in out:
      raise ConversionError(f"duplicate key after normalisation: {k}")
    out[k] = v
  return out


def _example_input(model) -> jnp.ndarray:
  # Param shapes do not depend on the input size; 64x64x32 is the smallest
  # input every model accepts (the SSL head needs 2 bottleneck tokens).
  return jnp.zeros((1, 64, 64, 32, model.in_channels), jnp.float32)


def abstract_params(model) -> Mapping:
  """Param shapes/dtypes of `model` via `jax.eval_shape` (nothing materialised)."""
  variables = jax.eval_shape(model.init, jax.random.key(0), _example_input(model))
  return variables["params"]


def params_from_torch(state_dict: Mapping[str, Any], kind: str, model) -> dict:
  """PyTorch state dict -> Flax params for `model`, strictly.

  Args:
    state_dict: tensors or arrays keyed like `params_to_torch` output; a
      `module.` prefix and `mlp.fc1/fc2` names are accepted.
    kind: "swin_unetr", "ssl_head" or "encoder".
    model: the Flax module (`SwinUNETR`, `SSLHead` or `SwinTransformer`) whose
      params to fill.

  Returns:
    The params dict (the content of `variables["params"]`), in the model's param_dtype.

  Raises:
    ConversionError: listing every missing key, unexpected key, shape mismatch
      and mismatching `relative_position_index` buffer.
  """
  sd = normalize_keys(state_dict)
  abstract = abstract_params(model)
  _check_kind(kind, set(abstract))
  expected, buffers = {}, {}
  for path, leaf in flax.traverse_util.flatten_dict(abstract).items():
    key = _torch_key(path)
    expected[key] = (path, leaf)
    if path[-1] == _TABLE_KEY:
      buffers[key[: -len(_TABLE_KEY)] + _INDEX_KEY] = _window_from_table(leaf.shape[0], key)
  missing = sorted(set(expected) - set(sd))
  unexpected = sorted(set(sd) - set(expected) - set(buffers))
  problems = [f"missing key: {k}" for k in missing] + [f"unexpected key: {k}" for k in unexpected]
  flat = {}
  for key, (path, leaf) in expected.items():
    if key not in sd:
      continue
    value = _as_numpy(sd[key])
    want = _to_torch_layout(path, np.zeros(leaf.shape, np.int8)).shape
    if value.shape != want:
      problems.append(f"shape mismatch: {key}: file {tuple(value.shape)}, model {tuple(want)}")
      continue
    flat[path] = jnp.asarray(_from_torch_layout(path, value), dtype=leaf.dtype)
  for key, window in buffers.items():
    if key in sd and not np.array_equal(_as_numpy(sd[key]), relative_position_index(window)):
      problems.append(f"buffer differs from MONAI's relative position index: {key}")
  if problems:
    raise ConversionError(f"state dict does not match {type(model).__name__} ({kind}): "
                          f"{len(problems)} problem(s):\n  " + "\n  ".join(problems))
  return flax.traverse_util.unflatten_dict(flat)


# --------------------------------------------------------------------------- inference
def model_kwargs_from_state_dict(sd: Mapping[str, Any], kind: str) -> dict:
  """Infer model constructor kwargs from a state dict's keys and shapes.

  Args:
    sd: PyTorch state dict (any of the supported key styles).
    kind: "swin_unetr", "ssl_head" or "encoder".

  Returns:
    kwargs for `models.build(kind, **kwargs)`: in_channels, feature_size,
    depths, num_heads, window_size, patch_size, mlp_ratio, qkv_bias, and
    out_channels (swin_unetr) or rotation_classes/contrastive_dim (ssl_head).
  """
  if kind not in models.KINDS:
    raise ValueError(f"unknown kind {kind!r}; use one of {models.KINDS}")
  sd = normalize_keys(sd)
  pre = "" if kind == "encoder" else "swinViT."

  def get(key):
    if key not in sd:
      raise ConversionError(f"cannot infer the {kind} architecture: missing key {key}")
    return _as_numpy(sd[key]).shape

  pe = get(pre + "patch_embed.proj.weight")
  feature_size, in_channels, patch = pe[0], pe[1], pe[2]
  depths, heads = [], []
  for i in range(1, 5):
    blocks = {int(m.group(1)) for k in sd
              if (m := re.match(re.escape(f"{pre}layers{i}.0.blocks.") + r"(\d+)\.", k))}
    if not blocks or blocks != set(range(len(blocks))):
      raise ConversionError(f"cannot infer depth of stage {i}: blocks {sorted(blocks)} under {pre}layers{i}.0")
    depths.append(len(blocks))
    heads.append(get(f"{pre}layers{i}.0.blocks.0.attn.{_TABLE_KEY}")[1])
  table_key = f"{pre}layers1.0.blocks.0.attn.{_TABLE_KEY}"
  window = _window_from_table(get(table_key)[0], table_key)[0]
  kwargs = dict(in_channels=int(in_channels), feature_size=int(feature_size), depths=tuple(depths),
                num_heads=tuple(int(h) for h in heads), window_size=int(window), patch_size=int(patch),
                mlp_ratio=get(f"{pre}layers1.0.blocks.0.mlp.linear1.weight")[0] / feature_size,
                qkv_bias=f"{pre}layers1.0.blocks.0.attn.qkv.bias" in sd)
  if kind == "swin_unetr":
    kwargs["out_channels"] = int(get("out.conv.conv.weight")[0])
  elif kind == "ssl_head":
    kwargs["rotation_classes"] = int(get("rotation_head.weight")[0])
    kwargs["contrastive_dim"] = int(get("contrastive_head.weight")[0])
  return kwargs


# --------------------------------------------------------------------------- encoder transfer
def encoder_state_dict(sd: Mapping[str, Any]) -> dict[str, Any]:
  """The Swin encoder part of a checkpoint, keyed like MONAI `SwinTransformer`.

  Accepts a BSF SSL checkpoint (`module.swinViT.*`), a MONAI SwinUNETR state
  dict (`swinViT.*`) or an original `model_swinvit.pt` (`module.patch_embed.*`).
  """
  sd = normalize_keys(sd)
  enc = {k[len("swinViT."):]: v for k, v in sd.items() if k.startswith("swinViT.")}
  return enc if enc else sd


def load_encoder_into(params: Mapping, sd: Mapping[str, Any], model) -> dict:
  """Replace `params["swinViT"]` with the encoder weights from a PyTorch checkpoint.

  This is how fine-tuning starts from BrainSegFounder SSL weights: the encoder
  must match exactly (every key and shape is checked); the checkpoint's SSL
  heads or decoder are not used (their key count is logged).

  Args:
    params: params of a `SwinUNETR` or `SSLHead`.
    sd: a state dict (see `encoder_state_dict` for accepted styles).
    model: the `SwinUNETR`/`SSLHead` the params belong to.

  Returns:
    A new params dict with `swinViT` replaced.
  """
  enc_sd = encoder_state_dict(sd)
  encoder = models.SwinTransformerNet(model.in_channels, config=model.config)
  enc_params = params_from_torch(enc_sd, "encoder", encoder)
  ignored = len(sd) - len(enc_sd)
  if ignored:
    logging.info("load_encoder_into: %d non-encoder keys not used", ignored)
  params = dict(_strip_params(params))
  params["swinViT"] = enc_params
  return params


# --------------------------------------------------------------------------- files
def detect_kind(sd: Mapping[str, Any]) -> str:
  """The kind a normalised state dict holds: an SSL head has `rotation_head.*`,
  a SwinUNETR `out.*`, anything else is taken as an encoder alone."""
  if "rotation_head.weight" in sd:
    return "ssl_head"
  if "out.conv.conv.weight" in sd:
    return "swin_unetr"
  return "encoder"


@dataclasses.dataclass(frozen=True)
class TorchFile:
  """What a PyTorch/safetensors weight file holds (`read_torch_file`).

  Attributes:
    path: the file.
    layout: the file's layout, in words.
    state_dict: NumPy arrays keyed like MONAI (`normalize_keys`).
    kind: "swin_unetr", "ssl_head" or "encoder" (`detect_kind`).
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
    """`model_kwargs_from_state_dict` of this file as `kind` (default: its own)."""
    kind = kind or self.kind
    return model_kwargs_from_state_dict(self.tensors_for(kind), kind)

  def tensors_for(self, kind: str) -> dict[str, np.ndarray]:
    """The tensors a model of `kind` takes: all of them, or the encoder's.

    An encoder target drops an SSL head's heads or a SwinUNETR's decoder.
    """
    if kind == "encoder":
      return encoder_state_dict(self.state_dict)
    if kind == self.kind:
      return self.state_dict
    raise ConversionError(f"{self.path} holds a {self.kind}, which cannot be read as a {kind} "
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
    raise ConversionError(
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
    ConversionError: a file that is not a state dict (naming what it holds),
      a pickled object (with the way to make a state dict of it), or an
      unknown recorded merging order.
  """
  raw, recorded, layout = _read_raw(path)
  if not isinstance(raw, Mapping) or not all(hasattr(v, "shape") for v in raw.values()):
    top = list(raw)[:10] if isinstance(raw, Mapping) else type(raw).__name__
    raise ConversionError(f"{path}: not a state dict nor {{'state_dict': ...}}: {top}")
  sd = normalize_keys({k: _as_numpy(v) for k, v in raw.items()})
  if recorded is not None:
    if recorded not in PATCH_MERGING_ORDERS:
      raise ConversionError(f"{path}: recorded patch merging {recorded!r} is not one of "
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
  return TorchFile(path=path, layout=layout, state_dict=sd, kind=detect_kind(sd),
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
  arrays = {k: np.ascontiguousarray(_as_numpy(v)) for k, v in sd.items()}
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
    ckptr.save(os.path.join(directory, PARAMS_DIR), {"params": _strip_params(params)}, force=force)
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
  target = {"params": abstract_params(model)}
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(os.path.join(directory, PARAMS_DIR), target)
  return restored["params"], kind, {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


# --------------------------------------------------------------------------- CLI
def _overrides(args) -> dict:
  out = {}
  for name in ("in_channels", "out_channels", "feature_size"):
    if getattr(args, name) is not None:
      out[name] = getattr(args, name)
  if args.depths:
    out["depths"] = models.decode_size(args.depths)
  if args.num_heads:
    out["num_heads"] = tuple(int(h) for h in args.num_heads.split(","))
  return out


def choose_patch_merging(torch_file: TorchFile, stated: str | None) -> tuple[str, str]:
  """(order, report line) for importing `torch_file`, `stated` by the user or None.

  Raises:
    ConversionError: the file does not say and nothing was stated.
  """
  if stated is None:
    if torch_file.patch_merging is None:
      raise ConversionError(
          f"{torch_file.path}: {torch_file.merging_reason}: state it with --patch_merging "
          f"all_neighbours ({MONAI_VERSIONS['all_neighbours']}) or duplicated_neighbours "
          f"({MONAI_VERSIONS['duplicated_neighbours']}, BrainSegFounder's releases)")
    return torch_file.patch_merging, f"patch merging {torch_file.patch_merging} (from the file)"
  if torch_file.patch_merging not in (None, stated):
    return stated, (f"patch merging {stated} as stated, NOT the file's "
                    f"{torch_file.patch_merging} ({torch_file.merging_reason}): the model "
                    "computes a different function from the one these weights were trained as")
  return stated, f"patch merging {stated} (as stated)"


def main(argv=None) -> None:
  """CLI entry point; see the module docstring."""
  p = argparse.ArgumentParser(prog="python -m bsf_jax.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--inspect", metavar="FILE",
                 help="print what a torch/safetensors file holds; write nothing")
  p.add_argument("--from", dest="src", help="torch/safetensors file or bsf_jax checkpoint dir")
  p.add_argument("--to", dest="dst", help="checkpoint dir, or .pt/.pth/.safetensors file")
  p.add_argument("--kind", choices=models.KINDS,
                 help="model kind to import as (default: what the file holds)")
  p.add_argument("--patch_merging", choices=tuple(PATCH_MERGING_ORDERS),
                 help="the order the weights were trained with (default: the file's record, "
                      "or duplicated_neighbours for a {'state_dict': ...} checkpoint)")
  p.add_argument("--in_channels", type=int)
  p.add_argument("--out_channels", type=int)
  p.add_argument("--feature_size", type=int)
  p.add_argument("--depths", help="tiny|small|big or e.g. 2,2,6,2")
  p.add_argument("--num_heads", help="e.g. 3,6,12,24")
  p.add_argument("--bsf", action="store_true", help="export as a BSF checkpoint (module. prefix, wrapped)")
  p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint dir")
  args = p.parse_args(argv)
  if args.inspect:
    print(read_torch_file(args.inspect).describe(args.kind))
    return
  if not args.src or not args.dst:
    p.error("--from and --to are required (or --inspect FILE)")
  if os.path.isdir(args.src):
    params, kind, kwargs = load_params(args.src)
    if args.kind and args.kind != kind:
      raise SystemExit(f"--kind {args.kind} but {args.src} holds a {kind}")
    order = kwargs.get("patch_merging", "all_neighbours")
    save_torch_file(params_to_numpy(params, kind), args.dst, order, bsf=args.bsf)
    print(f"wrote {kind} {kwargs} -> {args.dst}\n  {monai_export_note(order)}")
    return
  torch_file = read_torch_file(args.src)
  kind = args.kind or torch_file.kind
  order, order_line = choose_patch_merging(torch_file, args.patch_merging)
  sd = torch_file.tensors_for(kind)
  kwargs = model_kwargs_from_state_dict(sd, kind)
  kwargs.update(_overrides(args))
  kwargs["patch_merging"] = order
  model = models.build(kind, **kwargs)
  params = params_from_torch(sd, kind, model)
  save_params(args.dst, params, kind, kwargs, force=args.force)
  print(f"{torch_file.describe(kind)}\n  imported with {order_line}\nwrote {kind} -> {args.dst}")


if __name__ == "__main__":
  main()
