"""Compile-only scale check: what one train step moves and holds per device.

  python -m bsf_jax.bench scale [--devices 64] [--sizes tiny,small,big]
      [--meshes dp,fsdp] [--fsdp 8] [--dtypes fp32,bf16] [--remat none,block]
      [--stages 1,3] [--feature-size F] [--roi R] [--native] [--json OUT]
      [--gpu h100] [--mfu 0.05,0.1,0.3] [--data-rates bench_data.json]

Runs on N fake CPU devices (`--xla_force_host_platform_device_count`, set
before jax starts; the bench re-executes itself when jax already runs with
another count). For each case it builds the real train step of
configs/stage1.py (SSL, 96^3 crops, 4 crops per device as 256 crops on 64
GPUs) or configs/stage3.py (BraTS Dice fine-tuning, 128^3 crops, 1 per
device), with the accelerator kernels (`impl="xla"`), compiles it for the
("data", "fsdp") mesh without running it, and reads the compiled program:

- collective bytes per device by kind, summed over the collectives' result
  shapes (what each device receives), and their ratio to the parameter bytes;
- the largest single collective array (an activation-sized one means the
  batch leaks across devices);
- XLA's argument, output and temp memory per device (XLA:CPU's buffer
  assignment: the same program as on GPU up to the backend's fusion choices).

With `--native` it compiles for this machine's own first `--devices`
devices instead (a GPU: XLA:GPU's memory figures, with the device's
capacity); `--feature-size` and `--roi` shrink the model and crops (tests).

Then, per case, the host cores needed to feed 8 GPUs: the step time is
the compiled step's FLOPs per device (XLA's cost analysis, the pre-flight's
`preflight.step_flops`) at a stated MFU of a GPU's dense peak (`--gpu`,
`--mfu`), and the per-core crops/s of each input path are those `bench data`
measured (its `--json`, or `DATA_RATES`).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time

from absl import flags

from bsf_jax import tool_flags
from bsf_jax.bench import common

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute")
_OP = re.compile(r"\s(" + "|".join(_COLLECTIVES) + r")(-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "c64": 8, "c128": 16}
# Crops per CPU second of one core, measured by `bench data` (one process
# pinned to one core; BENCHMARKS.md, data pipeline, commit be57c56):
# stage -> input path -> rate.
DATA_RATES = {
    1: {"plain": 17.12, "cache": 64.55, "store": 175.08, "monai_persistent": 40.60},
    3: {"plain": 1.21, "cache": 2.70, "store": 29.18, "monai_persistent": 6.43},
}
# Crops per GPU per step: configs/stage1.py (4 crops of 96^3 per device, as
# 256 on 64 GPUs) and configs/stage3.py (1 crop of 128^3).
CROPS_PER_GPU = {1: 4, 3: 1}


def collectives(hlo_text: str) -> list[tuple[str, list[int]]]:
  """(kind, [bytes of each result array]) of every collective in an HLO text.

  Async pairs count once, at their `-start` (whose tuple holds the operands
  first, then the results: only the results count). A collective inside a
  loop body counts once, not once per trip.
  """
  out = []
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if m is None or "=" not in line[:m.start()]:
      continue
    result_type = line[line.index("=") + 1:m.start()]
    sizes = [_DTYPE_BYTES.get(dt, 4) * math.prod(
        int(d) for d in dims.split(",") if d)
             for dt, dims in _ARRAY.findall(result_type)]
    if m.group(2) and m.group(1) != "all-reduce" and len(sizes) > 1:
      sizes = sizes[len(sizes) // 2:]
    out.append((m.group(1), sizes))
  return out


def analyse(compiled, param_bytes: int) -> dict:
  """Collective bytes by kind, their ratio to `param_bytes`, and memory."""
  by_kind: dict[str, int] = {}
  largest = 0
  for kind, sizes in collectives(compiled.as_text()):
    by_kind[kind] = by_kind.get(kind, 0) + sum(sizes)
    largest = max([largest] + sizes)
  total = sum(by_kind.values())
  report = dict(collective_bytes=by_kind, total_collective_bytes=total,
                ratio_to_params=total / param_bytes,
                largest_collective_bytes=largest, param_bytes=param_bytes)
  from bsf_jax.run import preflight  # pylint: disable=g-import-not-at-top
  memory = preflight.memory(compiled)  # The pre-flight's own reading.
  if memory is not None:
    report.update({f"{k}_bytes": v for k, v in memory.items() if k != "peak"})
  return report


def param_bytes(params) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(params))


def largest_param_bytes(params) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return max(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(params))


def _configs_dir() -> str:
  return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))), "configs")


def case_config(stage: int, size: str, n_devices: int, fsdp: int, dtype: str,
                remat: str, feature_size: int = 0, roi: int = 0):
  """The stage config of one case, sized for `n_devices` devices.

  `feature_size` / `roi` > 0 replace the config's (a cubic roi).
  """
  from bsf_jax.run import config_lib  # pylint: disable=g-import-not-at-top
  name = "stage1.py" if stage == 1 else "stage3.py"
  config = config_lib.load_file(os.path.join(_configs_dir(), name),
                                f"size={size}")
  # Stage 1: 256 crops on 64 GPUs, 4 per device; stage 3: 1 crop per device.
  config.data.batch_size = (4 if stage == 1 else 1) * n_devices
  config.model.dtype = dtype
  config.model.remat = remat
  config.model.impl = "xla"
  config.mesh.fsdp = fsdp
  config.mesh.data = -1
  config.mesh.num_devices = n_devices
  if feature_size:
    config.model.feature_size = feature_size
  if roi:
    config.data.roi = (roi,) * 3
  return config


def compile_step(config, mesh):
  """(compiled train step, abstract state) of `config` on `mesh`, run-free.

  The trainer's own job (model and loss) compiled as its run compiles it.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from bsf_jax.step import train_step  # pylint: disable=g-import-not-at-top
  from bsf_jax.trainers import finetune, pretrain  # pylint: disable=g-import-not-at-top

  trainer = {"pretrain": pretrain, "finetune": finetune}[config.trainer]
  job = trainer.make_job(config, mesh)
  compiled, abstract, _, _ = train_step.compile_step(
      config, job.model, job.loss_fn, job.kind.labelled, mesh, jax.random.key(0))
  return compiled, abstract


def feed_cores(crops_per_step_per_gpu: int, step_time_s: float,
               rates: dict[str, float], gpus: int = 8) -> dict[str, int]:
  """Data-loader cores one host needs to feed `gpus` GPUs, per input path.

  Args:
    crops_per_step_per_gpu: crops each GPU takes per step.
    step_time_s: seconds per step.
    rates: input path -> crops/s one core delivers (`bench data`).
  """
  need = gpus * crops_per_step_per_gpu / step_time_s
  return {path: math.ceil(need / rate) for path, rate in rates.items()}


def feed(stage: int, flops: float | None, peak: float | None, mfus: str,
         rates: dict[str, float]) -> list[dict]:
  """Per stated MFU: step time, crops/s for 8 GPUs and cores per input path."""
  if not flops or not peak:
    return []
  out = []
  for mfu in (float(m) for m in mfus.split(",")):
    step_s = flops / (mfu * peak)
    out.append(dict(mfu=mfu, step_s=step_s,
                    crops_per_s=8 * CROPS_PER_GPU[stage] / step_s,
                    cores=feed_cores(CROPS_PER_GPU[stage], step_s, rates)))
  return out


def data_rates(path: str) -> dict[int, dict[str, float]]:
  """Per-core rates by stage from a `bench data --json` file, else DATA_RATES."""
  if not path:
    return DATA_RATES
  with open(path) as f:
    measured = json.load(f)
  rates = dict(DATA_RATES)
  for stage in (1, 3):
    if f"stage{stage}" in measured:
      rates[stage] = {k: v for k, v in measured[f"stage{stage}"]["rates"].items()
                      if "augment" not in k}
  return rates


FLAGS = tool_flags.flag_values(__name__)
flags.DEFINE_integer("devices", 64, "devices to compile for", flag_values=FLAGS)
flags.DEFINE_string("sizes", "tiny,small,big", "model sizes, comma list", flag_values=FLAGS)
flags.DEFINE_string("meshes", "dp,fsdp", "dp and/or fsdp", flag_values=FLAGS)
flags.DEFINE_integer("fsdp", 8, "fsdp axis size", flag_values=FLAGS)
flags.DEFINE_string("dtypes", "fp32,bf16", "compute dtypes, comma list", flag_values=FLAGS)
flags.DEFINE_string("remat", "none,block", "config.model.remat values", flag_values=FLAGS)
flags.DEFINE_string("stages", "1,3", "stage configs, comma list of 1 and 3", flag_values=FLAGS)
flags.DEFINE_string("gpu", "h100",
                    "GPU whose dense peak sets the step time (h100, h200, a100, v100)",
                    flag_values=FLAGS)
flags.DEFINE_string("mfu", "0.05,0.1,0.3", "model-FLOPs utilisations assumed for the step time",
                    flag_values=FLAGS)
flags.DEFINE_string("data-rates", "", "`bench data --json` output (default: DATA_RATES)",
                    flag_values=FLAGS)
flags.DEFINE_integer("feature-size", 0, "model feature size (0: the config's)", flag_values=FLAGS)
flags.DEFINE_integer("roi", 0, "cubic crop size (0: the config's)", flag_values=FLAGS)
flags.DEFINE_bool("native", False,
                  "compile for this machine's devices (e.g. a GPU), not fake CPU ones",
                  flag_values=FLAGS)
flags.DEFINE_string("json", "", "also write the rows here", flag_values=FLAGS)


def _reexec_with_devices(n: int, argv: list[str]) -> int | None:
  """Re-runs this bench with n fake CPU devices unless jax already has them."""
  flag = f"--xla_force_host_platform_device_count={n}"
  if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = " ".join(
        f for f in os.environ.get("XLA_FLAGS", "").split()
        if "xla_force_host_platform_device_count" not in f) + " " + flag
    os.environ["JAX_PLATFORMS"] = "cpu"
    return None
  import jax  # pylint: disable=g-import-not-at-top
  if jax.device_count() == n and jax.devices()[0].platform == "cpu":
    return None
  import subprocess  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flag)
  return subprocess.call([sys.executable, "-m", "bsf_jax.bench", "scale", *argv], env=env)


def _mib(n: int) -> str:
  return f"{n / 2**20:,.1f}"


def main(argv: list[str]) -> int:
  args = common.parse(FLAGS, argv)
  rates = data_rates(args.data_rates)
  rc = None if args.native else _reexec_with_devices(args.devices, argv)
  if rc is not None:
    return rc
  import jax  # pylint: disable=g-import-not-at-top
  from bsf_jax.run import preflight  # pylint: disable=g-import-not-at-top
  from bsf_jax.step import sharding
  devices = jax.devices()[:args.devices]
  if len(devices) < args.devices:
    print(f"--devices {args.devices}: this machine has {len(devices)}",
          file=sys.stderr)
    return 2

  dtypes = {"fp32": "float32", "bf16": "bfloat16"}
  rows = []
  print(f"{len(devices)} {'' if args.native else 'fake '}"
        f"{devices[0].platform} devices ({devices[0].device_kind}); "
        "per device: collective MiB by kind (result shapes), ratio to "
        "param bytes, largest collective, argument/output/temp MiB")
  header = ("stage", "size", "mesh", "dtype", "remat", "params MiB",
            "all-reduce", "all-gather", "reduce-scatter", "other", "ratio",
            "largest", "arg", "out", "temp", "compile s")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for stage in (int(s) for s in args.stages.split(",")):
    for size in args.sizes.split(","):
      for mesh_kind in args.meshes.split(","):
        fsdp = args.fsdp if mesh_kind == "fsdp" else 1
        for dtype in args.dtypes.split(","):
          for remat in args.remat.split(","):
            config = case_config(stage, size, args.devices, fsdp,
                                 dtypes[dtype], remat, args.feature_size,
                                 args.roi)
            mesh = sharding.create_mesh(config.mesh, devices=devices)
            t0 = time.perf_counter()
            compiled, abstract = compile_step(config, mesh)
            seconds = time.perf_counter() - t0
            r = analyse(compiled, param_bytes(abstract.params))
            kinds = r["collective_bytes"]
            other = sum(v for k, v in kinds.items() if k not in (
                "all-reduce", "all-gather", "reduce-scatter"))
            flops = preflight.step_flops(compiled)
            peak = preflight.chip_peak_flops(args.gpu, dtypes[dtype])
            row = dict(stage=stage, size=size, mesh=f"{mesh_kind} "
                       f"{dict(mesh.shape)}", dtype=dtype, remat=remat,
                       compile_s=round(seconds, 1),
                       capacity_bytes=preflight.device_capacity(devices[0]),
                       step_flops=flops, feed=feed(stage, flops, peak, args.mfu,
                                                   rates[stage]),
                       **r)
            rows.append(row)
            cells = (stage, size, mesh_kind if fsdp == 1 else f"fsdp={fsdp}",
                     dtype, remat, _mib(r["param_bytes"]),
                     _mib(kinds.get("all-reduce", 0)),
                     _mib(kinds.get("all-gather", 0)),
                     _mib(kinds.get("reduce-scatter", 0)), _mib(other),
                     f"{r['ratio_to_params']:.2f}x",
                     _mib(r["largest_collective_bytes"]),
                     _mib(r.get("argument_bytes", 0)),
                     _mib(r.get("output_bytes", 0)),
                     _mib(r.get("temp_bytes", 0)), f"{seconds:.0f}")
            print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
  capacity = preflight.device_capacity(devices[0])
  if capacity:
    print(f"\ndevice capacity: {_mib(capacity)} MiB per "
          f"{devices[0].device_kind}; a case fits when arg + out + temp "
          "(less donated buffers) is below it")
  print(f"\nData-loader cores per host to feed 8 {args.gpu.upper()}: step time = "
        "compiled FLOPs per device / (MFU x dense peak); per-core crops/s from "
        "`bench data`: " + "; ".join(
            f"stage {st}: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items())
            for st, r in rates.items()))
  for row in rows:
    if not row["feed"]:
      print(f"  stage {row['stage']} {row['size']} {row['dtype']}: no FLOP count "
            "or no peak for this GPU")
      continue
    print(f"  stage {row['stage']} {row['size']} {row['mesh']} {row['dtype']}, "
          f"{row['step_flops'] / 1e12:.2f} TFLOP/device/step:")
    for f in row["feed"]:
      print(f"    MFU {f['mfu']:g}: {f['step_s']:.3f} s/step, {f['crops_per_s']:.0f} "
            "crops/s: " + ", ".join(f"{k} {v}" for k, v in f["cores"].items())
            + " cores")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  tool_flags.run(main)
