"""Two-way weight conversion between bsf_jax (Flax) and PyTorch/MONAI checkpoints.

Kinds and their PyTorch key spaces:
  "swin_unetr": MONAI `SwinUNETR.state_dict()` (`swinViT.*`, `encoder1.*`, ..., `out.*`).
  "ssl_head":   BrainSegFounder SSL head (`swinViT.*`, `rotation_head.*`,
                `contrastive_head.*`, `conv.<i>.*`), see `bsf_jax/reference/ssl_head.py`.
  "encoder":    MONAI `SwinTransformer.state_dict()` (`patch_embed.*`, `layers1.0.*`, ...).

Files read: MONAI state dicts (.pt/.pth/.safetensors), BrainSegFounder
checkpoints `{"state_dict": {"module.*": ...}, "global_step", "epoch"}`, and the
original `model_swinvit.pt` (`module.patch_embed.*`, `module.layers1.0.*`,
`mlp.fc1/fc2`). The `module.` prefix and `fc1/fc2` names are normalised on
import. PyTorch files are opened with `torch.load(..., weights_only=True)`.
Every missing key, unexpected key and shape mismatch is reported by name.

CLI:
  python -m bsf_jax.convert --from model.pt --kind swin_unetr --to ckpt_dir
  python -m bsf_jax.convert --from ckpt_dir --to model.safetensors [--bsf]
"""

import argparse
import json
import logging
import os
import re
from typing import Any, Mapping

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from bsf_jax import models
from bsf_jax.models.swin import relative_position_index

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
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
  """Strip the DistributedDataParallel `module.` prefix and map old `mlp.fc1/fc2` names.

  Args:
    state_dict: raw state dict.

  Returns:
    A new dict with MONAI >= 0.9 key names.
  """
  out = {}
  for k, v in state_dict.items():
    if k.startswith("module."):
      k = k[len("module."):]
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
def load_torch_file(path: str) -> dict[str, np.ndarray]:
  """Read a state dict from .safetensors or a torch file (weights_only=True).

  A `{"state_dict": ...}` wrapper (BSF / model_swinvit.pt) is unwrapped.

  Returns:
    dict of NumPy arrays with the file's key names.
  """
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return dict(load_file(path))
  import torch  # pylint: disable=g-import-not-at-top
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, Mapping) and "state_dict" in obj:
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping) or not all(hasattr(v, "shape") for v in obj.values()):
    top = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise ConversionError(f"{path}: not a state dict nor {{'state_dict': ...}}: {top}")
  return {k: _as_numpy(v) for k, v in obj.items()}


def save_torch_file(sd: Mapping[str, Any], path: str, bsf: bool = False,
                    global_step: int = 0, epoch: int = 0) -> None:
  """Write a state dict as .safetensors or a torch .pt file.

  Args:
    sd: arrays or tensors keyed like MONAI.
    path: output file; ".safetensors" selects safetensors, anything else torch.save.
    bsf: write the BrainSegFounder layout: keys prefixed `module.` inside
      `{"state_dict": ..., "global_step": ..., "epoch": ...}` (torch files only).
    global_step, epoch: stored with `bsf`.
  """
  arrays = {k: np.ascontiguousarray(_as_numpy(v)) for k, v in sd.items()}
  if path.endswith(".safetensors"):
    if bsf:
      raise ValueError("the BSF wrapper needs a torch file (.pt), not safetensors")
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file(arrays, path)
    return
  import torch  # pylint: disable=g-import-not-at-top
  tensors = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}
  if bsf:
    tensors = {"state_dict": {"module." + k: v for k, v in tensors.items()},
               "global_step": int(global_step), "epoch": int(epoch)}
  torch.save(tensors, path)


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


def main(argv=None) -> None:
  """CLI entry point; see the module docstring."""
  p = argparse.ArgumentParser(prog="python -m bsf_jax.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--from", dest="src", required=True, help="torch/safetensors file or bsf_jax checkpoint dir")
  p.add_argument("--to", dest="dst", required=True, help="checkpoint dir, or .pt/.pth/.safetensors file")
  p.add_argument("--kind", choices=models.KINDS, help="model kind (torch -> jax; read from the config otherwise)")
  p.add_argument("--in_channels", type=int)
  p.add_argument("--out_channels", type=int)
  p.add_argument("--feature_size", type=int)
  p.add_argument("--depths", help="tiny|small|big or e.g. 2,2,6,2")
  p.add_argument("--num_heads", help="e.g. 3,6,12,24")
  p.add_argument("--bsf", action="store_true", help="export as a BSF checkpoint (module. prefix, wrapped)")
  p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint dir")
  args = p.parse_args(argv)
  if os.path.isdir(args.src):
    params, kind, kwargs = load_params(args.src)
    if args.kind and args.kind != kind:
      raise SystemExit(f"--kind {args.kind} but {args.src} holds a {kind}")
    save_torch_file(params_to_numpy(params, kind), args.dst, bsf=args.bsf)
    print(f"wrote {kind} {kwargs} -> {args.dst}")
    return
  if not args.kind:
    raise SystemExit("--kind is required when converting from a torch file")
  sd = normalize_keys(load_torch_file(args.src))
  kwargs = model_kwargs_from_state_dict(sd, args.kind)
  kwargs.update(_overrides(args))
  model = models.build(args.kind, **kwargs)
  params = params_from_torch(sd, args.kind, model)
  save_params(args.dst, params, args.kind, kwargs, force=args.force)
  print(f"wrote {args.kind} {kwargs} -> {args.dst}")


if __name__ == "__main__":
  main()
