"""Numerical parity of bsf_jax.models with MONAI / the PyTorch SSL head reference.

Correctness is proved in float64: outputs and every gradient (the input's and
each parameter's) of SwinUNETR, the SSL head and the encoder equal MONAI / the
reference's autograd to 1e-9 relative, on both kernel paths (`impl="xla"`,
the path GPUs take, and `impl="cpu"`), with and without remat, over a family
of shapes, and for both patch-merging orders. Weights go both ways through
`bsf_jax.weights.convert`.

float32 tests then check accuracy against that float64 truth, with tolerances
that no instruction set, fusion choice or LeakyReLU coin flip can break (see
the float32 section). Run with `-s` to see the measured errors.
"""

import functools
import os

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsf_jax.weights import convert
from bsf_jax import models
from bsf_jax.models import attention, cpu_kernels, swin

torch = pytest.importorskip("torch")
monai_nets = pytest.importorskip("monai.networks.nets")

F = 12  # small feature size keeps the tests fast


@pytest.fixture(autouse=True)
def _matmul_precision():
  # "highest" unless told otherwise (launch/gpu_check.py also runs "default" on GPUs).
  with jax.default_matmul_precision(os.environ.get("BSF_TEST_MATMUL_PRECISION", "highest")):
    yield


def _perturb_torch(module, seed):
  """Random offsets on every parameter so LayerNorm scales/biases etc. are not trivially 1/0."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))
  return module.eval()


def _random_params(model, seed, x=None):
  """Random params from the param shapes; cheaper than compiling `model.init`."""
  rng = np.random.default_rng(seed)
  shapes = (convert.abstract_params(model) if x is None else
            jax.eval_shape(model.init, jax.random.key(0), x)["params"])
  flat = flax.traverse_util.flatten_dict(shapes)
  out = {}
  for path, leaf in flat.items():
    if path[-1] == "scale":
      value = 1.0 + 0.05 * rng.standard_normal(leaf.shape)
    elif path[-1] == "kernel":
      value = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    else:
      value = 0.05 * rng.standard_normal(leaf.shape)
    out[path] = jnp.asarray(value, leaf.dtype)
  return flax.traverse_util.unflatten_dict(out)


def _projection(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _relative_l2(a, b, floor):
  return float(np.linalg.norm(a - b)) / max(float(np.linalg.norm(b)), floor)


def _as_tuple(out):
  return out if isinstance(out, tuple) else (out,)


def _torch_outputs_and_gradients(tm, x, cotangents):
  """torch outputs (channels last) and the gradients of sum(outputs * cotangents).

  Computes in the dtype of `x`, which must be the dtype `tm` holds its
  parameters in (load a float64 state dict into a module made float64 first:
  `load_state_dict` casts to the module's dtype).
  """
  tm.zero_grad()
  dtype = torch.from_numpy(x[:0]).dtype
  xt = torch.from_numpy(np.moveaxis(x, -1, 1).copy()).requires_grad_(True)
  outs = _as_tuple(tm(xt))
  outs = [o[-1] if isinstance(o, list) else o for o in outs]  # the encoder's last stage
  loss = sum((o * torch.from_numpy(np.moveaxis(c, -1, 1).copy() if c.ndim == 5 else c).to(dtype)).sum()
             for o, c in zip(outs, cotangents))
  loss.backward()
  grads = {k: p.grad.double().numpy() for k, p in tm.named_parameters()}
  grads["input"] = np.moveaxis(xt.grad.double().numpy(), 1, -1)
  outs = [o.detach().double().numpy() for o in outs]
  return [np.moveaxis(o, 1, -1) if o.ndim == 5 else o for o in outs], grads


def _jax_outputs_and_gradients(model, params, kind, x, cotangents):
  """One compiled program: the outputs and the pullback of `cotangents` (a linear loss)."""
  def run(p, xj):
    def apply(p_, x_):
      out = model.apply({"params": p_}, x_)
      return out[-1] if isinstance(out, list) else out  # the encoder's last stage
    out, pullback = jax.vjp(apply, p, xj)
    return out, pullback(tuple(cotangents) if isinstance(out, tuple) else cotangents[0])
  out, (g_params, g_input) = jax.jit(run)(params, jnp.asarray(x))
  grads = {k: np.asarray(v, np.float64) for k, v in convert.params_to_numpy(g_params, kind).items()
           if not k.endswith("relative_position_index")}
  grads["input"] = np.asarray(g_input, np.float64)
  return [np.asarray(o, np.float64) for o in _as_tuple(out)], grads


def _worst_errors(ours, truth, floor_fraction):
  """Per-tensor relative L2 errors of `ours` against `truth`, largest first.

  Norms are floored at `floor_fraction` of the largest tensor's norm: a conv
  bias in front of an InstanceNorm has an exact gradient of 0.
  """
  assert ours.keys() == truth.keys()
  floor = floor_fraction * max(float(np.linalg.norm(v)) for v in truth.values())
  for key in truth:
    assert ours[key].shape == truth[key].shape, key
  return sorted(((_relative_l2(ours[key], truth[key], floor), key) for key in truth), reverse=True)


# ---------------------------------------------------------------- float64: the proof
# In float64 every path computes MONAI's function to rounding: outputs and every
# gradient (the input's and each parameter's) agree to 1e-9 relative. float64
# has no coin flips at LeakyReLU kinks: an input within float64 rounding of 0
# has probability ~1e-16 per voxel.
F64_TOL = 1e-9


def _torch_reference(kind, in_channels, patch_merging, out_channels=3):
  """The torch module of `kind` in float64, with the given merging order."""
  from bsf_jax.reference.ssl_head import TorchSSLHead  # pylint: disable=g-import-not-at-top
  if kind == "swin_unetr":
    tm = monai_nets.SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=F)
  elif kind == "ssl_head":
    tm = TorchSSLHead(in_channels, feature_size=F)
  else:
    from monai.networks.nets.swin_unetr import SwinTransformer  # pylint: disable=g-import-not-at-top
    tm = SwinTransformer(in_chans=in_channels, embed_dim=F, window_size=(7, 7, 7),
                         patch_size=(2, 2, 2), depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24))
  if patch_merging == "duplicated_neighbours":
    import legacy_merging  # pylint: disable=g-import-not-at-top
    legacy_merging.with_duplicated_neighbours(tm)
  return tm.double().eval()


def _float64_pair(kind, direction, patch_merging, x, seed, **model_kwargs):
  """(JAX model, its params, the torch module holding the same weights), all float64.

  direction "export": random JAX params written into torch (`params_to_torch`);
  "import": perturbed torch weights read into JAX (`model_kwargs_from_state_dict`,
  `params_from_torch`), the way a MONAI or BrainSegFounder file is.
  """
  in_channels = x.shape[-1]
  tm = _torch_reference(kind, in_channels, patch_merging)
  settings = dict(dtype=jnp.float64, param_dtype=jnp.float64, patch_merging=patch_merging,
                  **model_kwargs)
  if direction == "import":
    torch.manual_seed(seed)
    _perturb_torch(tm, seed)
    sd = tm.state_dict()
    model = models.build(kind, **convert.model_kwargs_from_state_dict(sd, kind), **settings)
    return model, convert.params_from_torch(sd, kind, model), tm
  extra = {"out_channels": 3} if kind == "swin_unetr" else {}
  model = models.build(kind, in_channels=in_channels, feature_size=F, **extra, **settings)
  params = _random_params(model, seed, jnp.asarray(x))
  tm.load_state_dict(convert.params_to_torch(params, kind), strict=True)
  return model, params, tm


def _check_float64(kind, shape, batch, direction, patch_merging="all_neighbours", seed=0,
                   **model_kwargs):
  """Outputs and all gradients of the float64 JAX model equal torch float64 to F64_TOL.

  Gradient norms are floored at 1e-4 of the largest: a conv bias in front of an
  InstanceNorm has an exact gradient of 0, which both sides give as rounding noise.
  """
  with jax.enable_x64(True):
    x = np.random.default_rng(seed).standard_normal((batch,) + shape + (2,))
    model, params, tm = _float64_pair(kind, direction, patch_merging, x, seed + 1, **model_kwargs)
    out_shapes = jax.eval_shape(lambda p, x_: model.apply({"params": p}, x_), params, jnp.asarray(x))
    out_shapes = out_shapes[-1:] if isinstance(out_shapes, list) else _as_tuple(out_shapes)
    rng = np.random.default_rng(seed + 2)
    cotangents = [rng.standard_normal(o.shape) for o in out_shapes]
    outs, ours = _jax_outputs_and_gradients(model, params, kind, x, cotangents)
  refs, truth = _torch_outputs_and_gradients(tm, x, cotangents)
  out_errors = [float(np.abs(o - r).max() / np.abs(r).max()) for o, r in zip(outs, refs)]
  grad_errors = _worst_errors(ours, truth, 1e-4)
  print(f"\n[float64 {kind} {direction} {model.config.impl} remat={model.config.remat} "
        f"{patch_merging} {batch}x{shape}] outputs {['%.1e' % e for e in out_errors]}, worst "
        f"gradients {[('%.1e' % e, k) for e, k in grad_errors[:2]]} of {len(grad_errors)}")
  assert max(out_errors) <= F64_TOL
  assert grad_errors[0][0] <= F64_TOL, grad_errors[:5]


# The cases share out the family of shapes and settings: every kernel path with
# and without remat, non-cubic in each axis order, cubic, odd sizes, stage sizes
# that are not a multiple of the 7^3 window, batch 2, both merging orders.
# SwinUNETR inputs are multiples of 32 (MONAI's rule; 32^3 would leave MONAI's
# InstanceNorm a 1^3 bottleneck, which torch refuses): stages of 16, 8 and 4
# voxels, shifted blocks in stages 1-3.
@pytest.mark.parametrize("impl,remat,shape,direction", [
    ("xla", "none", (32, 32, 64), "export"),
    ("cpu", "block", (64, 32, 32), "import"),
])
def test_swin_unetr_equals_monai_in_float64(impl, remat, shape, direction):
  _check_float64("swin_unetr", shape, 1, direction, impl=impl, remat=remat, seed=10)


# The SSL head needs >= 2 bottleneck tokens; (32, 32, 96) gives a 1x1x3 (odd)
# bottleneck and 48-voxel first-stage windows padded to 49. (The "xla_dpa" and
# "cudnn" kernels compute their softmax in float32 by design, so float64 runs
# the einsum kernel; the kernels are compared in the attention tests below.)
@pytest.mark.parametrize("impl,remat,shape,batch,direction", [
    ("xla", "block", (64, 64, 32), 2, "export"),
    ("cpu", "none", (32, 32, 96), 1, "import"),
])
def test_ssl_head_equals_reference_in_float64(impl, remat, shape, batch, direction):
  _check_float64("ssl_head", shape, batch, direction, impl=impl, remat=remat, seed=20)


# The encoder alone takes any even size: odd sizes at every stage (15, 21, 13
# voxels after the patch embedding), which the patch mergings pad.
@pytest.mark.parametrize("impl,remat,direction", [("xla", "none", "import"), ("cpu", "block", "export")])
def test_encoder_equals_monai_in_float64_at_odd_sizes(impl, remat, direction):
  _check_float64("encoder", (30, 42, 26), 2, direction, impl=impl, remat=remat, seed=30)


@pytest.mark.parametrize("kind,impl,remat,shape,direction", [
    ("swin_unetr", "xla", "block", (32, 64, 32), "export"),
    ("encoder", "cpu", "none", (32, 32, 32), "import")])
def test_duplicated_neighbours_merging_equals_pre_2025_monai_in_float64(kind, impl, remat, shape,
                                                                         direction):
  """The MONAI 0.9-1.4 patch-merging order (released BrainSegFounder weights),
  against MONAI's modules with that order swapped in (tests/legacy_merging.py)."""
  _check_float64(kind, shape, 1, direction, "duplicated_neighbours", impl=impl, remat=remat,
                 seed=40)


def test_merging_orders_compute_different_functions():
  """The two orders are not a relabelling: the same weights give other outputs."""
  x = jax.random.normal(jax.random.key(1), (1, 6, 4, 4, 3))
  merges = [swin.PatchMerging(3, config=models.SwinConfig(patch_merging=order))
            for order in ("all_neighbours", "duplicated_neighbours")]
  params = _random_params(merges[0], 3, x)
  a, b = (m.apply({"params": params}, x) for m in merges)
  assert float(jnp.abs(a - b).max()) > 1e-2


@pytest.mark.parametrize("branch_limit", [0, 1 << 40], ids=["slicewise", "im2col"])
def test_cpu_conv_branches_equal_lax_conv_in_float64(monkeypatch, branch_limit):
  """Each branch of `cpu_kernels.conv3d_same`, forced by its size threshold: the
  output and both gradients (its custom VJP) equal `lax.conv_general_dilated`."""
  monkeypatch.setattr(cpu_kernels, "IM2COL_MAX_ELEMENTS", branch_limit)
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 9, 6, 7, 5)))
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 5, 4)))
    w = jnp.asarray(rng.standard_normal((2, 9, 6, 7, 4)))
    reference = lambda x_, k_: jax.lax.conv_general_dilated(
        x_, k_, (1, 1, 1), [(1, 1)] * 3, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    results = []
    for conv in (cpu_kernels.conv3d_same, reference):
      y, pullback = jax.vjp(conv, x, kernel)
      results.append((y, *pullback(w)))
  for ours, truth in zip(*results):
    assert ours.dtype == np.float64
    ours, truth = np.asarray(ours), np.asarray(truth)
    np.testing.assert_allclose(ours, truth, rtol=0, atol=1e-12 * np.abs(truth).max())


def test_float64_needs_x64():
  with jax.enable_x64(False):
    with pytest.raises(ValueError, match="jax_enable_x64"):
      models.SwinConfig(dtype=jnp.float64)
  with jax.enable_x64(True):
    with pytest.raises(ValueError, match="needs attention='einsum'"):
      models.SwinConfig(dtype=jnp.float64, param_dtype=jnp.float64, attention="xla_dpa")
  with pytest.raises(ValueError, match="patch_merging='monai'"):
    models.SwinConfig(patch_merging="monai")


# ---------------------------------------------------------------- float32: the accuracy
# float32 runs are judged against the float64 truth with tolerances a coin flip
# cannot break. The Swin encoder is smooth (GELU, softmax, LayerNorm): its
# float32 gradients are accurate to ~1e-5. The UNETR decoder and the SSL
# reconstruction have LeakyReLU kinks: an input within float32 rounding of 0
# takes either slope depending on fusion, instruction set and remat, and one
# flipped voxel of a coarse stage moves every upstream gradient by ~1/sqrt(N)
# (1e-2 relative L2 for this SwinUNETR at (32, 32, 64) on one x86 machine,
# 1e-4 on another), so there only the outputs are held tight and the
# gradients to 5e-2.
def _float32_errors(kind, shape, batch, seed, **model_kwargs):
  in_channels = 2
  extra = {"out_channels": 3} if kind == "swin_unetr" else {}
  model = models.build(kind, in_channels=in_channels, feature_size=F, **extra, **model_kwargs)
  x = np.random.default_rng(seed).standard_normal((batch,) + shape + (in_channels,)).astype(np.float32)
  params = _random_params(model, seed + 1, jnp.asarray(x))
  out_shapes = jax.eval_shape(lambda p, x_: model.apply({"params": p}, x_), params, jnp.asarray(x))
  out_shapes = out_shapes[-1:] if isinstance(out_shapes, list) else _as_tuple(out_shapes)
  rng = np.random.default_rng(seed + 2)
  cotangents = [rng.standard_normal(o.shape).astype(np.float32) for o in out_shapes]
  outs, ours = _jax_outputs_and_gradients(model, params, kind, x, cotangents)
  tm = _torch_reference(kind, in_channels, "all_neighbours")
  tm.load_state_dict({k: v.double() for k, v in convert.params_to_torch(params, kind).items()},
                     strict=True)
  refs, truth = _torch_outputs_and_gradients(tm, x.astype(np.float64),
                                             [c.astype(np.float64) for c in cotangents])
  out_errors = [float(np.abs(o - r).max() / np.abs(r).max()) for o, r in zip(outs, refs)]
  return out_errors, _worst_errors(ours, truth, 1e-2)


@pytest.mark.parametrize("impl,remat", [("xla", "block"), ("cpu", "none")])
def test_float32_encoder_gradients_are_accurate(impl, remat):
  out_errors, grad_errors = _float32_errors("encoder", (32, 32, 64), 1, 50, impl=impl, remat=remat)
  print(f"\n[float32 encoder {impl}] outputs {out_errors}, worst gradients {grad_errors[:3]}")
  assert max(out_errors) <= 1e-4
  assert grad_errors[0][0] <= 1e-3, grad_errors[:5]


def test_float32_swin_unetr_outputs_and_gradients_are_accurate():
  """The whole SwinUNETR in float32 through the "xla_dpa" attention kernel (the
  einsum kernel on both paths is the encoder tests')."""
  out_errors, grad_errors = _float32_errors("swin_unetr", (32, 32, 64), 1, 60, impl="xla",
                                            attention="xla_dpa")
  print(f"\n[float32 swin_unetr xla_dpa] outputs {out_errors}, worst gradients {grad_errors[:3]}")
  assert max(out_errors) <= 1e-4
  assert grad_errors[0][0] <= 5e-2, grad_errors[:5]


@pytest.mark.parametrize("name,expected", [("tiny", 62_191_941), ("small", 64_076_853),
                                           ("big", 69_731_589)])
def test_param_counts_match_monai(name, expected):
  model = models.SwinUNETR(in_channels=4, out_channels=3, feature_size=48,
                           depths=models.decode_size(name))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 32, 4)))
  ours = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"]))
  theirs = sum(p.numel() for p in monai_nets.SwinUNETR(
      in_channels=4, out_channels=3, feature_size=48, depths=models.decode_size(name)).parameters())
  print(f"\n[{name}] params ours {ours:,} MONAI {theirs:,}")
  assert ours == theirs == expected


# remat="block" is checked against MONAI in float64 above; a checkpoint policy
# saves some intermediates and recomputes the rest, which must not change them.
@pytest.mark.parametrize("remat", ["dots_saveable"])
def test_remat_same_gradients(remat):
  # One Swin stage (a plain and a shifted block + merging) keeps the gradient compilations cheap.
  x = jax.random.normal(jax.random.key(5), (1, 16, 16, 16, F))
  configs = [models.SwinConfig(feature_size=F, remat=r) for r in ("none", remat)]
  stages = [swin.BasicLayer(F, 2, 3, (7, 7, 7), (0.0, 0.0), config=c) for c in configs]
  params = _random_params(stages[0], 6, x)
  loss = lambda m, p: jnp.sum(m.apply({"params": p}, x) ** 2)
  grads = [jax.jit(jax.grad(functools.partial(loss, m)))(params) for m in stages]
  leaves = list(zip(*map(jax.tree.leaves, grads)))
  diff = max(float(jnp.abs(a - b).max()) for a, b in leaves)
  scale = max(float(jnp.abs(a).max()) for a, _ in leaves)
  print(f"\n[remat {remat}] max-abs gradient diff {diff:.2e} (largest gradient {scale:.2e})")
  assert diff <= 1e-5 * max(scale, 1.0)


def test_bf16_loss_and_gradients_track_float32():
  """A bf16 forward+backward of SwinUNETR: finite, float32 gradients, close to float32.

  bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3 per op), and
  with random (untrained) weights the error grows through the ~30 layers of a
  depth-(1,1,1,1) model: measured here, loss 5e-3 relative, the whole gradient
  0.11 relative L2, the worst large tensor (a deep patch-merging kernel) 0.28.
  Tolerances are about 2x that: loss within 1%, the whole gradient within 20%,
  and each tensor whose norm is at least 1% of the largest within 50% (smaller
  ones, such as conv biases in front of an InstanceNorm, whose exact gradient
  is 0, are rounding noise in both dtypes). The loss is linear in the logits,
  so the output gradient carries no rounding and the comparison measures the
  bf16 backward through the model.
  """
  x = jax.random.normal(jax.random.key(7), (1, 32, 32, 32, 2))
  kw = dict(in_channels=2, out_channels=3, feature_size=F, depths=(1, 1, 1, 1), impl="xla")
  f32 = models.SwinUNETR(**kw)
  params = _random_params(f32, 8)
  w = jax.random.normal(jax.random.key(8), (1, 32, 32, 32, 3))

  def loss(model, p):
    return jnp.mean(model.apply({"params": p}, x).astype(jnp.float32) * w)

  (l32, g32), (l16, g16) = [jax.jit(jax.value_and_grad(functools.partial(loss, m)))(params)
                            for m in (f32, models.SwinUNETR(dtype=jnp.bfloat16, **kw))]
  g32, g16 = flax.traverse_util.flatten_dict(g32), flax.traverse_util.flatten_dict(g16)
  assert all(v.dtype == jnp.float32 for v in g16.values())  # params stay float32
  assert np.isfinite(float(l16)) and all(bool(jnp.all(jnp.isfinite(v))) for v in g16.values())
  norms = {k: float(jnp.linalg.norm(v)) for k, v in g32.items()}
  large = [k for k in g32 if norms[k] >= 1e-2 * max(norms.values())]
  rel = {k: _relative_l2(np.asarray(g16[k]), np.asarray(g32[k]), 0.0) for k in large}
  total = _relative_l2(np.concatenate([np.ravel(g16[k]) for k in g32]),
                       np.concatenate([np.ravel(g32[k]) for k in g32]), 0.0)
  loss_rel = abs(float(l16) - float(l32)) / max(abs(float(l32)), 1e-3)
  worst = max(rel, key=rel.get)
  print(f"\n[bf16] loss {float(l16):.5f} vs {float(l32):.5f} ({loss_rel:.2e}); gradient rel L2 "
        f"{total:.2e}; worst of {len(large)} large tensors {rel[worst]:.2e} ({'/'.join(worst)})")
  assert loss_rel < 0.01 and total < 0.2 and rel[worst] < 0.5


def test_dropout_and_stochastic_depth_use_the_dropout_rng():
  model = models.SwinTransformer(in_channels=1, feature_size=F, depths=(1, 1, 1, 1),
                                 drop_rate=0.1, attn_drop_rate=0.1, dropout_path_rate=0.2)
  x = jax.random.normal(jax.random.key(9), (2, 32, 32, 32, 1))
  params = _random_params(model, 10)
  run = jax.jit(lambda p, k: model.apply({"params": p}, x, deterministic=False,
                                          rngs={"dropout": k})[-1])
  # "rbg" keys: threefry bits for every attention weight are slow on CPU.
  key = functools.partial(jax.random.key, impl="rbg")
  a, b, c = run(params, key(1)), run(params, key(1)), run(params, key(2))
  np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(a - c).max()) > 1e-3


def test_input_size_rule():
  models.check_input_size((32, 64, 96))
  with pytest.raises(ValueError, match=r"multiple of 2\*\*5 = 32"):
    models.check_input_size((48, 64, 64))
  with pytest.raises(ValueError, match="32"):
    jax.eval_shape(models.SwinUNETR(in_channels=1, out_channels=2, feature_size=F).init,
                   jax.random.key(0), jnp.zeros((1, 32, 40, 32, 1)))


def test_decode_size():
  assert models.decode_size("Small") == (2, 2, 6, 2) == models.SIZES["small"]
  assert models.decode_size("2,2,4,2") == (2, 2, 4, 2)
  assert models.decode_size([2, 2, 18, 2]) == models.SIZES["big"]
  with pytest.raises(ValueError, match="huge"):
    models.decode_size("huge")


class _FakeDevice:
  def __init__(self, platform):
    self.platform = platform


def test_impl_choice_is_explicit():
  assert models.resolve_impl("auto", jax.devices()) == (
      "cpu" if jax.devices()[0].platform == "cpu" else "xla")
  assert models.resolve_impl("auto", [_FakeDevice("gpu")] * 2) == "xla"
  assert models.resolve_impl("cpu", [_FakeDevice("gpu")]) == "cpu"
  with pytest.raises(ValueError, match="one platform"):
    models.resolve_impl("auto", [_FakeDevice("gpu"), _FakeDevice("cpu")])
  with pytest.raises(ValueError, match="impl='tpu'"):
    models.resolve_impl("tpu")
  assert models.SwinUNETR(in_channels=1, out_channels=2, devices=[_FakeDevice("gpu")]).config.impl == "xla"
  with pytest.raises(ValueError, match="cuDNN"):
    models.SwinConfig(attention="cudnn")
  with pytest.raises(ValueError, match="remat='sometimes'"):
    models.SwinConfig(remat="sometimes")
  # The kernel choice is the config's, never the process default at trace time.
  import pathlib  # pylint: disable=g-import-not-at-top
  sources = pathlib.Path(models.__file__).parent.glob("*.py")
  assert not [p.name for p in sources if "default_backend" in p.read_text()]


def _random_attention_inputs(window, num_mask, batch, heads=3, hd=8, seed=0):
  n = int(np.prod(window))
  num_windows = batch * max(num_mask, 1)
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal((num_windows, n, heads, hd)), jnp.float32) for _ in range(3))
  bias = jnp.asarray(rng.standard_normal((heads, n, n)), jnp.float32)
  mask = None
  if num_mask:
    ids = rng.integers(0, 3, size=(num_mask, n))
    mask = jnp.asarray(np.where(ids[:, None] != ids[:, :, None], swin.MASK_VALUE, 0.0), jnp.float32)
  return q, k, v, bias, mask


@pytest.mark.parametrize("window,num_mask,batch", [((7, 7, 7), 8, 2), ((4, 4, 2), 6, 3), ((3, 3, 3), 0, 2),
                                                    ((7, 7, 7), 0, 2)])
def test_attention_by_chunks_equals_whole_array(window, num_mask, batch):
  """The CPU loop (a few windows per step, the mask tiled by window index) computes
  exactly the whole-array softmax(q k^T + bias + mask) v, for one and for several windows per step."""
  q, k, v, bias, mask = _random_attention_inputs(window, num_mask, batch)
  n, heads = q.shape[1], q.shape[2]
  per_step = cpu_kernels.windows_per_chunk(num_mask or q.shape[0], heads, n)
  whole, whole_probs = attention._with_probs(q, k, v, bias, mask)
  chunked = jax.jit(functools.partial(attention._forward, impl="cpu", keep_probs=False))(
      q, k, v, bias, mask)
  print(f"\n[window {window}, {num_mask} mask windows, batch {batch}] {per_step} windows per step, "
        f"max diff {float(jnp.abs(whole - chunked).max()):.2e}")
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=1e-5, atol=1e-6)
  # The training forward also returns the probabilities its backward uses.
  out, probs = jax.jit(functools.partial(attention._forward, impl="cpu", keep_probs=True))(
      q, k, v, bias, mask)
  np.testing.assert_allclose(np.asarray(out), np.asarray(chunked), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(probs), np.asarray(whole_probs), rtol=1e-5, atol=1e-7)
  if window != (7, 7, 7):
    assert per_step > 1  # the multi-window step is exercised


def _table_attention_loss(kernel_fn, q, k, v, table, window, mask, w):
  bias = swin.relative_position_bias(table, window)
  return jnp.sum(kernel_fn(q, k, v, bias, mask) * w)


# Every attention kernel as a function of (q, k, v, bias, mask). "padded" is
# the cuDNN kernel's token padding and sequence-length masking, run by the XLA
# implementation of the same call (cuDNN itself needs an NVIDIA GPU:
# launch/gpu_check.py runs it there).
ATTENTION_FUNCTIONS = {
    "einsum_xla": functools.partial(attention.window_attention, impl="xla", kernel="einsum"),
    "einsum_cpu": functools.partial(attention.window_attention, impl="cpu", kernel="einsum"),
    "xla_dpa": functools.partial(attention.window_attention, impl="xla", kernel="xla_dpa"),
    "padded": functools.partial(attention.dot_product_attention, implementation="xla",
                                token_multiple=attention.CUDNN_TOKEN_MULTIPLE),
}


@pytest.mark.parametrize("num_mask", [0, 8])
def test_attention_kernels_agree_with_autodiff_reference(num_mask):
  """Outputs and gradients (q, k, v and the relative-position table) of every kernel
  equal plain autodiff of softmax(q k^T + table[index] + mask) v, the gather written as
  MONAI writes it; the table gradient is the scatter-add of the bias gradient."""
  window = (7, 7, 7)
  q, k, v, _, mask = _random_attention_inputs(window, num_mask, 2, seed=1)
  heads = q.shape[2]
  table = jnp.asarray(np.random.default_rng(2).standard_normal((13 ** 3, heads)), jnp.float32)
  w = jnp.asarray(_projection(q.shape, 3))
  index = jnp.asarray(swin.relative_position_index(window))

  def reference(q, k, v, table):
    bias = table[index.reshape(-1)].reshape(index.shape + (heads,)).transpose(2, 0, 1)
    return jnp.sum(attention.probs_times(attention.attention_probs(q, k, bias, mask), v) * w)

  ref_loss, ref_grads = jax.jit(jax.value_and_grad(reference, argnums=(0, 1, 2, 3)))(q, k, v, table)
  for name, fn in ATTENTION_FUNCTIONS.items():
    loss = functools.partial(_table_attention_loss, fn, window=window, mask=mask, w=w)
    value, grads = jax.jit(jax.value_and_grad(
        lambda q, k, v, t: loss(q, k, v, t), argnums=(0, 1, 2, 3)))(q, k, v, table)
    diffs = [float(jnp.abs(g - r).max() / jnp.abs(r).max()) for g, r in zip(grads, ref_grads)]
    print(f"\n[attention {name}, {num_mask} mask windows] loss {float(value - ref_loss):.1e}, "
          f"relative max-abs grad diffs q/k/v/table {['%.1e' % d for d in diffs]}")
    np.testing.assert_allclose(float(value), float(ref_loss), rtol=1e-5)
    assert max(diffs) <= 1e-5, name


def test_dense_matches_flax_dense_and_sums_its_bias_gradient_in_float32():
  from bsf_jax.models import layers  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (64, 1024, 8))
  ours = layers.Dense(16, config=models.SwinConfig(dtype=jnp.bfloat16))
  theirs = flax.linen.Dense(16, dtype=jnp.bfloat16)
  p_ours, p_theirs = (m.init(jax.random.key(1), x)["params"] for m in (ours, theirs))
  # Same params (names, shapes, init), the same bf16 forward.
  assert jax.tree.map(jnp.shape, p_ours) == jax.tree.map(jnp.shape, p_theirs)
  jax.tree.map(np.testing.assert_array_equal, p_ours, p_theirs)
  p = {"kernel": p_ours["kernel"], "bias": jnp.full((16,), 0.1)}
  np.testing.assert_array_equal(ours.apply({"params": p}, x), theirs.apply({"params": p}, x))
  # The bias gradient sums the cotangent over 65,536 tokens: in float32 it is
  # the exact sum of the bf16 cotangents; in bf16 it loses digits (flax's
  # nn.Dense: 5.6e-2 relative on XLA:CPU when this test was written).
  w = jax.random.normal(jax.random.key(2), (64, 1024, 16)).astype(jnp.bfloat16)
  exact = np.asarray(w, np.float64).sum(axis=(0, 1))
  grad = lambda m: jax.grad(lambda b: jnp.sum(
      (m.apply({"params": {"kernel": p["kernel"], "bias": b}}, x) * w).astype(jnp.float32)))(p["bias"])
  err_ours = np.abs(np.asarray(grad(ours)) - exact).max() / np.abs(exact).max()
  assert err_ours < 1e-5, err_ours
