"""Whole-volume sliding-window inference: bsf_jax vs MONAI, same weights.

  python -m bsf_jax.bench infer [--size tiny] [--feature 48] [--roi 96]
      [--sw-batch 4] [--volume 240,240,155] [--overlap 0.5] [--mode gaussian]
      [--ensemble 5] [--mirror-axes xyz] [--models-per-step N]
      [--impl auto|xla|cpu] [--attention ...] [--dtype bf16] [--torch-device cuda --amp]
      [--json OUT]

A random 4-channel volume goes through SwinUNETR(4 -> 3) in one process: once
through bsf_jax (`inference.make_ensemble_predictor`, one jitted program) and
once through `monai.inferers.sliding_window_inference` with MONAI models
holding the same weights (exported by `bsf_jax.weights.convert.params_to_torch`,
loaded with `load_state_dict(strict=True)`). Both sides output the sigmoid
probability.

Without `--ensemble` it is one model, one pass. `--ensemble N` adds the cases
challenge teams run: N models (different random weights, as N folds), then N
models x 8 flips (mirroring over all three axes, or `--mirror-axes`); the
MONAI side runs the
same loop a team writes by hand (per model and flip: flip the volume,
`sliding_window_inference`, flip back, sigmoid, accumulate). Per case it
prints the compile time, the steady-state seconds per volume of each side,
their ratio and the largest probability difference (a check that both sides
computed the same thing), and the bsf_jax case's cost in single passes of one
model (that pass timed just before and after the case).

Both sides share the process: the same allocator, and torch gets as many
threads as XLA's CPU backend uses (all cores, or --threads). Within a case
the sides are interleaved (bsf_jax, MONAI, bsf_jax, ...; each side's fastest
run is reported), so a machine load that drifts during a case weighs on both
alike; one model's single pass, the unit of the cost in passes, is timed just
before and after each case (the faster is the unit).
"""

from __future__ import annotations

import os
import time

from absl import flags
import numpy as np

from bsf_jax import tool_flags
from bsf_jax.bench import common


FLAGS = tool_flags.flag_values(__name__)
flags.DEFINE_string("size", "tiny", "tiny|small|big or depths like 2,2,4,2 (default tiny)",
                    flag_values=FLAGS)
flags.DEFINE_integer("feature", 48, "feature_size", flag_values=FLAGS)
flags.DEFINE_integer("roi", 96, "cubic window size", flag_values=FLAGS)
flags.DEFINE_integer("sw-batch", 4, "windows per call", flag_values=FLAGS)
flags.DEFINE_string("volume", "240,240,155", "spatial size H,W,D of the volume",
                    flag_values=FLAGS)
flags.DEFINE_integer("in-channels", 4, "input channels", flag_values=FLAGS)
flags.DEFINE_integer("out-channels", 3, "output channels", flag_values=FLAGS)
flags.DEFINE_float("overlap", 0.5, "overlap of neighbouring windows", flag_values=FLAGS)
flags.DEFINE_enum("mode", "gaussian", ("constant", "gaussian"), "how overlapping windows blend",
                  flag_values=FLAGS)
flags.DEFINE_integer("repeats", 1, "MONAI runs per case; bsf_jax runs one more, interleaved "
                     "(bsf_jax, MONAI, bsf_jax, ...); each side's fastest is reported",
                     flag_values=FLAGS)
flags.DEFINE_integer("threads", 0, "torch intra-op threads (0: all cores, as XLA uses)",
                     flag_values=FLAGS)
flags.DEFINE_bool("shard", False, "shard windows over all jax devices (mesh axis data)",
                  flag_values=FLAGS)
flags.DEFINE_integer("ensemble", 0, "also time N models and N models x 8 flips (0: one model only)",
                     flag_values=FLAGS)
flags.DEFINE_string("mirror-axes", "xyz", "axes the mirrored case flips (xyz: 8 flips)",
                    flag_values=FLAGS)
flags.DEFINE_integer("models-per-step", 0, "members vmapped together (0: the platform default, "
                     "inference.default_models_per_step)", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "seed of the weights and the volume", flag_values=FLAGS)
common.define_kernel_flags(FLAGS)


def _timed(fn) -> tuple[float, object]:
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def _interleaved(ours, reference, repeats: int):
  """Fastest seconds of `ours` and of `reference`, run ours, reference, ours, ...

  Each reference run is bracketed by two of ours, and each side's fastest
  run (the least disturbed by other users of a shared machine, whose load
  moves within minutes) is reported.

  Returns:
    (our fastest, our times, our last output, reference fastest, its
    times, its last output).
  """
  ours_t, ref_t = [], []
  t, out = _timed(ours)
  ours_t.append(t)
  for _ in range(repeats):
    t, ref = _timed(reference)
    ref_t.append(t)
    t, out = _timed(ours)
    ours_t.append(t)
  return min(ours_t), ours_t, out, min(ref_t), ref_t, ref


def main(argv: list[str]) -> int:
  """Runs the benchmark; returns the process exit code."""
  args = common.parse(FLAGS, argv)
  import jax
  import jax.numpy as jnp
  import ml_collections
  import torch
  from monai.inferers import sliding_window_inference as monai_swi
  from monai.networks.nets import SwinUNETR as MonaiSwinUNETR

  from bsf_jax.weights import convert
  from bsf_jax.infer import inference, sliding_window
  from bsf_jax.models import NUM_HEADS, SwinUNETR, decode_size

  volume = tuple(int(v) for v in args.volume.split(","))
  if len(volume) != 3:
    raise SystemExit(f"--volume must be H,W,D, got {args.volume!r}")
  depths = decode_size(args.size)
  roi = (args.roi,) * 3
  threads = args.threads or os.cpu_count()
  torch.set_num_threads(threads)
  n_models = max(args.ensemble, 1)

  model = SwinUNETR(in_channels=args.in_channels,
                    out_channels=args.out_channels,
                    feature_size=args.feature, depths=depths,
                    num_heads=NUM_HEADS, impl=args.impl, attention=args.attention,
                    dtype=common.compute_dtype(args))
  init = jax.jit(model.init)
  params = [init(jax.random.key(args.seed + i),
                 jnp.zeros((1, *roi, args.in_channels)))["params"]
            for i in range(n_models)]
  torch_models = []
  for p in params:
    torch_model = MonaiSwinUNETR(
        in_channels=args.in_channels, out_channels=args.out_channels,
        feature_size=args.feature, depths=depths, num_heads=NUM_HEADS,
        spatial_dims=3)
    state = {k: torch.as_tensor(np.asarray(v))
             for k, v in convert.params_to_torch(p, "swin_unetr").items()}
    torch_model.load_state_dict(state, strict=True)
    torch_models.append(torch_model.eval().to(args.torch_device))

  rng = np.random.default_rng(args.seed)
  x = rng.normal(size=(*volume, args.in_channels)).astype(np.float32)
  n_win = len(sliding_window.window_starts(
      tuple(max(v, r) for v, r in zip(volume, roi)), roi, args.overlap))
  mesh = None
  if args.shard:
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  per_step = args.models_per_step or inference.default_models_per_step(
      None if mesh is None else list(mesh.devices.flat))
  print(f"infer: volume {'x'.join(map(str, volume))}x{args.in_channels}, "
        f"SwinUNETR({args.in_channels}->{args.out_channels}) feature "
        f"{args.feature} depths {depths}, roi {args.roi}, sw_batch "
        f"{args.sw_batch}, overlap {args.overlap}, {args.mode}, {n_win} "
        f"windows; jax {jax.default_backend()} x{jax.device_count()} impl "
        f"{model.config.impl} {args.dtype} attention {args.attention}, "
        f"models per step {per_step or 'all'}; torch {args.torch_device} threads "
        f"{torch.get_num_threads()} amp {args.amp}", flush=True)

  config = ml_collections.ConfigDict(dict(
      data=dict(roi=roi), seg=dict(sw_overlap=args.overlap, sw_mode=args.mode,
                                   sw_batch_size=args.sw_batch)))
  x_dev = jnp.asarray(x)
  x_t = torch.from_numpy(np.moveaxis(x, -1, 0)[None].copy()).to(args.torch_device)

  def monai_loop(members, flips):
    """The loop by hand: per model and flip, MONAI's sliding window."""
    total = 0.0
    with torch.inference_mode(), common.torch_autocast(args):
      for torch_model in members:
        for axes in flips:
          dims = [2 + a for a in axes]  # NCDHW: spatial axis a is dim 2 + a
          v = torch.flip(x_t, dims) if dims else x_t
          y = monai_swi(v, roi, args.sw_batch, torch_model,
                        overlap=args.overlap, mode=args.mode)
          if dims:
            y = torch.flip(y, dims)
          total = total + torch.sigmoid(y.float())
    common.torch_sync(args)
    return total / (len(members) * len(flips))

  cases = [("1 model", 1, "")]
  if args.ensemble:
    n_flips = len(inference.flip_combinations(args.mirror_axes))
    cases += [(f"{n_models} models", n_models, ""),
              (f"{n_models} models x {n_flips} flips", n_models, args.mirror_axes)]
  results = []
  for i, (name, n, mirror) in enumerate(cases):
    predict = inference.make_ensemble_predictor(
        [model], config, mirror=mirror, mesh=mesh, models_per_step=per_step)
    stacked = (jax.device_put(inference.stack_members(params[:n])),)
    t0 = time.perf_counter()
    compiled = predict.lower(stacked, x_dev).compile()
    compile_s = time.perf_counter() - t0
    flips = inference.flip_combinations(mirror)
    if i == 0:
      # One untimed pass per side first: one-time costs (torch's kernel
      # set-up, first touches of memory) would otherwise land on the
      # one-model case, the unit the others are measured in.
      jax.block_until_ready(compiled(stacked, x_dev))
      monai_loop(torch_models[:1], flips)
    run = lambda c=compiled, p=stacked: jax.block_until_ready(c(p, x_dev))
    if i == 0:
      single_run = run
    # The unit, one model's single pass, is timed just before and after the
    # case, for the same reason.
    before, _ = _timed(single_run)
    jax_s, jax_t, y_jax, torch_s, torch_t, y_t = _interleaved(
        run, lambda n=n, f=flips: monai_loop(torch_models[:n], f), args.repeats)
    after, _ = _timed(single_run)
    unit_s = min(before, after)
    print(f"[{name}] bsf_jax: compile {compile_s:.1f} s, run {jax_s:.2f} s "
          f"(runs {', '.join(f'{t:.2f}' for t in jax_t)}) = "
          f"{jax_s / unit_s:.1f} single passes (one pass {unit_s:.2f} s "
          "around it)", flush=True)
    y_ref = np.moveaxis(y_t.cpu().numpy()[0], 0, -1)
    diff = float(np.abs(np.asarray(y_jax, np.float32) - y_ref).max())
    print(f"[{name}] monai:   run {torch_s:.2f} s (runs "
          f"{', '.join(f'{t:.2f}' for t in torch_t)}); speed-up (monai time / "
          f"bsf_jax time) {torch_s / jax_s:.2f}x; max |probability "
          f"difference| {diff:.2e}", flush=True)
    results.append(dict(case=name, models=n, flips=len(flips),
                        passes=n * len(flips), compile_s=compile_s,
                        jax_s=jax_s, monai_s=torch_s, speedup=torch_s / jax_s,
                        jax_runs_s=jax_t, monai_runs_s=torch_t,
                        max_prob_diff=diff, single_pass_s=unit_s,
                        single_passes=jax_s / unit_s))
  if args.ensemble:
    print("bsf_jax cost in single passes of one model: " + "; ".join(
        f"{r['case']} ({r['passes']} passes): {r['single_passes']:.1f}x"
        for r in results), flush=True)
  common.write_json(args.json, dict(
      benchmark="infer", args=vars(args), impl=model.config.impl,
      device=str(jax.devices()[0]), windows=n_win, models_per_step=per_step,
      cases=results, **{k: results[0][k] for k in (
          "compile_s", "jax_s", "monai_s", "speedup", "max_prob_diff")},
      peak_memory_bytes=common.jax_peak_memory_bytes(),
      reference_peak_memory_bytes=common.torch_peak_memory_bytes(args)))
  return 0
