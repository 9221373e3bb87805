"""Stage transfer: start a model from a previous stage's weights.

`config.init_from` may be a bsf_jax workdir or checkpoint step, or a PyTorch
or safetensors file in the MONAI SwinUNETR, BrainSegFounder SSL or original
`model_swinvit.pt` format (through `bsf_jax.weights.weight_files`).

Params are matched by path. Equal shapes are copied. A shape that differs only
in the modality-channel axis (the patch embedding's input channels, the SSL
reconstruction's output channels) is adapted by modality *name* when
`config.init_adapt_channels` declares it (the paper's stage transfer): channels whose
modality exists in both runs are copied (UKB t1 -> BraTS t1, UKB flair ->
BraTS flair), new ones get Kaiming-normal (fan_out) weights and zero biases.
The released BSF script re-initialises the whole patch embedding instead; we
follow the paper. Any other mismatch is an error that lists every culprit.
A report of loaded / adapted / new / dropped params is logged and printed.

A workdir source gives the checkpoint `config.init_from_step` names: "best"
by the source run's own validation metric, "latest", or a step number.

`config.model.patch_merging="auto"` takes the order the source was trained
with (`resolve_patch_merging`): a bsf_jax run's recorded order, a file's
record, "duplicated_neighbours" for BrainSegFounder's releases and
`model_swinvit.pt`. A bare state dict that does not say is refused until the
order is stated. A stated order that differs from the source's is reported.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


class TransferError(ValueError):
  """The source weights cannot be loaded into this model."""


def _read_torch_file(path: str):
  """`weight_files.read_torch_file` of `config.init_from`, errors naming it."""
  if not path.endswith(_TORCH_SUFFIXES):
    raise TransferError(
        f"config.init_from={path!r} is a file but not a PyTorch/safetensors "
        f"file ({', '.join(_TORCH_SUFFIXES)})")
  from bsf_jax.weights import weight_files  # pylint: disable=g-import-not-at-top  # Needs torch: lazy.
  try:
    return weight_files.read_torch_file(path)
  except Exception as e:
    # torch/safetensors errors (a refused pickle, a truncated zip) do not
    # say which file; the user needs to know it was config.init_from.
    raise TransferError(f"config.init_from={path!r}: cannot read weights "
                        f"({type(e).__name__}: {e})") from e


def _which_step(init_from_step: str | int) -> str | int:
  """config.init_from_step as `checkpoint_reads.restore_params` takes it."""
  if isinstance(init_from_step, int) or str(init_from_step).isdigit():
    return int(init_from_step)
  if init_from_step not in ("best", "latest"):
    raise TransferError(f"config.init_from_step={init_from_step!r}: expected 'best', "
                        "'latest' or a step number")
  return init_from_step


def load_source(path: str, init_from_step: str | int = "best", target: Any = None,
                adapt_channels: bool = False
                ) -> tuple[dict[str, Any], tuple[str, ...] | None, str]:
  """A previous stage's params, its modalities and where they came from.

  Args:
    path: `config.init_from`: a workdir, a checkpoint step, or a weight file.
    init_from_step: for a workdir, "best" (by the source run's own
      validation metric), "latest", or a step number.
    target: None (the source's params as numpy arrays), or the params they
      go into as sharded `jax.Array`s: a workdir's params are then restored
      straight into the shardings of the target's params of the same name
      and shape (`checkpoint_reads.restore_params(placement=...)`); params the
      target lacks are not read, nor (without `adapt_channels`) those of
      another shape.
    adapt_channels: with `target`, read params whose shape differs on the host
      (`_adapt` maps their modality channels).
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.init_from={path!r} does not exist")
  if os.path.isfile(path):
    torch_file = _read_torch_file(path)
    return load_torch_params(torch_file), None, torch_file.describe()
  from bsf_jax.run import checkpoint_reads  # pylint: disable=g-import-not-at-top
  which = _which_step(init_from_step)
  placement = None
  if target is not None:
    wanted = traverse_util.flatten_dict(target, sep="/")

    def place(name, metadata):
      if name not in wanted:
        return None
      if tuple(metadata.shape) == tuple(wanted[name].shape):
        return wanted[name].sharding
      # Another shape: only `_adapt` reads it (a modality-channel axis: small).
      return (jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
              if adapt_channels else None)
    placement = place
  params, meta, step = checkpoint_reads.restore_params(path, which,
                                                       placement=placement)
  modalities = meta.get("contract", {}).get("modalities")
  metric = checkpoint_reads.best_metric_of(meta)[0]
  how = {"best": f"best by {metric}", "latest": "latest"}.get(which, "as asked")
  if which == "best" and metric not in meta.get("metrics", {}):
    how = f"latest: no kept step has {metric}"
  origin = f"init_from: {path} step {step} ({how}), modalities {modalities}"
  logging.info("%s", origin)
  return params, tuple(modalities) if modalities else None, origin


def load_torch_params(torch_file) -> dict[str, Any]:
  """A `weight_files.TorchFile` as a bsf_jax params tree (an encoder under `swinViT`)."""
  # pylint: disable=g-import-not-at-top
  from bsf_jax.weights import convert
  from bsf_jax import models
  kind = torch_file.kind
  state_dict = torch_file.tensors_for(kind)
  model = models.build(kind, **convert.model_kwargs_from_state_dict(state_dict, kind))
  params = convert.params_from_torch(state_dict, kind, model)
  return {"swinViT": params} if kind == "encoder" else params


def source_patch_merging(path: str) -> tuple[str | None, str]:
  """(the order `config.init_from`'s weights were trained with or None, why)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.init_from={path!r} does not exist")
  if os.path.isfile(path):
    torch_file = _read_torch_file(path)
    return torch_file.patch_merging, torch_file.merging_reason
  from bsf_jax.run import checkpoint_reads  # pylint: disable=g-import-not-at-top
  model = checkpoint_reads.run_meta(path).get("contract", {}).get("model", {})
  if "patch_merging" not in model:
    raise TransferError(f"config.init_from={path!r}: its checkpoints' metadata records no "
                        "model contract (contract.model.patch_merging)")
  return model["patch_merging"], "recorded by the bsf_jax run"


def resolve_patch_merging(config: ml_collections.ConfigDict) -> str:
  """Sets an "auto" `config.model.patch_merging` to the order of `config.init_from`.

  Without init_from, "auto" is "all_neighbours" (MONAI >= 1.5). A stated
  order that differs from the source's is allowed and logged.

  Returns:
    A line for the run's log saying what was chosen and why.
  """
  from bsf_jax.models.swin_config import MONAI_VERSIONS  # pylint: disable=g-import-not-at-top
  stated = config.model.patch_merging
  if not config.init_from:
    if stated == "auto":
      config.model.patch_merging = "all_neighbours"
    return f"patch merging {config.model.patch_merging}"
  source, why = source_patch_merging(config.init_from)
  if stated == "auto":
    if source is None:
      raise TransferError(
          f"config.init_from={config.init_from!r}: {why}: set config.model.patch_merging to "
          f"all_neighbours ({MONAI_VERSIONS['all_neighbours']}) or duplicated_neighbours "
          f"({MONAI_VERSIONS['duplicated_neighbours']}, BrainSegFounder's releases)")
    config.model.patch_merging = source
    return f"patch merging {source} from config.init_from ({why})"
  if source not in (None, stated):
    line = (f"patch merging {stated} as configured, NOT config.init_from's {source} ({why}): "
            "the pretrained encoder computes a different function from the one it was trained as")
    logging.warning("%s", line)
    return line
  return f"patch merging {stated} (as configured)"


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
    s = src[name]
    if tuple(s.shape) == tuple(value.shape):
      out[name] = _placed_like(s, value)
      loaded.append(name)
    elif adapt_channels and src_modalities is not None:
      try:
        adapted_value, how = _adapt(name, np.asarray(s), np.asarray(value), src_modalities,
                                    tgt_modalities, rng)
        out[name] = _placed_like(adapted_value, value)
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


def _placed_like(source: Any, value: Any) -> Any:
  """`source` with `value`'s dtype, placed as `value` is (host, or its sharding)."""
  if isinstance(value, jax.Array):
    if not isinstance(source, jax.Array) or source.sharding != value.sharding:
      source = jax.device_put(np.asarray(source) if not isinstance(source, jax.Array)
                              else source, value.sharding)
    return source.astype(value.dtype)
  return np.asarray(source).astype(value.dtype)


def _summarise(names: list[str]) -> list[str]:
  """Groups params by their top-level module to keep the report short."""
  groups: dict[str, int] = {}
  for n in names:
    groups[n.split("/")[0]] = groups.get(n.split("/")[0], 0) + 1
  return [f"{g}/* ({c} params)" for g, c in sorted(groups.items())]


def load_into(config: ml_collections.ConfigDict, model: Any,
              params: dict[str, Any]) -> dict[str, Any]:
  """Loads `config.init_from` into freshly initialised `params`.

  `params` are host arrays, or the run's sharded `jax.Array`s: then every
  param comes back sharded as its initial value was, a workdir source is
  restored straight into those shardings, and no host holds the whole tree.
  """
  del model  # Structure comes from `params`.
  sharded = any(isinstance(v, jax.Array) for v in jax.tree.leaves(params))
  source, src_mods, origin = load_source(
      config.init_from, config.init_from_step, target=params if sharded else None,
      adapt_channels=config.init_adapt_channels)
  if config.get("init_from_modalities"):
    src_mods = tuple(config.init_from_modalities)
  new_params, report = transfer_params(
      source, params, src_modalities=src_mods,
      tgt_modalities=tuple(config.data.modalities),
      adapt_channels=config.init_adapt_channels, seed=config.seed)
  report = f"{origin}\n{report}"
  logging.info("%s", report)
  print(report)
  return new_params
