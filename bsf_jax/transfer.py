"""Stage transfer: start a model from a previous stage's weights.

`config.init_from` may be a bsf_jax workdir or checkpoint step, or a PyTorch
or safetensors file in the MONAI SwinUNETR, BrainSegFounder SSL or original
`model_swinvit.pt` format (through `bsf_jax.convert`).

Params are matched by path. Equal shapes are copied. A shape that differs only
in the modality-channel axis (the patch embedding's input channels, the SSL
reconstruction's output channels) is adapted by modality *name* when
`config.init_adapt_channels` declares it (the paper's stage transfer): channels whose
modality exists in both runs are copied (UKB t1 -> BraTS t1, UKB flair ->
BraTS flair), new ones get Kaiming-normal (fan_out) weights and zero biases.
The released BSF script re-initialises the whole patch embedding instead; we
follow the paper. Any other mismatch is an error that lists every culprit.
A report of loaded / adapted / new / dropped params is logged and printed.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ml_collections
import numpy as np
from flax import traverse_util

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


class TransferError(ValueError):
  """The source weights cannot be loaded into this model."""


def load_source(path: str) -> tuple[dict[str, Any], tuple[str, ...] | None]:
  """Loads a previous stage's params (numpy tree) and its modalities."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.init_from={path!r} does not exist")
  if os.path.isfile(path):
    if not path.endswith(_TORCH_SUFFIXES):
      raise TransferError(
          f"config.init_from={path!r} is a file but not a PyTorch/safetensors "
          f"file ({', '.join(_TORCH_SUFFIXES)})")
    try:
      return load_torch_params(path), None
    except Exception as e:
      # torch/safetensors errors (a refused pickle, a truncated zip) do not
      # say which file; the user needs to know it was config.init_from.
      raise TransferError(f"config.init_from={path!r}: cannot read weights "
                          f"({type(e).__name__}: {e})") from e
  from bsf_jax import checkpointing
  params, meta, step = checkpointing.restore_params(path, "latest")
  modalities = meta.get("contract", {}).get("modalities")
  logging.info("init_from: %s step %d (modalities %s)", path, step, modalities)
  return params, tuple(modalities) if modalities else None


def load_torch_params(path: str) -> dict[str, Any]:
  """Reads any supported PyTorch/safetensors file as a bsf_jax params tree.

  The format is recognised by its keys: a BSF SSL checkpoint has
  `rotation_head.*`, a MONAI SwinUNETR has `out.*`, and an encoder alone
  (`model_swinvit.pt`, or our `swinViT.*` export of an SSL run) has only the
  Swin transformer. The architecture is inferred from the shapes.
  """
  # pylint: disable=g-import-not-at-top
  from bsf_jax import convert  # Needs torch or safetensors: lazy.
  from bsf_jax import models

  state_dict = convert.normalize_keys(convert.load_torch_file(path))
  if "rotation_head.weight" in state_dict:
    kind = "ssl_head"
  elif "out.conv.conv.weight" in state_dict:
    kind = "swin_unetr"
  else:
    kind = "encoder"
    state_dict = convert.encoder_state_dict(state_dict)
  kwargs = convert.model_kwargs_from_state_dict(state_dict, kind)
  model = models.build(kind, **kwargs)
  params = convert.params_from_torch(state_dict, kind, model)
  logging.info("init_from: %s read as %s %s", path, kind, kwargs)
  return {"swinViT": params} if kind == "encoder" else params


def _encoder_view(source: dict[str, Any]) -> dict[str, Any]:
  """An encoder-only source (model_swinvit.pt) sits under `swinViT`."""
  if "swinViT" not in source and "patch_embed" in source:
    return {"swinViT": source}
  return source


def _kaiming_fan_out(rng: np.random.Generator, shape: tuple[int, ...],
                     out_axis: int = -1) -> np.ndarray:
  # PyTorch kaiming_normal_(mode="fan_out", nonlinearity="leaky_relu", a=0):
  # std = sqrt(2 / fan_out), fan_out = out_channels * receptive field.
  receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
  fan_out = shape[out_axis] * receptive
  return rng.normal(0.0, np.sqrt(2.0 / fan_out), size=shape).astype(np.float32)


def _adapt(name: str, src: np.ndarray, tgt: np.ndarray,
           src_mods: tuple[str, ...], tgt_mods: tuple[str, ...],
           rng: np.random.Generator) -> tuple[np.ndarray, str]:
  """Maps the one modality axis of `src` onto `tgt`'s modalities by name."""
  differing = [a for a in range(src.ndim) if src.shape[a] != tgt.shape[a]]
  if src.ndim != tgt.ndim or len(differing) != 1:
    raise TransferError(f"{name}: shape {src.shape} vs {tgt.shape}")
  axis = differing[0]
  if (src.shape[axis], tgt.shape[axis]) != (len(src_mods), len(tgt_mods)):
    raise TransferError(
        f"{name}: axis {axis} has {src.shape[axis]} -> {tgt.shape[axis]} "
        f"channels, but the modalities are {src_mods} -> {tgt_mods}")
  is_bias = src.ndim == 1
  out = (np.zeros(tgt.shape, np.float32) if is_bias else
         _kaiming_fan_out(rng, tgt.shape))
  kept = []
  for j, modality in enumerate(tgt_mods):
    if modality in src_mods:
      index = [slice(None)] * src.ndim
      index[axis] = src_mods.index(modality)
      out_index = [slice(None)] * src.ndim
      out_index[axis] = j
      out[tuple(out_index)] = src[tuple(index)]
      kept.append(modality)
  new = [m for m in tgt_mods if m not in kept]
  return out.astype(tgt.dtype), f"kept {kept}, new {new}"


def transfer_params(source: dict[str, Any], target: dict[str, Any], *,
                    src_modalities: tuple[str, ...] | None,
                    tgt_modalities: tuple[str, ...], adapt_channels: bool,
                    seed: int = 0) -> tuple[dict[str, Any], str]:
  """Copies `source` into `target` by path; returns (params, report)."""
  src = traverse_util.flatten_dict(_encoder_view(source), sep="/")
  tgt = traverse_util.flatten_dict(target, sep="/")
  rng = np.random.default_rng(seed)
  out, loaded, adapted, errors = {}, [], [], []
  for name, value in tgt.items():
    if name not in src:
      out[name] = value
      continue
    s = np.asarray(src[name])
    if s.shape == tuple(value.shape):
      out[name] = s.astype(value.dtype)
      loaded.append(name)
    elif adapt_channels and src_modalities is not None:
      try:
        out[name], how = _adapt(name, s, np.asarray(value), src_modalities,
                                tgt_modalities, rng)
        adapted.append(f"{name}: {how}")
      except TransferError as e:
        errors.append(str(e))
    else:
      errors.append(f"{name}: source {s.shape} vs model {tuple(value.shape)}")
  if errors:
    hint = ("" if adapt_channels else
            " (set config.init_adapt_channels=True to map modality channels "
            "by name)")
    if adapt_channels and src_modalities is None:
      hint = (" (the source has no recorded modalities: set "
              "config.init_from_modalities)")
    raise TransferError("Cannot load weights, shape mismatches:\n  " +
                        "\n  ".join(errors) + hint)
  new = sorted(n for n in tgt if n not in src)
  dropped = sorted(n for n in src if n not in tgt)
  if not loaded and not adapted:
    raise TransferError(
        "No parameter of the source matches this model by name; source "
        f"starts with {sorted(src)[:3]}, model with {sorted(tgt)[:3]}")
  report = "\n".join([
      f"init_from: loaded {len(loaded)}, adapted {len(adapted)}, new "
      f"{len(new)}, dropped {len(dropped)} params",
      *(f"  adapted {a}" for a in adapted),
      *(f"  new {n}" for n in _summarise(new)),
      *(f"  dropped {n}" for n in _summarise(dropped)),
  ])
  return traverse_util.unflatten_dict(out, sep="/"), report


def _summarise(names: list[str]) -> list[str]:
  """Groups params by their top-level module to keep the report short."""
  groups: dict[str, int] = {}
  for n in names:
    groups[n.split("/")[0]] = groups.get(n.split("/")[0], 0) + 1
  return [f"{g}/* ({c} params)" for g, c in sorted(groups.items())]


def load_into(config: ml_collections.ConfigDict, model: Any,
              params: dict[str, Any]) -> dict[str, Any]:
  """Loads `config.init_from` into freshly initialised `params`."""
  del model  # Structure comes from `params`.
  source, src_mods = load_source(config.init_from)
  if config.get("init_from_modalities"):
    src_mods = tuple(config.init_from_modalities)
  new_params, report = transfer_params(
      source, params, src_modalities=src_mods,
      tgt_modalities=tuple(config.data.modalities),
      adapt_channels=config.init_adapt_channels, seed=config.seed)
  logging.info("%s", report)
  print(report)
  return new_params
