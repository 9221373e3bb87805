"""Whole-volume sliding-window inference: bsf_jax vs MONAI, same weights.

  python -m bsf_jax.bench infer [--size tiny] [--feature 48] [--roi 96]
      [--sw-batch 4] [--volume 240,240,155] [--overlap 0.5] [--mode gaussian]
      [--impl auto|xla|cpu] [--attention ...] [--dtype bf16] [--torch-device cuda --amp]
      [--json OUT]

A random 4-channel volume goes through SwinUNETR(4 -> 3) twice in one process:
once through `bsf_jax.infer.inference.sliding_window_inference` (one jitted program)
and once through `monai.inferers.sliding_window_inference` with the MONAI
model holding the same weights (exported by `bsf_jax.weights.convert.params_to_torch`,
loaded with `load_state_dict(strict=True)`). It prints the compile time, the
steady-state time of each side, the speed ratio and the largest logit
difference (a check that both sides computed the same thing).

Both sides share the process: the same allocator, and torch gets as many
threads as XLA's CPU backend uses (all cores, or --threads).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from bsf_jax.bench import common


def _parse(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=argv[0], description=__doc__.split("\n")[0])
  p.add_argument("--size", default="tiny",
                 help="tiny|small|big or depths like 2,2,4,2 (default tiny)")
  p.add_argument("--feature", type=int, default=48, help="feature_size")
  p.add_argument("--roi", type=int, default=96, help="cubic window size")
  p.add_argument("--sw-batch", type=int, default=4, help="windows per call")
  p.add_argument("--volume", default="240,240,155",
                 help="spatial size H,W,D of the volume")
  p.add_argument("--in-channels", type=int, default=4)
  p.add_argument("--out-channels", type=int, default=3)
  p.add_argument("--overlap", type=float, default=0.5)
  p.add_argument("--mode", default="gaussian", choices=("constant", "gaussian"))
  p.add_argument("--repeats", type=int, default=1,
                 help="timed runs per side (the minimum is reported)")
  p.add_argument("--threads", type=int, default=0,
                 help="torch intra-op threads (0: all cores, as XLA uses)")
  p.add_argument("--shard", action="store_true",
                 help="shard windows over all jax devices (mesh axis data)")
  p.add_argument("--seed", type=int, default=0)
  common.add_kernel_args(p)
  return p.parse_args(argv[1:])


def _timed(fn, repeats: int) -> tuple[float, object]:
  best, out = float("inf"), None
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t0)
  return best, out


def main(argv: list[str]) -> int:
  """Runs the benchmark; returns the process exit code."""
  args = _parse(argv)
  import jax
  import jax.numpy as jnp
  import torch
  from monai.inferers import sliding_window_inference as monai_swi
  from monai.networks.nets import SwinUNETR as MonaiSwinUNETR

  from bsf_jax.weights import convert
  from bsf_jax.infer import inference
  from bsf_jax.models import NUM_HEADS, SwinUNETR, decode_size

  volume = tuple(int(v) for v in args.volume.split(","))
  if len(volume) != 3:
    raise SystemExit(f"--volume must be H,W,D, got {args.volume!r}")
  depths = decode_size(args.size)
  roi = (args.roi,) * 3
  threads = args.threads or os.cpu_count()
  torch.set_num_threads(threads)

  model = SwinUNETR(in_channels=args.in_channels,
                    out_channels=args.out_channels,
                    feature_size=args.feature, depths=depths,
                    num_heads=NUM_HEADS, impl=args.impl, attention=args.attention,
                    dtype=common.compute_dtype(args))
  params = jax.jit(model.init)(
      jax.random.key(args.seed),
      jnp.zeros((1, *roi, args.in_channels)))["params"]
  torch_model = MonaiSwinUNETR(
      in_channels=args.in_channels, out_channels=args.out_channels,
      feature_size=args.feature, depths=depths, num_heads=NUM_HEADS,
      spatial_dims=3)
  state = {k: torch.as_tensor(np.asarray(v))
           for k, v in convert.params_to_torch(params, "swin_unetr").items()}
  torch_model.load_state_dict(state, strict=True)
  torch_model.eval().to(args.torch_device)

  rng = np.random.default_rng(args.seed)
  x = rng.normal(size=(1, *volume, args.in_channels)).astype(np.float32)
  n_win = len(inference.window_starts(
      tuple(max(v, r) for v, r in zip(volume, roi)), roi, args.overlap))
  print(f"infer: volume {'x'.join(map(str, volume))}x{args.in_channels}, "
        f"SwinUNETR({args.in_channels}->{args.out_channels}) feature "
        f"{args.feature} depths {depths}, roi {args.roi}, sw_batch "
        f"{args.sw_batch}, overlap {args.overlap}, {args.mode}, {n_win} "
        f"windows; jax {jax.default_backend()} x{jax.device_count()} impl "
        f"{model.config.impl} {args.dtype} attention {args.attention}, torch "
        f"{args.torch_device} threads {torch.get_num_threads()} amp {args.amp}", flush=True)

  mesh = None
  if args.shard:
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))

  def jax_infer(p, v):
    return inference.sliding_window_inference(
        v, roi, model.apply, overlap=args.overlap, mode=args.mode,
        sw_batch_size=args.sw_batch, predictor_args=({"params": p},),
        mesh=mesh)

  x_dev = jnp.asarray(x)
  t0 = time.perf_counter()
  compiled = jax.jit(jax_infer).lower(params, x_dev).compile()
  compile_s = time.perf_counter() - t0
  jax_s, y_jax = _timed(
      lambda: jax.block_until_ready(compiled(params, x_dev)), args.repeats)
  print(f"bsf_jax: compile {compile_s:.1f} s, run {jax_s:.2f} s", flush=True)

  x_t = torch.from_numpy(np.moveaxis(x, -1, 1).copy()).to(args.torch_device)

  def torch_infer():
    with torch.inference_mode(), common.torch_autocast(args):
      y = monai_swi(x_t, roi, args.sw_batch, torch_model,
                    overlap=args.overlap, mode=args.mode)
    common.torch_sync(args)
    return y

  torch_s, y_t = _timed(torch_infer, args.repeats)
  print(f"monai:   run {torch_s:.2f} s", flush=True)

  y_ref = np.moveaxis(y_t.float().cpu().numpy(), 1, -1)
  diff = float(np.abs(np.asarray(y_jax, np.float32) - y_ref).max())
  print(f"speed-up (monai time / bsf_jax time): {torch_s / jax_s:.2f}x; "
        f"max |logit difference| {diff:.2e}", flush=True)
  common.write_json(args.json, dict(
      benchmark="infer", args=vars(args), impl=model.config.impl,
      device=str(jax.devices()[0]), windows=n_win, compile_s=compile_s, jax_s=jax_s,
      monai_s=torch_s, speedup=torch_s / jax_s, max_logit_diff=diff,
      peak_memory_bytes=common.jax_peak_memory_bytes(),
      reference_peak_memory_bytes=common.torch_peak_memory_bytes(args)))
  return 0
