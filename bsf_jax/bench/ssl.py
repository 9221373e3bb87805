"""SSL train-step benchmark: bsf_jax vs the PyTorch/MONAI reference.

  python -m bsf_jax.bench ssl --size tiny --roi 96 [--dtype bf16] [--reference]
      [--steps N] [--batch B] [--impl auto|xla|cpu] [--attention einsum|xla_dpa|cudnn]
      [--remat none|block|dots_saveable|...] [--torch-device cuda --amp] [--json OUT]

Prints, for the jitted bsf_jax step (views + one forward of both views +
rotation/contrastive/L1 losses + backward + AdamW, as in training): compile
time, first-step time, median steady step time over N steps, samples/s, XLA's
cost-analysis FLOPs, achieved FLOP/s, and MFU against a matmul peak measured
in this run. With --reference, the same step in PyTorch (reference SSL head
`bsf_jax.reference.ssl_head.TorchSSLHead`, reference `SSLLoss`, AdamW) on the
same weights and the same views, and the time ratio bsf_jax / reference.

Both sides run in one process, so they share the allocator and environment:
the benchmark re-executes itself once with the chosen environment
(`--env`, default GLIBC_TUNABLES=glibc.malloc.hugetlb=1, i.e. transparent huge
pages for glibc malloc, plus `--xla-flags`) and prints it. Timed steps
alternate between the two sides, so load from other processes hits both
alike. The PyTorch step gets the views precomputed (its augmentation is not
timed), which favours the reference.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from absl import flags

from bsf_jax import tool_flags
from bsf_jax.bench import common

_REEXEC_MARK = "BSF_BENCH_SSL_ENV"
# XLA's own defaults: with the hand-written attention VJP, XLA:CPU's YNNPACK
# fusions (on by default) beat `--xla_cpu_experimental_ynn_fusion_type=`
# (BENCHMARKS.md, second SSL table).
DEFAULT_XLA_FLAGS = ""
DEFAULT_ENV = "GLIBC_TUNABLES=glibc.malloc.hugetlb=1"


FLAGS = tool_flags.flag_values(__name__)
flags.DEFINE_string("size", "tiny", "tiny|small|big or depths '2,2,2,2'", flag_values=FLAGS)
flags.DEFINE_integer("roi", 96, "cubic crop size", flag_values=FLAGS)
flags.DEFINE_integer("batch", 2, "volumes per step (2 views each)", flag_values=FLAGS)
flags.DEFINE_integer("steps", 5, "timed steady steps (>= 5)", flag_values=FLAGS)
flags.register_validator("steps", lambda steps: steps >= 5,
                         "need >= 5 timed steps for a median", flag_values=FLAGS)
flags.DEFINE_integer("feature-size", 48, "model feature size", flag_values=FLAGS)
flags.DEFINE_integer("in-channels", 2, "input channels", flag_values=FLAGS)
common.define_kernel_flags(FLAGS)
flags.DEFINE_bool("reference", False, "also time the PyTorch/MONAI reference step",
                  flag_values=FLAGS)
flags.DEFINE_string("xla-flags", DEFAULT_XLA_FLAGS,
                    "XLA_FLAGS for the run (appended to the current ones)", flag_values=FLAGS)
flags.DEFINE_string("env", DEFAULT_ENV, "space-separated VAR=VALUE set for both sides; '' = none",
                    flag_values=FLAGS)
flags.DEFINE_bool("no-reexec", False, "run in the current environment as is", flag_values=FLAGS)


def _reexec(argv, args) -> None:
  """Re-runs this benchmark with the chosen env (allocator, XLA flags)."""
  env = dict(os.environ)
  for item in args.env.split():
    if "=" not in item:
      raise ValueError(f"--env item {item!r} is not VAR=VALUE")
    k, v = item.split("=", 1)
    env[k] = v
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
  env[_REEXEC_MARK] = "1"
  sys.stdout.flush()
  os.execve(sys.executable, [sys.executable, "-m", "bsf_jax.bench", "ssl", *argv], env)


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def _matmul_peak(dtype_name: str) -> float:
  """Measured FLOP/s of a large jitted matmul (the MFU denominator)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n = 2048
  dt = jnp.bfloat16 if dtype_name == "bf16" else jnp.float32
  a = jax.random.normal(jax.random.key(0), (n, n), dt)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  times = [_timed(lambda: f(a, a).block_until_ready())[1] for _ in range(5)]
  return 2 * n**3 / min(times)


class _JaxSide:
  """bsf_jax SSL train step on one device."""

  def __init__(self, args):
    import jax  # pylint: disable=g-import-not-at-top
    import ml_collections  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from bsf_jax.step import optim, sharding, ssl_step, train_state  # pylint: disable=g-import-not-at-top
    from bsf_jax.step import train_step  # pylint: disable=g-import-not-at-top
    from bsf_jax.models import SSLHead, decode_size  # pylint: disable=g-import-not-at-top

    self.jax = jax
    dtype = common.compute_dtype(args)
    depths = decode_size(args.size)
    self.model = SSLHead(in_channels=args.in_channels,
                         feature_size=args.feature_size, depths=depths,
                         remat=args.remat, impl=args.impl, attention=args.attention,
                         dtype=dtype)
    cfg_optim = optim.default_config()
    cfg_optim.lr, cfg_optim.warmup_steps = 1e-4, 0
    self.cfg_optim = cfg_optim
    tx = optim.make_optimizer(cfg_optim, total_steps=10_000)
    mesh = sharding.create_mesh(ml_collections.ConfigDict(
        {"data": 1, "fsdp": 1}), devices=jax.devices()[:1])
    shape = (args.batch, args.roi, args.roi, args.roi, args.in_channels)
    self.state, state_sh = train_state.create_train_state(
        self.model, tx, jax.random.key(0), (1,) + shape[1:], mesh, False)
    self.cfg_ssl = ssl_step.default_config()
    loss_fn = ssl_step.make_loss_fn(self.model, self.cfg_ssl, dtype)
    self.step_fn = train_step.make_train_step(loss_fn, tx, mesh, state_sh)
    rng = np.random.default_rng(0)
    self.images = rng.uniform(size=shape).astype(np.float32)
    self.batch = jax.device_put({"image": self.images},
                                sharding.data_sharding(mesh))
    self.rng = jax.random.key(1)
    self.n_params = sum(x.size for x in jax.tree.leaves(self.state.params))

  def compile(self):
    lowered = self.step_fn.lower(self.state, self.batch, self.rng)
    self.compiled = lowered.compile()
    from bsf_jax.run import preflight  # pylint: disable=g-import-not-at-top
    self.flops = preflight.step_flops(self.compiled) or float("nan")

  def step(self):
    self.state, metrics = self.compiled(self.state, self.batch, self.rng)
    self.jax.block_until_ready((self.state, metrics))
    return metrics

  def views(self):
    """The views of step 0 (what the first timed step trained on)."""
    from bsf_jax.step import ssl_views  # pylint: disable=g-import-not-at-top
    # The step's view key (`ssl_step.make_loss_fn`) for swap group 0.
    key = self.jax.random.split(self.jax.random.fold_in(self.rng, 0))[0]
    key = self.jax.random.fold_in(key, 0)
    return self.jax.device_get(ssl_views.make_views(
        key, self.images, max_drop=self.cfg_ssl.max_drop,
        max_block_sz=self.cfg_ssl.max_block_sz, tolr=self.cfg_ssl.tolr))


class _TorchSide:
  """Reference step: TorchSSLHead + SSLLoss + AdamW on the same weights."""

  def __init__(self, args, jax_side: _JaxSide):
    import numpy as np  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    from bsf_jax.weights import convert  # pylint: disable=g-import-not-at-top
    from bsf_jax.models import decode_size  # pylint: disable=g-import-not-at-top
    from bsf_jax.reference.losses import SSLLoss  # pylint: disable=g-import-not-at-top
    from bsf_jax.reference.ssl_head import TorchSSLHead  # pylint: disable=g-import-not-at-top

    self.torch = torch
    self.args = args
    self.model = TorchSSLHead(args.in_channels, args.feature_size,
                              decode_size(args.size)).to(args.torch_device)
    params = jax_side.jax.device_get(jax_side.state.params)
    self.model.load_state_dict(convert.params_to_torch(params, "ssl_head"),
                               strict=True)
    self.model.train()
    c = jax_side.cfg_optim
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=c.lr,
                                 betas=(c.b1, c.b2), eps=c.eps,
                                 weight_decay=c.weight_decay)
    self.loss = SSLLoss(args.batch)
    v1, v2, labels, targets = jax_side.views()
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(
        np.moveaxis(np.asarray(a), -1, 1))).to(args.torch_device)  # NDHWC -> NCDHW
    self.x = torch.cat([to_t(v1), to_t(v2)])
    self.labels = torch.from_numpy(np.array(labels)).long().to(args.torch_device)
    self.targets = to_t(targets)
    self.b = args.batch

  def step(self):
    self.opt.zero_grad(set_to_none=True)
    with common.torch_autocast(self.args):
      rot, con, rec = self.model(self.x)
      total, _ = self.loss(rot.float(), self.labels, con[:self.b].float(),
                           con[self.b:].float(), rec.float(), self.targets)
    total.backward()
    self.opt.step()
    return float(total.detach())  # synchronises a CUDA device


def main(argv: list[str]) -> int:
  args = common.parse(FLAGS, argv)
  if not args.no_reexec and os.environ.get(_REEXEC_MARK) != "1":
    _reexec(argv, args)
  import jax  # pylint: disable=g-import-not-at-top

  print(f"# bench ssl: {vars(args)}")
  print(f"# env (both sides): GLIBC_TUNABLES="
        f"{os.environ.get('GLIBC_TUNABLES', '')!r} XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '')!r}")
  print(f"# devices: {jax.devices()[:1]} impl {side_impl(args)} cpus={os.cpu_count()} "
        f"load={os.getloadavg()[0]:.2f}")
  side = _JaxSide(args)
  print(f"# model: SSLHead {args.size} feature {args.feature_size}, "
        f"{side.n_params:,} params; batch {args.batch} x 2 views at "
        f"{args.roi}^3, dtype {args.dtype}, remat {args.remat}, attention "
        f"{args.attention}")
  _, t_compile = _timed(side.compile)
  # The reference copies the initial weights, so build it before the first
  # (donating) bsf_jax step; both first steps then see the same weights+views.
  ref = _TorchSide(args, side) if args.reference else None
  m0, t_first = _timed(side.step)
  if ref is not None:
    ref_loss0, t_ref_first = _timed(ref.step)
    print(f"loss at step 0: jax {float(m0['loss']):.5f}  torch "
          f"{ref_loss0:.5f} (same weights and views)")
  print(f"# compile {t_compile:.2f} s, first step {t_first:.2f} s"
        + (f", reference first step {t_ref_first:.2f} s" if ref else ""),
        flush=True)
  times, ref_times = [], []
  for i in range(args.steps):
    times.append(_timed(side.step)[1])
    if ref is not None:
      ref_times.append(_timed(ref.step)[1])
    # Progress as it happens: a run cut short still leaves numbers.
    print(f"# step {i}: jax {times[-1]:.3f} s"
          + (f", torch {ref_times[-1]:.3f} s" if ref else ""), flush=True)
  med = statistics.median(times)
  peak = _matmul_peak(args.dtype)
  achieved = side.flops / med
  print(f"compile time        {t_compile:8.2f} s")
  print(f"first step          {t_first:8.2f} s")
  print(f"median step         {med:8.3f} s  (min {min(times):.3f}, max "
        f"{max(times):.3f}, {len(times)} steps)")
  print(f"samples/s           {args.batch / med:8.3f}  (volumes; x2 views)")
  print(f"XLA flops/step      {side.flops:10.4g}")
  print(f"achieved FLOP/s     {achieved:10.4g}")
  print(f"matmul peak FLOP/s  {peak:10.4g}  (2048^2 {args.dtype} matmul, "
        "this run)")
  print(f"MFU                 {achieved / peak:8.3f}")
  if ref is not None:
    ref_med = statistics.median(ref_times)
    print(f"reference first     {t_ref_first:8.2f} s")
    print(f"reference median    {ref_med:8.3f} s  (min {min(ref_times):.3f},"
          f" max {max(ref_times):.3f})")
    print(f"ratio jax/torch     {med / ref_med:8.3f}  (step time; < 1 = "
          "bsf_jax faster)")
  print(f"# load at end: {os.getloadavg()[0]:.2f}")
  result = dict(
      benchmark="ssl", args=vars(args), impl=side_impl(args), device=str(jax.devices()[0]),
      params=side.n_params, compile_s=t_compile, first_step_s=t_first, median_step_s=med,
      steps_s=times, flops_per_step=side.flops, matmul_peak_flops=peak,
      mfu=achieved / peak, peak_memory_bytes=common.jax_peak_memory_bytes(),
      loss_step0=float(m0["loss"]))
  if ref is not None:
    result.update(reference_median_step_s=ref_med, reference_steps_s=ref_times,
                  reference_loss_step0=ref_loss0, ratio=med / ref_med,
                  reference_peak_memory_bytes=common.torch_peak_memory_bytes(args))
  common.write_json(args.json, result)
  return 0


def side_impl(args) -> str:
  from bsf_jax.models import resolve_impl  # pylint: disable=g-import-not-at-top
  return resolve_impl(args.impl)
