"""Memory pre-flight: does the compiled train step fit on the devices?

Every run (and `--dry_run`) compiles its train step for the real mesh before
any data is read or any checkpoint is opened (`train_step.compile_step`,
called by `trainers/loop.py`); this module only measures that program:
it compares XLA's per-device memory for the program with the device's capacity.
A step that cannot fit stops there, with the ways out, instead of failing
with an out-of-memory error after the data loaders started and a resume was
restored. The compiled step is the one the run then executes.

XLA's `memory_analysis()` gives per device: arguments (state and batch),
outputs, temporaries, and the bytes an output shares with a donated
argument; the peak is arguments + outputs + temporaries - aliased bytes.
Capacity is the device's `memory_stats()["bytes_limit"]` (GPUs and TPUs);
CPU devices report none, so there the report has no verdict.

The same compiled program gives the step's FLOPs (XLA's cost analysis) for
the console's model-FLOPs utilisation, `step_flops` / `peak_flops`, and the
`--dry_run` report, `print_dry_run`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


class DoesNotFitError(RuntimeError):
  """The compiled train step needs more memory than a device has."""


def device_capacity(device: jax.Device) -> int | None:
  """Bytes a device can allocate, or None where it does not say (CPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # Backends without memory stats raise.
    return None
  limit = (stats or {}).get("bytes_limit")
  return int(limit) if limit else None


def memory(compiled: Any) -> dict[str, int] | None:
  """Per-device bytes of a compiled program, with the peak; None if unknown."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  out = dict(argument=int(m.argument_size_in_bytes),
             output=int(m.output_size_in_bytes),
             temp=int(m.temp_size_in_bytes),
             alias=int(m.alias_size_in_bytes))
  out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def _gib(n: int) -> str:
  return f"{n / 2**30:.2f} GiB"


def check(compiled: Any, device: jax.Device, config: Any) -> list[str]:
  """Report lines for the compiled step; raises if it cannot fit.

  Args:
    compiled: the compiled train step.
    device: a device of the run's mesh (all are alike).
    config: the run's config (named in the error's remedies).

  Returns:
    Lines describing the per-device memory and capacity.

  Raises:
    DoesNotFitError: the peak exceeds the device's capacity.
  """
  mem = memory(compiled)
  if mem is None:
    return ["compiled memory per device: not reported by this backend"]
  capacity = device_capacity(device)
  line = (f"compiled memory per device: peak {_gib(mem['peak'])} (arguments "
          f"{_gib(mem['argument'])}, outputs {_gib(mem['output'])}, temp "
          f"{_gib(mem['temp'])}, donated {_gib(mem['alias'])})")
  if capacity is None:
    return [line, f"device capacity: not reported by {device.device_kind}"]
  line += f" of {_gib(capacity)} on {device.device_kind}"
  if mem["peak"] > capacity:
    m = config.model
    raise DoesNotFitError(
        f"The train step needs {_gib(mem['peak'])} per device but "
        f"{device.device_kind} has {_gib(capacity)} (temp {_gib(mem['temp'])},"
        f" arguments {_gib(mem['argument'])}). Ways out: "
        f"config.model.attention='cudnn' or 'xla_dpa' on a GPU (fused "
        f"attention never stores the per-window score matrices, which "
        f"dominate the first Swin stage; now {m.attention!r}); "
        f"config.model.remat='block' or a checkpoint policy (now "
        f"{m.remat!r}); FSDP with config.mesh.fsdp > 1 (now "
        f"{config.mesh.fsdp}); a smaller config.data.batch_size (now "
        f"{config.data.batch_size}); config.model.dtype='bfloat16' (now "
        f"{m.dtype!r}). Nothing was read or written.")
  return [line]


def step_flops(compiled: Any) -> float | None:
  """FLOPs of one step from XLA's cost analysis, when available."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # Not every backend/executable offers it.
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


# Dense matmul peaks per chip in TFLOP/s, (bf16, fp32): NVIDIA's data sheets
# (H100/H200 SXM dense tensor-core bf16; fp32 without tensor cores).
_PEAK_TFLOPS = {"h100": (989.0, 67.0), "h200": (989.0, 67.0),
                "a100": (312.0, 19.5), "v100": (125.0, 15.7)}


def chip_peak_flops(kind: str, dtype: str) -> float | None:
  """One chip's dense matmul peak FLOP/s for `dtype` ("h100", a device_kind...)."""
  kind = kind.lower()
  for name, (bf16, fp32) in _PEAK_TFLOPS.items():
    if name in kind:
      return (bf16 if dtype == "bfloat16" else fp32) * 1e12
  return None


def peak_flops(dtype: str) -> float | None:
  """All devices' dense matmul peak FLOP/s for `dtype`; None if unknown."""
  peak = chip_peak_flops(jax.devices()[0].device_kind, dtype)
  return None if peak is None else peak * jax.device_count()


def print_dry_run(config: Any, mesh: Any, state: Any, report: list[str],
                  batch: dict[str, Any]) -> None:
  """Prints what a real run would do (`--dry_run`), without training.

  Args:
    config: the run's config.
    mesh: its mesh.
    state: the train state it would start from.
    report: `check`'s lines for the compiled step.
    batch: the first process-local batch of the data pipeline.
  """
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  per_device = config.data.batch_size // mesh.size
  lines = [
      f"mesh: {dict(mesh.shape)} over {jax.device_count()} devices "
      f"({jax.process_count()} processes, {jax.devices()[0].device_kind})",
      f"global batch {config.data.batch_size}, per device {per_device}, "
      f"roi {tuple(config.data.roi)}",
      f"params: {n_params:,}",
      *report,
  ]
  for key, value in batch.items():
    value = np.asarray(value)
    if value.dtype.kind == "f":
      lines.append(f"first batch {key}: shape {value.shape} {value.dtype} "
                   f"min {value.min():.3f} max {value.max():.3f} "
                   f"mean {value.mean():.3f}")
    else:
      lines.append(f"first batch {key}: shape {value.shape} {value.dtype}")
  for line in lines:
    print(line)
