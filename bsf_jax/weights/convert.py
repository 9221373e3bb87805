"""The name and layout table between bsf_jax (Flax) params and PyTorch/MONAI state dicts.

Kinds and their PyTorch key spaces:
  "swin_unetr": MONAI `SwinUNETR.state_dict()` (`swinViT.*`, `encoder1.*`, ..., `out.*`).
  "ssl_head":   BrainSegFounder SSL head (`swinViT.*`, `rotation_head.*`,
                `contrastive_head.*`, `conv.<i>.*`), see `bsf_jax/reference/ssl_head.py`.
  "encoder":    MONAI `SwinTransformer.state_dict()` (`patch_embed.*`, `layers1.0.*`, ...).

Each Flax param maps to one PyTorch key (`_torch_key`) and its layout is
transposed (Dense (in, out) <-> Linear (out, in), DHWIO <-> OIDHW); the
`relative_position_index` buffers MONAI keeps are recomputed. Released key
styles (the DistributedDataParallel `module.` prefix, `swin_vit.`, `mlp.fc1/fc2`)
are normalised (`normalize_keys`), and the architecture is read from the keys
and tensor shapes (`model_kwargs_from_state_dict`). Every missing key,
unexpected key and shape mismatch is reported by name.

Reading and writing the files themselves (PyTorch, safetensors, bsf_jax params
checkpoints) is `bsf_jax.weights.weight_files`; the command line is
`python -m bsf_jax.convert`.
"""

import logging
import re
from typing import Any, Mapping

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from bsf_jax import models
from bsf_jax.models.swin import relative_position_index

_INDEX_KEY = "relative_position_index"
_TABLE_KEY = "relative_position_bias_table"
_CONV_WRAPPED = ("conv1", "conv2", "conv3", "transp_conv")  # MONAI `Convolution` wraps `.conv`


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


def strip_params(params: Mapping) -> Mapping:
  """The params tree itself, from `variables` (`{"params": ...}`) or the tree."""
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
  params = strip_params(params)
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
def as_numpy(v) -> np.ndarray:
  """A NumPy array of an array or a torch.Tensor (bfloat16 as float32)."""
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
    value = as_numpy(sd[key])
    want = _to_torch_layout(path, np.zeros(leaf.shape, np.int8)).shape
    if value.shape != want:
      problems.append(f"shape mismatch: {key}: file {tuple(value.shape)}, model {tuple(want)}")
      continue
    flat[path] = jnp.asarray(_from_torch_layout(path, value), dtype=leaf.dtype)
  for key, window in buffers.items():
    if key in sd and not np.array_equal(as_numpy(sd[key]), relative_position_index(window)):
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
    return as_numpy(sd[key]).shape

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
  params = dict(strip_params(params))
  params["swinViT"] = enc_params
  return params


# --------------------------------------------------------------------------- kind
def detect_kind(sd: Mapping[str, Any]) -> str:
  """The kind a normalised state dict holds: an SSL head has `rotation_head.*`,
  a SwinUNETR `out.*`, anything else is taken as an encoder alone."""
  if "rotation_head.weight" in sd:
    return "ssl_head"
  if "out.conv.conv.weight" in sd:
    return "swin_unetr"
  return "encoder"
