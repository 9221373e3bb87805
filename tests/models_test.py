"""Numerical parity of bsf_jax.models with MONAI / the PyTorch SSL head reference.

Weights go both ways through `bsf_jax.convert`; the max-abs differences are
printed (run with `-s` to see them) and must be <= 1e-4 in float32.
"""

import functools

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsf_jax import convert, models
from bsf_jax.models import swin

torch = pytest.importorskip("torch")
monai_nets = pytest.importorskip("monai.networks.nets")

TOL = 1e-4
F = 12  # small feature size keeps the tests fast


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


def test_swin_unetr_monai_to_jax_cubic():
  tm = _monai_swin_unetr(0)
  kwargs = convert.model_kwargs_from_state_dict(tm.state_dict(), "swin_unetr")
  model = convert.build_model("swin_unetr", **kwargs)
  params = convert.params_from_torch(tm.state_dict(), "swin_unetr", model)
  _check_swin_unetr(tm, model, params, (64, 64, 64), "SwinUNETR MONAI->JAX")


def test_swin_unetr_jax_to_monai_noncubic_remat():
  # remat=True here: its outputs matching MONAI also shows remat does not change them.
  model = models.SwinUNETR(2, 3, feature_size=F, remat=True)
  params = _random_params(model, 1)
  tm = monai_nets.SwinUNETR(in_channels=2, out_channels=3, feature_size=F).eval()
  tm.load_state_dict(convert.params_to_torch(params, "swin_unetr"), strict=True)
  _check_swin_unetr(tm, model, params, (32, 64, 96), "SwinUNETR JAX->MONAI remat")


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


def test_ssl_head_torch_to_jax_cubic():
  tm = _ssl_reference(2)
  kwargs = convert.model_kwargs_from_state_dict(tm.state_dict(), "ssl_head")
  model = convert.build_model("ssl_head", **kwargs)
  params = convert.params_from_torch(tm.state_dict(), "ssl_head", model)
  _check_ssl(tm, model, params, (64, 64, 64), "SSLHead torch->JAX")


def test_ssl_head_jax_to_torch_noncubic():
  from bsf_jax.reference.ssl_head import TorchSSLHead  # pylint: disable=g-import-not-at-top
  model = models.SSLHead(2, feature_size=F)
  params = _random_params(model, 4)
  tm = TorchSSLHead(2, feature_size=F).eval()
  tm.load_state_dict(convert.params_to_torch(params, "ssl_head"), strict=True)
  _check_ssl(tm, model, params, (64, 96, 32), "SSLHead JAX->torch")


@pytest.mark.parametrize("name,expected", [("tiny", 62_191_941), ("small", 64_076_853),
                                           ("big", 69_731_589)])
def test_param_counts_match_monai(name, expected):
  model = models.SwinUNETR(4, 3, feature_size=48, depths=models.decode_size(name))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 32, 4)))
  ours = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"]))
  theirs = sum(p.numel() for p in monai_nets.SwinUNETR(
      in_channels=4, out_channels=3, feature_size=48, depths=models.decode_size(name)).parameters())
  print(f"\n[{name}] params ours {ours:,} MONAI {theirs:,}")
  assert ours == theirs == expected


def test_remat_same_gradients():
  # One Swin stage (a plain and a shifted block + merging) keeps the two gradient compilations cheap.
  x = jax.random.normal(jax.random.key(5), (1, 16, 16, 16, F))
  stages = [swin.BasicLayer(F, 2, 3, (7, 7, 7), (0.0, 0.0), remat=r) for r in (False, True)]
  params = _random_params(stages[0], 6, x)
  loss = lambda m, p: jnp.sum(m.apply({"params": p}, x) ** 2)
  grads = [jax.jit(jax.grad(functools.partial(loss, m)))(params) for m in stages]
  leaves = list(zip(*map(jax.tree.leaves, grads)))
  diff = max(float(jnp.abs(a - b).max()) for a, b in leaves)
  scale = max(float(jnp.abs(a).max()) for a, _ in leaves)
  print(f"\n[remat] max-abs gradient diff {diff:.2e} (largest gradient {scale:.2e})")
  assert diff <= 1e-4 * max(scale, 1.0)


def test_bf16_runs_and_stays_close():
  x = jax.random.normal(jax.random.key(7), (1, 32, 32, 32, 2))
  f32 = models.SwinUNETR(2, 3, feature_size=F, depths=(1, 1, 1, 1))
  params = _random_params(f32, 8)
  ref, _ = _apply(f32, params, x)
  out, _ = _apply(models.SwinUNETR(2, 3, feature_size=F, depths=(1, 1, 1, 1), dtype=jnp.bfloat16),
                  params, x)
  assert out.dtype == jnp.bfloat16
  rel = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
  print(f"\n[bf16] relative L2 error of logits vs fp32: {rel:.3e}")
  assert rel < 0.05


def test_dropout_and_stochastic_depth_use_the_dropout_rng():
  model = models.SwinTransformer(1, F, depths=(1, 1, 1, 1), drop_rate=0.1, attn_drop_rate=0.1,
                                 dropout_path_rate=0.2)
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
    jax.eval_shape(models.SwinUNETR(1, 2, feature_size=F).init, jax.random.key(0),
                   jnp.zeros((1, 32, 40, 32, 1)))


def test_decode_size():
  assert models.decode_size("Small") == (2, 2, 6, 2) == models.SIZES["small"]
  assert models.decode_size("2,2,4,2") == (2, 2, 4, 2)
  assert models.decode_size([2, 2, 18, 2]) == models.SIZES["big"]
  with pytest.raises(ValueError, match="huge"):
    models.decode_size("huge")


def test_ssl_head_gradients_match_torch():
  """Gradients, not just outputs: covers the hand-written VJPs (window attention,
  bias and scale sums as matmuls) against PyTorch's autograd of the reference."""
  from bsf_jax.reference.ssl_head import TorchSSLHead  # pylint: disable=g-import-not-at-top
  model = models.SSLHead(2, feature_size=F)
  params = _random_params(model, 7)
  tm = TorchSSLHead(2, feature_size=F)
  tm.load_state_dict(convert.params_to_torch(params, "ssl_head"), strict=True)
  x = np.random.default_rng(8).standard_normal((2, 64, 64, 32, 2)).astype(np.float32)

  def loss(p):
    rot, con, rec = model.apply({"params": p}, jnp.asarray(x))
    return jnp.sum(rot ** 2) + jnp.mean(con ** 2) + jnp.mean(rec ** 2)

  grads = jax.jit(jax.grad(loss))(params)
  rot, con, rec = tm(torch.from_numpy(np.moveaxis(x, -1, 1).copy()))
  ((rot ** 2).sum() + (con ** 2).mean() + (rec ** 2).mean()).backward()
  torch_grads = tm.state_dict()  # buffers (relative_position_index) as they are
  torch_grads.update({k: p.grad for k, p in tm.named_parameters()})
  expected = convert.params_from_torch(torch_grads, "ssl_head", model)
  flat = flax.traverse_util.flatten_dict(grads)
  flat_expected = flax.traverse_util.flatten_dict(expected)
  assert flat.keys() == flat_expected.keys()
  # A decoder conv bias feeds an InstanceNorm, which removes it: its exact
  # gradient is 0 and both sides hold rounding noise. So each difference is
  # relative to its own gradient's size, but at least 1e-3 of the largest.
  floor = 1e-3 * max(float(np.abs(v).max()) for v in flat_expected.values())
  rel = {k: float(np.abs(np.asarray(flat[k]) - flat_expected[k]).max()) /
         max(float(np.abs(flat_expected[k]).max()), floor) for k in flat}
  worst = max(rel.values())
  for k in sorted(rel, key=rel.get)[-5:]:
    print("/".join(k), f"{rel[k]:.2e}")
  print(f"\n[SSLHead gradients JAX vs torch] worst relative max-abs diff {worst:.2e}")
  assert worst <= 2e-4


@pytest.mark.parametrize("window,num_mask,batch", [((7, 7, 7), 8, 2), ((4, 4, 2), 6, 3), ((3, 3, 3), 0, 2),
                                                    ((7, 7, 7), 0, 2)])
def test_attention_by_chunks_equals_whole_array(window, num_mask, batch):
  """The CPU inference loop (a few windows per step, the mask tiled by window index) computes
  exactly the whole-array softmax(q k^T + bias + mask) v, for one and for several windows per step."""
  n, heads, hd = int(np.prod(window)), 3, 8
  num_windows = batch * max(num_mask, 1)
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((num_windows, n, heads, hd)), jnp.float32) for _ in range(3))
  bias = jnp.asarray(rng.standard_normal((heads, n, n)), jnp.float32)
  mask = None
  if num_mask:
    ids = rng.integers(0, 3, size=(num_mask, n))
    mask = jnp.asarray(np.where(ids[:, None] != ids[:, :, None], swin.MASK_VALUE, 0.0), jnp.float32)
  per_step = swin._windows_per_chunk(num_mask or num_windows, heads, n)
  whole = jnp.einsum("bhnm,bmhd->bnhd", swin._attention_probs(q, k, bias, mask), v)
  chunked = jax.jit(swin._attention_by_chunks)(q, k, v, bias, mask)
  print(f"\n[window {window}, {num_mask} mask windows, batch {batch}] {per_step} windows per step, "
        f"max diff {float(jnp.abs(whole - chunked).max()):.2e}")
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=1e-5, atol=1e-6)
  # The training forward also returns the probabilities its backward uses.
  out, probs = jax.jit(functools.partial(swin._attention_by_chunks, keep_probs=True))(q, k, v, bias, mask)
  np.testing.assert_allclose(np.asarray(out), np.asarray(chunked), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(probs), np.asarray(swin._attention_probs(q, k, bias, mask)),
                             rtol=1e-5, atol=1e-7)
  if window != (7, 7, 7):
    assert per_step > 1  # the multi-window step is exercised
