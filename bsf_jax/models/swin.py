"""3D Swin Transformer encoder, numerically equal to MONAI's `SwinTransformer`.

MONAI reference: `monai/networks/nets/swin_unetr.py` (v1 "merging"
downsampling, `use_v2=False`). Input is channels-last (B, H, W, D, C) with the
spatial axes in MONAI's order. Module names mirror MONAI attribute names
(`patch_embed/proj`, `layers1/blocks_0/attn/qkv`, `layers1/downsample/reduction`)
so `bsf_jax.convert` is a mechanical name table plus transposes.

Static geometry (window shrinking, padding, shift masks, relative position
index) is computed in NumPy at trace time from the input shape.
"""

import functools
import itertools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bsf_jax.models import layers

Dtype = Any
MASK_VALUE = -100.0  # MONAI's value for cross-region pairs in shifted windows.


def get_window_size(dims, window_size, shift_size):
  """MONAI `get_window_size`: a dim not larger than the window shrinks it and drops its shift."""
  window, shift = list(window_size), list(shift_size)
  for i, n in enumerate(dims):
    if n <= window_size[i]:
      window[i] = n
      shift[i] = 0
  return tuple(window), tuple(shift)


def window_partition(x, window):
  """(B, D, H, W, C) -> (B * nW, prod(window), C); windows in row-major grid order."""
  b, d, h, w, c = x.shape
  x = x.reshape(b, d // window[0], window[0], h // window[1], window[1], w // window[2], window[2], c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(-1, window[0] * window[1] * window[2], c)


def window_reverse(windows, window, dims):
  """Inverse of `window_partition` for padded spatial dims (B, D, H, W)."""
  b, d, h, w = dims
  x = windows.reshape(b, d // window[0], h // window[1], w // window[2], *window, -1)
  x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(b, d, h, w, -1)


def relative_position_index(window_size) -> np.ndarray:
  """MONAI's `relative_position_index` buffer, (n, n) int64 with n = prod(window)."""
  w = window_size
  coords = np.stack(np.meshgrid(*[np.arange(i) for i in w], indexing="ij")).reshape(3, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
  rel = rel + np.array([i - 1 for i in w])
  rel = rel * np.array([(2 * w[1] - 1) * (2 * w[2] - 1), 2 * w[2] - 1, 1])
  return rel.sum(-1).astype(np.int64)


@functools.lru_cache(maxsize=None)
def _axis_offsets(w: int) -> np.ndarray:
  """One-hot (2w-1, w, w): entry [i - j + w - 1, i, j] = 1."""
  a = np.zeros((2 * w - 1, w, w), np.float32)
  i, j = np.meshgrid(np.arange(w), np.arange(w), indexing="ij")
  a[i - j + w - 1, i, j] = 1.0
  return a


def relative_position_bias(table: jax.Array, window_size) -> jax.Array:
  """`table[relative_position_index]` as (heads, n, n), n = prod(window_size).

  The index is separable per axis (row = dz*(2w1-1)(2w2-1) + dy*(2w2-1) + dx),
  so the lookup is three small one-hot contractions. Unlike a gather, whose
  gradient is a slow scatter-add on CPU, its gradient is three more einsums.
  """
  w0, w1, w2 = window_size
  t = table.reshape(2 * w0 - 1, 2 * w1 - 1, 2 * w2 - 1, -1)
  a0, a1, a2 = (jnp.asarray(_axis_offsets(w), table.dtype) for w in window_size)
  # One axis at a time keeps every intermediate small (a single 4-operand
  # einsum may materialise the outer product of the one-hots).
  t = jnp.einsum("cmn,abch->abmnh", a2, t)
  t = jnp.einsum("bkl,abmnh->akmlnh", a1, t)
  bias = jnp.einsum("aij,akmlnh->hikmjln", a0, t)
  n = w0 * w1 * w2
  return bias.reshape(-1, n, n)


@functools.lru_cache(maxsize=None)
def window_region_ids(dims, window, shift) -> np.ndarray:
  """(nW, n) id of the shifted region each token of each window came from."""
  img = np.zeros((1, *dims, 1), np.int32)
  cnt = 0
  slices = [(slice(-w), slice(-w, -s), slice(-s, None)) for w, s in zip(window, shift)]
  for d, h, w in itertools.product(*slices):
    img[:, d, h, w, :] = cnt
    cnt += 1
  return window_partition(img, window)[..., 0]


def compute_mask(dims, window, shift) -> jax.Array:
  """MONAI `compute_mask`: (nW, n, n) additive mask, -100 across shifted regions.

  Built in the graph from the (nW, n) region ids rather than embedded as a
  constant: at 96^3 the dense mask is a 160 MB f32[343, 343, 343] that XLA
  constant-folds, which dominated compile time and memory traffic. The
  optimization barrier keeps XLA from folding it back into a constant.
  """
  ids = jax.lax.optimization_barrier(
      jnp.asarray(window_region_ids(dims, window, shift)))
  return jnp.where(ids[:, None, :] != ids[:, :, None],
                   jnp.float32(MASK_VALUE), jnp.float32(0.0))


def _attention_probs(q, k, bias, mask):
  """softmax(q k^T + bias + mask) in fp32, cast to q's dtype: (bw, heads, n, n)."""
  bw, n, heads, _ = q.shape
  logits = jnp.einsum("bnhd,bmhd->bhnm", q, k).astype(jnp.float32) + bias
  if mask is not None:
    nw = mask.shape[0]
    logits = logits.reshape(bw // nw, nw, heads, n, n) + mask[None, :, None]
    logits = logits.reshape(bw, heads, n, n)
  return jax.nn.softmax(logits, axis=-1).astype(q.dtype)


def _probs_times(probs, x):
  """(b, heads, n, m) probabilities (or their gradient) @ (b, m, heads, d) -> (b, n, heads, d).

  Computed heads-major, then transposed: XLA:CPU writes a (b, n, heads, d) dot
  result 2.2x slower than a (b, heads, n, d) one (BENCHMARKS.md, session 4).
  """
  return jnp.einsum("bhnm,bmhd->bhnd", probs, x).transpose(0, 2, 1, 3)


# Bytes of attention probabilities one step of the CPU forward loop holds: small
# enough to stay in the 2 MiB per-core L2 of the CPUs we measured on.
_CHUNK_BYTES = 1 << 20


def _windows_per_chunk(period: int, heads: int, n: int) -> int:
  """Largest divisor of `period` windows whose probabilities fit the chunk budget.

  One window when even one does not fit, as at stage 1 (3 heads x 343^2
  floats = 1.4 MB); a sweep of 1, 7 and 49 windows per step measured the same
  there (BENCHMARKS.md, session 4).

  period: the mask's window count (a chunk must not straddle two mask
  repetitions), or all windows when there is no mask.
  """
  per_window = heads * n * n * 4
  fits = [c for c in range(1, period + 1) if period % c == 0 and c * per_window <= _CHUNK_BYTES]
  return max(fits, default=1)


def _attention_by_chunks(q, k, v, bias, mask, keep_probs: bool = False):
  """The attention forward on CPU, a few windows at a time (`lax.scan`).

  The whole-array forward materialises (bw, heads, n, n) probabilities (about
  1 GB for two 96^3 volumes at stage 1) and XLA:CPU fuses the softmax into the
  dot, which ran 2-3x slower than this loop whose per-step probabilities stay
  in cache. Same arithmetic, so the same numbers (BENCHMARKS.md). On GPU the
  loop would serialise hundreds of tiny kernels, so it is CPU-only.

  Returns the output, or (output, probabilities) with `keep_probs` (the
  training forward, whose backward needs them).
  """
  bw, n, heads, _ = q.shape
  period = bw if mask is None else mask.shape[0]
  c = _windows_per_chunk(period, heads, n)
  chunk = lambda t: t.reshape(t.shape[0] // c, c, *t.shape[1:])
  mask_chunks = None if mask is None else chunk(mask)

  def step(_, xs):
    i, qc, kc, vc = xs
    mc = None if mask is None else mask_chunks[i % (period // c)]
    probs = _attention_probs(qc, kc, bias, mc)
    out = _probs_times(probs, vc)
    return None, ((out, probs) if keep_probs else out)

  _, ys = jax.lax.scan(step, None, (jnp.arange(bw // c), chunk(q), chunk(k), chunk(v)))
  if keep_probs:
    return ys[0].reshape(q.shape), ys[1].reshape(bw, heads, n, n)
  return ys.reshape(q.shape)


def _attention_with_probs(q, k, v, bias, mask):
  """(softmax(q k^T + bias + mask) v, the softmax) for the training forward."""
  if jax.default_backend() == "cpu":
    return _attention_by_chunks(q, k, v, bias, mask, keep_probs=True)
  probs = _attention_probs(q, k, bias, mask)
  return _probs_times(probs, v), probs


@jax.custom_vjp
def attention(q, k, v, bias, mask):
  """Window attention core: softmax(q k^T + bias + mask) v, (bw, n, heads, hd).

  q is already scaled. bias: (heads, n, n) fp32; mask: (nW, n, n) or None.
  On CPU the forward runs `_attention_by_chunks`. Differentiated, the forward
  also keeps the probabilities for the backward, which uses the
  flash-attention identity rowsum(dP * P) = rowsum(dO * O), a reduction over
  head_dim (16-32) instead of over n = 343 keys, and sums the bias gradient
  over windows as a matmul. Both were the slowest ops of the Swin backward on
  XLA:CPU (BENCHMARKS.md).
  """
  if jax.default_backend() == "cpu":
    return _attention_by_chunks(q, k, v, bias, mask)
  return _probs_times(_attention_probs(q, k, bias, mask), v)


def _attention_fwd(q, k, v, bias, mask):
  out, probs = _attention_with_probs(q, k, v, bias, mask)
  return out, (q, k, v, probs, out, mask)


def _attention_bwd(res, d_out):
  q, k, v, probs, out, mask = res
  heads, n = probs.shape[1], probs.shape[2]
  d_v = jnp.einsum("bhnm,bnhd->bmhd", probs, d_out)
  d_probs = jnp.einsum("bnhd,bmhd->bhnm", d_out, v).astype(jnp.float32)
  # An elementwise product and a minor-axis sum (as an einsum, XLA:CPU makes
  # it a batched dot with a 16-long contraction: 5x slower).
  row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  row = row.transpose(0, 2, 1)  # (bw, heads, n)
  d_logits = probs.astype(jnp.float32) * (d_probs - row[..., None])
  d_bias = layers.sum_leading(d_logits, (heads, n, n))
  d_logits = d_logits.astype(q.dtype)
  d_q = _probs_times(d_logits, k)
  d_k = jnp.einsum("bhnm,bnhd->bmhd", d_logits, q)
  d_mask = None if mask is None else jnp.zeros_like(mask)
  return d_q, d_k, d_v, d_bias, d_mask


attention.defvjp(_attention_fwd, _attention_bwd)


class WindowAttention(nn.Module):
  """Window multi-head self-attention with a learned relative position bias."""
  dim: int
  num_heads: int
  window_size: tuple[int, int, int]
  qkv_bias: bool = True
  attn_drop: float = 0.0
  proj_drop: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, window, mask, deterministic: bool = True):
    """x: (B*nW, n, C) windows of shape `window`; mask: (nW, n, n) or None."""
    bw, n, c = x.shape
    heads = self.num_heads
    hd = c // heads
    rows = int(np.prod([2 * w - 1 for w in self.window_size]))
    table = self.param("relative_position_bias_table", nn.initializers.truncated_normal(0.02),
                       (rows, heads), self.param_dtype)
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=nn.initializers.truncated_normal(0.02))
    qkv = dense(3 * c, use_bias=self.qkv_bias, name="qkv")(x).reshape(bw, n, 3, heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = q * (hd ** -0.5)
    # MONAI slices the full window's index with [:n, :n] even when the window
    # shrank (small feature maps); slicing the full bias reproduces that.
    bias = relative_position_bias(table, self.window_size)[:, :n, :n].astype(jnp.float32)
    if self.attn_drop == 0.0 or deterministic:
      y = attention(q, k, v, bias, mask)
    else:
      # Dropout on the probabilities: the plain autodiff path.
      probs = _attention_probs(q, k, bias, mask)
      probs = nn.Dropout(self.attn_drop)(probs, deterministic=deterministic)
      y = _probs_times(probs, v)
    y = y.reshape(bw, n, c)
    y = dense(c, name="proj")(y)
    return nn.Dropout(self.proj_drop)(y, deterministic=deterministic)


class Mlp(nn.Module):
  """MONAI `MLPBlock` (dropout_mode="swin"): linear1 -> exact GELU -> drop -> linear2 -> drop."""
  dim: int
  hidden: int
  drop: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=nn.initializers.truncated_normal(0.02))
    x = nn.gelu(dense(self.hidden, name="linear1")(x), approximate=False)
    x = nn.Dropout(self.drop)(x, deterministic=deterministic)
    x = dense(self.dim, name="linear2")(x)
    return nn.Dropout(self.drop)(x, deterministic=deterministic)


def _norm(name, dtype, param_dtype):
  return nn.LayerNorm(epsilon=layers.TORCH_NORM_EPS, use_fast_variance=False, dtype=dtype,
                      param_dtype=param_dtype, name=name)


class SwinBlock(nn.Module):
  """MONAI `SwinTransformerBlock` on (B, D, H, W, C)."""
  dim: int
  num_heads: int
  window_size: tuple[int, int, int]
  shift_size: tuple[int, int, int]
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop: float = 0.0
  attn_drop: float = 0.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    b, d, h, w, c = x.shape
    window, shift = get_window_size((d, h, w), self.window_size, self.shift_size)
    shortcut = x
    y = _norm("norm1", self.dtype, self.param_dtype)(x)
    # Zero-pad after the norm, as MONAI does; padded tokens take part in attention.
    pads = [(-n) % wn for n, wn in zip((d, h, w), window)]
    y = jnp.pad(y, ((0, 0), (0, pads[0]), (0, pads[1]), (0, pads[2]), (0, 0)))
    dims = (d + pads[0], h + pads[1], w + pads[2])
    shifted = any(s > 0 for s in shift)
    mask = None
    if shifted:
      y = jnp.roll(y, shift=tuple(-s for s in shift), axis=(1, 2, 3))
      mask = compute_mask(dims, window, shift)
    attn = WindowAttention(self.dim, self.num_heads, self.window_size, self.qkv_bias,
                           self.attn_drop, self.drop, self.dtype, self.param_dtype, name="attn")
    y = attn(window_partition(y, window), window, mask, deterministic)
    y = window_reverse(y, window, (b, *dims))
    if shifted:
      y = jnp.roll(y, shift=shift, axis=(1, 2, 3))
    y = y[:, :d, :h, :w, :]
    drop_path = layers.DropPath(self.drop_path)
    x = shortcut + drop_path(y, deterministic)
    y = _norm("norm2", self.dtype, self.param_dtype)(x)
    y = Mlp(self.dim, int(self.dim * self.mlp_ratio), self.drop, self.dtype, self.param_dtype,
            name="mlp")(y, deterministic)
    return x + drop_path(y, deterministic)


class PatchMerging(nn.Module):
  """MONAI v1 `PatchMerging`: concat 8 neighbours in MONAI's order, LayerNorm(8C), Linear(8C->2C)."""
  dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  # (d, h, w) offsets in the order of MONAI's x0..x7.
  OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1))

  @nn.compact
  def __call__(self, x):
    _, d, h, w, _ = x.shape
    x = jnp.pad(x, ((0, 0), (0, d % 2), (0, h % 2), (0, w % 2), (0, 0)))
    x = jnp.concatenate([x[:, i::2, j::2, k::2, :] for i, j, k in self.OFFSETS], axis=-1)
    x = _norm("norm", self.dtype, self.param_dtype)(x)
    return nn.Dense(2 * self.dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=nn.initializers.truncated_normal(0.02), name="reduction")(x)


class BasicLayer(nn.Module):
  """One Swin stage (MONAI `BasicLayer`): blocks with alternating shift, then patch merging."""
  dim: int
  depth: int
  num_heads: int
  window_size: tuple[int, int, int]
  drop_path: Sequence[float]
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop: float = 0.0
  attn_drop: float = 0.0
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    shift = tuple(i // 2 for i in self.window_size)
    block_cls = nn.remat(SwinBlock, static_argnums=(2,)) if self.remat else SwinBlock
    for i in range(self.depth):
      x = block_cls(self.dim, self.num_heads, self.window_size, (0, 0, 0) if i % 2 == 0 else shift,
                    self.mlp_ratio, self.qkv_bias, self.drop, self.attn_drop, self.drop_path[i],
                    self.dtype, self.param_dtype, name=f"blocks_{i}")(x, deterministic)
    return PatchMerging(self.dim, self.dtype, self.param_dtype, name="downsample")(x)


class SwinTransformer(nn.Module):
  """MONAI `SwinTransformer` (3D, v1 merging). Returns the 5 hidden states.

  Attributes:
    in_channels: input channels.
    feature_size: embedding dim of stage 1 (MONAI `embed_dim`); stage i has feature_size * 2^i.
    depths: Swin blocks per stage (4 stages).
    num_heads: attention heads per stage.
    window_size: attention window (int or 3 ints).
    patch_size: patch embedding kernel/stride.
    mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dropout_path_rate: as in MONAI.
    normalize: apply the parameter-free LayerNorm to each hidden state (MONAI `normalize`).
    remat: rematerialise each Swin block in the backward pass.
    dtype: compute dtype; param_dtype: parameter dtype.
  """
  in_channels: int
  feature_size: int = 48
  depths: Sequence[int] = (2, 2, 2, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int | Sequence[int] = 7
  patch_size: int = 2
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  dropout_path_rate: float = 0.0
  normalize: bool = True
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True) -> list[jax.Array]:
    """x: (B, H, W, D, in_channels) -> list of 5 (B, h_i, w_i, d_i, feature_size * 2^i)."""
    if len(self.depths) != 4 or len(self.num_heads) != 4:
      raise ValueError(f"SwinTransformer has 4 stages: got depths={tuple(self.depths)}, "
                       f"num_heads={tuple(self.num_heads)}")
    if x.ndim != 5 or x.shape[-1] != self.in_channels:
      raise ValueError(f"expected input (B, H, W, D, {self.in_channels}), got {x.shape}")
    window = layers.as_tuple3(self.window_size)
    proj_out = layers.layer_norm if self.normalize else (lambda t: t)
    x = _PatchEmbed(self.feature_size, self.patch_size, self.dtype, self.param_dtype,
                    name="patch_embed")(x)
    x = nn.Dropout(self.drop_rate)(x, deterministic=deterministic)
    hidden = [proj_out(x)]
    # Stochastic depth grows linearly over all blocks (MONAI `dpr`).
    dpr = np.linspace(0.0, self.dropout_path_rate, sum(self.depths)).tolist()
    start = 0
    for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      x = BasicLayer(self.feature_size * 2 ** i, depth, heads, window, tuple(dpr[start:start + depth]),
                     self.mlp_ratio, self.qkv_bias, self.drop_rate, self.attn_drop_rate, self.remat,
                     self.dtype, self.param_dtype, name=f"layers{i + 1}")(x, deterministic)
      start += depth
      hidden.append(proj_out(x))
    return hidden


class _PatchEmbed(nn.Module):
  """MONAI `PatchEmbed` without norm: Conv3d(kernel=stride=patch_size) named `proj`."""
  features: int
  patch_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return layers.Conv3d(self.features, self.patch_size, self.patch_size, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="proj")(x)
