"""Numerical parity of bsf_jax.models with MONAI / the PyTorch SSL head reference.

Every parity test runs once per kernel path (`impl="xla"`, the path GPUs take,
and `impl="cpu"`), forward and backward, at "highest" matmul precision.
Weights go both ways through `bsf_jax.convert`; the max-abs differences are
printed (run with `-s` to see them) and must be <= 1e-4 in float32.

Gradients are judged against MONAI's autograd in float64: float32 gradients of
these models carry real rounding error (InstanceNorm's backward cancels over
all voxels; LeakyReLU kinks flip side under rounding), so JAX float32 and
torch float32 differ from each other by more than either's own error suggests.
Each gradient tensor's float32 error (relative L2 against float64) must be
within 3x torch float32's own error, plus 1e-5 for tensors where torch is
exact to float32 resolution.
"""

import functools
import os

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsf_jax import convert, models
from bsf_jax.models import attention, cpu_kernels, swin

torch = pytest.importorskip("torch")
monai_nets = pytest.importorskip("monai.networks.nets")

TOL = 1e-4
F = 12  # small feature size keeps the tests fast
IMPLS = ("xla", "cpu")
# Gradient error may be this many times torch float32's own (module docstring).
GRAD_FACTOR = 3.0
GRAD_SLACK = 1e-5


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


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, x):
  """Jitted forward shared by the tests (cached per model and input shape)."""
  return model.apply({"params": params}, x, mutable=["intermediates"])


def _inputs(shape, channels, seed=0):
  x = np.random.default_rng(seed).standard_normal((1, channels) + shape).astype(np.float32)
  return x, jnp.asarray(x.transpose(0, 2, 3, 4, 1))


def _to_ncdhw(a):
  a = np.asarray(a, np.float32)
  return a.transpose(0, 4, 1, 2, 3) if a.ndim == 5 else a


def _max_diff(jax_out, torch_out):
  return float(np.abs(_to_ncdhw(jax_out) - torch_out.detach().numpy()).max())


def _monai_swin_unetr(seed=0):
  torch.manual_seed(seed)
  return _perturb_torch(monai_nets.SwinUNETR(in_channels=2, out_channels=3, feature_size=F), seed)


def _run_swin_unetr(model, params, x):
  logits, state = _apply(model, params, x)
  return logits, state["intermediates"]["hidden_states"][0]


def _check_swin_unetr(tm, model, params, shape, label):
  x, xj = _inputs(shape, 2)
  with torch.no_grad():
    ref = tm(torch.from_numpy(x))
    ref_hs = tm.swinViT(torch.from_numpy(x), True)
  logits, hs = _run_swin_unetr(model, params, xj)
  assert logits.shape == (1,) + shape + (3,)
  diffs = [_max_diff(h, r) for h, r in zip(hs, ref_hs)]
  diff = _max_diff(logits, ref)
  print(f"\n[{label} {shape}] hidden-state max-abs diffs {['%.2e' % d for d in diffs]}, "
        f"logits {diff:.2e}")
  assert len(hs) == 5
  assert max(diffs) <= TOL and diff <= TOL


@pytest.mark.parametrize("impl", IMPLS)
def test_swin_unetr_monai_to_jax_cubic(impl):
  tm = _monai_swin_unetr(0)
  kwargs = convert.model_kwargs_from_state_dict(tm.state_dict(), "swin_unetr")
  model = models.build("swin_unetr", impl=impl, **kwargs)
  params = convert.params_from_torch(tm.state_dict(), "swin_unetr", model)
  _check_swin_unetr(tm, model, params, (64, 64, 64), f"SwinUNETR MONAI->JAX {impl}")


def _ssl_reference(seed):
  from bsf_jax.reference.ssl_head import TorchSSLHead  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  return _perturb_torch(TorchSSLHead(2, feature_size=F), seed)


def _check_ssl(tm, model, params, shape, label):
  x, xj = _inputs(shape, 2, seed=3)
  with torch.no_grad():
    ref = tm(torch.from_numpy(x))
  out, _ = _apply(model, params, xj)
  assert out[0].shape == (1, 4) and out[1].shape == (1, 512) and out[2].shape == (1,) + shape + (2,)
  diffs = [_max_diff(o, r) for o, r in zip(out, ref)]
  print(f"\n[{label} {shape}] rotation {diffs[0]:.2e}, contrastive {diffs[1]:.2e}, "
        f"reconstruction {diffs[2]:.2e}")
  assert max(diffs) <= TOL


@pytest.mark.parametrize("impl", IMPLS)
def test_ssl_head_torch_to_jax_cubic(impl):
  tm = _ssl_reference(2)
  kwargs = convert.model_kwargs_from_state_dict(tm.state_dict(), "ssl_head")
  model = models.build("ssl_head", impl=impl, **kwargs)
  params = convert.params_from_torch(tm.state_dict(), "ssl_head", model)
  _check_ssl(tm, model, params, (64, 64, 64), f"SSLHead torch->JAX {impl}")


def _projection(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _relative_l2(a, b, floor):
  return float(np.linalg.norm(a - b)) / max(float(np.linalg.norm(b)), floor)


def _check_gradients(label, ours, torch32, torch64):
  """ours / torch32 / torch64: gradients keyed by MONAI names (plus "input").

  Each tensor's float32 error against float64 must be within GRAD_FACTOR x
  torch float32's own, norms floored at 1e-3 of the largest gradient's norm
  (a conv bias that feeds an InstanceNorm has an exact gradient of 0).
  """
  assert ours.keys() == torch64.keys() == torch32.keys()
  floor = 1e-3 * max(float(np.linalg.norm(v)) for v in torch64.values())
  worst, rows = 0.0, []
  for key in sorted(torch64):
    truth = torch64[key]
    assert ours[key].shape == truth.shape, key
    ours_err = _relative_l2(ours[key], truth, floor)
    torch_err = _relative_l2(torch32[key], truth, floor)
    ratio = ours_err / (GRAD_FACTOR * torch_err + GRAD_SLACK)
    rows.append((ratio, key, ours_err, torch_err))
    worst = max(worst, ratio)
  for ratio, key, ours_err, torch_err in sorted(rows)[-4:]:
    print(f"  {key}: JAX f32 {ours_err:.2e}, torch f32 {torch_err:.2e} (vs float64)")
  print(f"\n[{label}] {len(rows)} gradient tensors, worst error / allowed {worst:.2f}")
  bad = [(key, ours_err, torch_err) for ratio, key, ours_err, torch_err in rows if ratio > 1]
  assert not bad, f"gradients further from float64 than {GRAD_FACTOR}x torch float32: {bad}"


def _as_tuple(out):
  return out if isinstance(out, tuple) else (out,)


def _torch_outputs_and_gradients(tm, x, cotangents, dtype):
  """torch outputs and the gradients of sum(outputs * cotangents), in `dtype`."""
  tm = tm.to(dtype)
  tm.zero_grad()
  xt = torch.from_numpy(np.moveaxis(x, -1, 1).copy()).to(dtype).requires_grad_(True)
  outs = _as_tuple(tm(xt))
  loss = sum((o * torch.from_numpy(_to_ncdhw(c)).to(dtype)).sum() for o, c in zip(outs, cotangents))
  loss.backward()
  grads = {k: p.grad.double().numpy() for k, p in tm.named_parameters()}
  grads["input"] = np.moveaxis(xt.grad.double().numpy(), 1, -1)
  return [o.detach().double().numpy() for o in outs], grads


def _jax_outputs_and_gradients(model, params, kind, x, cotangents):
  """One compiled program: the outputs and the pullback of `cotangents` (a linear loss)."""
  def run(p, xj):
    out, pullback = jax.vjp(lambda p_, x_: model.apply({"params": p_}, x_), p, xj)
    return out, pullback(tuple(cotangents) if isinstance(out, tuple) else cotangents[0])
  out, (g_params, g_input) = jax.jit(run)(params, jnp.asarray(x))
  grads = {k: np.asarray(v, np.float64) for k, v in convert.params_to_numpy(g_params, kind).items()
           if not k.endswith("relative_position_index")}
  grads["input"] = np.asarray(g_input, np.float64)
  return _as_tuple(out), grads


def _check_outputs_and_gradients(label, model, params, kind, tm, x, cotangents):
  """Outputs (<= TOL max-abs vs torch float32) and gradients (`_check_gradients`), the
  params exported into `tm` (the JAX -> MONAI direction)."""
  tm.load_state_dict(convert.params_to_torch(params, kind), strict=True)
  outs, ours = _jax_outputs_and_gradients(model, params, kind, x, cotangents)
  ref32, torch32 = _torch_outputs_and_gradients(tm, x, cotangents, torch.float32)
  _, torch64 = _torch_outputs_and_gradients(tm, x, cotangents, torch.float64)
  diffs = [float(np.abs(_to_ncdhw(o) - r).max()) for o, r in zip(outs, ref32)]
  print(f"\n[{label} {x.shape[1:4]}] output max-abs diffs {['%.2e' % d for d in diffs]}")
  assert max(diffs) <= TOL
  _check_gradients(label, ours, torch32, torch64)


@pytest.mark.parametrize("impl,remat", [("xla", "block"), ("cpu", "none")])
def test_swin_unetr_outputs_and_gradients_match_monai(impl, remat):
  """Logits, and the input's and every parameter's gradient, of SwinUNETR against MONAI
  (float64 autograd as the truth for gradients), weights exported JAX -> MONAI.

  (32, 32, 64) is not a multiple of the 7^3 window at any stage, and stages 0-2 run
  shifted blocks (32^3 would leave MONAI's training-mode InstanceNorm a 1^3 bottleneck).
  remat here also shows that it changes neither outputs nor gradients.
  """
  model = models.SwinUNETR(in_channels=2, out_channels=3, feature_size=F, impl=impl, remat=remat)
  params = _random_params(model, 11)
  x = np.random.default_rng(12).standard_normal((1, 32, 32, 64, 2)).astype(np.float32)
  cotangents = [_projection(x.shape[:-1] + (3,), 13)]
  tm = monai_nets.SwinUNETR(in_channels=2, out_channels=3, feature_size=F)
  _check_outputs_and_gradients(f"SwinUNETR {impl} remat={remat}", model, params, "swin_unetr",
                               tm, x, cotangents)


@pytest.mark.parametrize("impl,kernel", [("xla", "xla_dpa"), ("cpu", "einsum")])
def test_ssl_head_outputs_and_gradients_match_torch(impl, kernel):
  """Rotation, contrastive and reconstruction outputs and every gradient of the SSL head
  against the reference's autograd (float64 as the truth), weights exported JAX -> torch,
  at a non-cubic (64, 64, 32) with two volumes. The XLA case runs the attention through
  `jax.nn.dot_product_attention` (the einsum kernel's XLA path is the SwinUNETR test's)."""
  from bsf_jax.reference.ssl_head import TorchSSLHead  # pylint: disable=g-import-not-at-top
  model = models.SSLHead(in_channels=2, feature_size=F, impl=impl, attention=kernel)
  params = _random_params(model, 7)
  x = np.random.default_rng(8).standard_normal((2, 64, 64, 32, 2)).astype(np.float32)
  cotangents = [_projection((2, 4), 9), _projection((2, 512), 10), _projection(x.shape, 11)]
  _check_outputs_and_gradients(f"SSLHead {impl}/{kernel}", model, params, "ssl_head",
                               TorchSSLHead(2, feature_size=F), x, cotangents)


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


@pytest.mark.parametrize("remat", ["block", "dots_saveable"])
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
