"""What the model benchmarks share: the kernel flags, peak memory, JSON results."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def add_kernel_args(p: argparse.ArgumentParser) -> None:
  """--impl, --attention, --remat, --dtype, --torch-device, --amp, --json."""
  from bsf_jax.models import swin_config  # pylint: disable=g-import-not-at-top
  p.add_argument("--impl", default="auto", choices=swin_config.IMPLS,
                 help="kernel path (docs/models.md)")
  p.add_argument("--attention", default="einsum", choices=swin_config.ATTENTION_KERNELS)
  p.add_argument("--remat", default="none", choices=swin_config.REMAT_CHOICES)
  p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                 help="bsf_jax compute dtype")
  p.add_argument("--torch-device", default="cpu", help="device of the PyTorch reference "
                 "(cpu or cuda)")
  p.add_argument("--amp", action="store_true",
                 help="reference under torch.autocast(bfloat16), as AMP training runs")
  p.add_argument("--json", default="", help="also write the results to this JSON file")


def compute_dtype(args: argparse.Namespace):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.bfloat16 if args.dtype == "bf16" else jnp.float32


def jax_peak_memory_bytes() -> int | None:
  """Peak bytes in use on the first jax device (None where not reported, e.g. CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def torch_autocast(args: argparse.Namespace):
  """The reference's autocast context (bfloat16 with --amp, else a no-op)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  if not args.amp:
    return contextlib.nullcontext()
  return torch.autocast(device_type=args.torch_device.split(":")[0], dtype=torch.bfloat16)


def torch_peak_memory_bytes(args: argparse.Namespace) -> int | None:
  import torch  # pylint: disable=g-import-not-at-top
  if args.torch_device.startswith("cuda"):
    return int(torch.cuda.max_memory_allocated())
  return None


def torch_sync(args: argparse.Namespace) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  if args.torch_device.startswith("cuda"):
    torch.cuda.synchronize()


def write_json(path: str, result: dict[str, Any]) -> None:
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2, default=str)
