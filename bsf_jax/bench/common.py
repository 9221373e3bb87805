"""What the benchmarks share: their flags, peak memory, JSON results."""

from __future__ import annotations

import json
import os
import types
from typing import Any, Sequence

from absl import flags

from bsf_jax import tool_flags


def define_kernel_flags(flag_values: flags.FlagValues) -> None:
  """--impl, --attention, --remat, --dtype, --torch-device, --amp, --json of a model benchmark."""
  from bsf_jax.models import swin_config  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum("impl", "auto", swin_config.IMPLS, "kernel path (docs/models.md)",
                    flag_values=flag_values)
  flags.DEFINE_enum("attention", "einsum", swin_config.ATTENTION_KERNELS,
                    "attention kernel (docs/models.md)", flag_values=flag_values)
  flags.DEFINE_enum("remat", "none", swin_config.REMAT_CHOICES,
                    "rematerialisation (docs/models.md)", flag_values=flag_values)
  flags.DEFINE_enum("dtype", "fp32", ("fp32", "bf16"), "bsf_jax compute dtype",
                    flag_values=flag_values)
  flags.DEFINE_string("torch-device", "cpu", "device of the PyTorch reference (cpu or cuda)",
                      flag_values=flag_values)
  flags.DEFINE_bool("amp", False, "reference under torch.autocast(bfloat16), as AMP training runs",
                    flag_values=flag_values)
  flags.DEFINE_string("json", "", "also write the results to this JSON file",
                      flag_values=flag_values)


def parse(flag_values: flags.FlagValues, argv: Sequence[str] | None) -> types.SimpleNamespace:
  """A benchmark's flags, parsed from `argv` (the words after the program name).

  By attribute, `-` in a name read as `_` (`args.torch_device` for
  --torch-device): the benchmarks hand them on whole, and `vars(args)` is the
  record of a run in their JSON results.
  """
  tool_flags.parse(flag_values, argv)
  return types.SimpleNamespace(**{name.replace("-", "_"): value
                                  for name, value in flag_values.flag_values_dict().items()})


def compute_dtype(args: types.SimpleNamespace):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.bfloat16 if args.dtype == "bf16" else jnp.float32


def jax_peak_memory_bytes() -> int | None:
  """Peak bytes in use on the first jax device (None where not reported, e.g. CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def torch_autocast(args: types.SimpleNamespace):
  """The reference's autocast context (bfloat16 with --amp, else a no-op)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  if not args.amp:
    return contextlib.nullcontext()
  return torch.autocast(device_type=args.torch_device.split(":")[0], dtype=torch.bfloat16)


def torch_peak_memory_bytes(args: types.SimpleNamespace) -> int | None:
  import torch  # pylint: disable=g-import-not-at-top
  if args.torch_device.startswith("cuda"):
    return int(torch.cuda.max_memory_allocated())
  return None


def torch_sync(args: types.SimpleNamespace) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  if args.torch_device.startswith("cuda"):
    torch.cuda.synchronize()


def write_json(path: str, result: dict[str, Any]) -> None:
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2, default=str)
