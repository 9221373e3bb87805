"""3D Swin Transformer encoder, numerically equal to MONAI's `SwinTransformer`.

MONAI reference: `monai/networks/nets/swin_unetr.py` (v1 "merging"
downsampling, `use_v2=False`). Input is channels-last (B, H, W, D, C) with the
spatial axes in MONAI's order. Module names mirror MONAI attribute names
(`patch_embed/proj`, `layers1/blocks_0/attn/qkv`, `layers1/downsample/reduction`)
so `bsf_jax.weights.convert` is a mechanical name table plus transposes.

Static geometry (window shrinking, padding, shift masks, relative position
index) is computed in NumPy at trace time from the input shape.
"""

import functools
import itertools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bsf_jax.models import attention, layers
from bsf_jax.models.swin_config import (PATCH_MERGING_ORDERS, SwinConfig, accumulation_dtype,
                                        remat_module)

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


class WindowAttention(nn.Module):
  """Window multi-head self-attention with a learned relative position bias."""
  dim: int
  num_heads: int
  window_size: tuple[int, int, int]
  config: SwinConfig = SwinConfig()

  @nn.compact
  def __call__(self, x, window, mask, deterministic: bool = True):
    """x: (B*nW, n, C) windows of shape `window`; mask: (nW, n, n) or None."""
    cfg = self.config
    bw, n, c = x.shape
    heads = self.num_heads
    hd = c // heads
    rows = int(np.prod([2 * w - 1 for w in self.window_size]))
    table = self.param("relative_position_bias_table", nn.initializers.truncated_normal(0.02),
                       (rows, heads), cfg.param_dtype)
    dense = functools.partial(layers.Dense, config=cfg,
                              kernel_init=nn.initializers.truncated_normal(0.02))
    qkv = dense(3 * c, use_bias=cfg.qkv_bias, name="qkv")(x).reshape(bw, n, 3, heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = q * (hd ** -0.5)
    # MONAI slices the full window's index with [:n, :n] even when the window
    # shrank (small feature maps); slicing the full bias reproduces that.
    bias = relative_position_bias(table, self.window_size)[:, :n, :n]
    bias = bias.astype(accumulation_dtype(cfg.dtype))
    if cfg.attn_drop_rate == 0.0 or deterministic:
      y = attention.window_attention(q, k, v, bias, mask, impl=cfg.impl, kernel=cfg.attention)
    else:
      dropout = nn.Dropout(cfg.attn_drop_rate)
      y = attention.dropout_attention(q, k, v, bias, mask,
                                      lambda p: dropout(p, deterministic=deterministic))
    y = y.reshape(bw, n, c)
    y = dense(c, name="proj")(y)
    return nn.Dropout(cfg.drop_rate)(y, deterministic=deterministic)


class Mlp(nn.Module):
  """MONAI `MLPBlock` (dropout_mode="swin"): linear1 -> exact GELU -> drop -> linear2 -> drop."""
  dim: int
  hidden: int
  config: SwinConfig = SwinConfig()

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    cfg = self.config
    dense = functools.partial(layers.Dense, config=cfg,
                              kernel_init=nn.initializers.truncated_normal(0.02))
    x = nn.gelu(dense(self.hidden, name="linear1")(x), approximate=False)
    x = nn.Dropout(cfg.drop_rate)(x, deterministic=deterministic)
    x = dense(self.dim, name="linear2")(x)
    return nn.Dropout(cfg.drop_rate)(x, deterministic=deterministic)


def _norm(name, config):
  return nn.LayerNorm(epsilon=layers.TORCH_NORM_EPS, use_fast_variance=False, dtype=config.dtype,
                      param_dtype=config.param_dtype, name=name)


class SwinBlock(nn.Module):
  """MONAI `SwinTransformerBlock` on (B, D, H, W, C)."""
  dim: int
  num_heads: int
  window_size: tuple[int, int, int]
  shift_size: tuple[int, int, int]
  drop_path: float = 0.0
  config: SwinConfig = SwinConfig()

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    cfg = self.config
    b, d, h, w, c = x.shape
    window, shift = get_window_size((d, h, w), self.window_size, self.shift_size)
    shortcut = x
    y = _norm("norm1", cfg)(x)
    # Zero-pad after the norm, as MONAI does; padded tokens take part in attention.
    pads = [(-n) % wn for n, wn in zip((d, h, w), window)]
    y = jnp.pad(y, ((0, 0), (0, pads[0]), (0, pads[1]), (0, pads[2]), (0, 0)))
    dims = (d + pads[0], h + pads[1], w + pads[2])
    shifted = any(s > 0 for s in shift)
    mask = None
    if shifted:
      y = jnp.roll(y, shift=tuple(-s for s in shift), axis=(1, 2, 3))
      mask = compute_mask(dims, window, shift)
    attn = WindowAttention(self.dim, self.num_heads, self.window_size, config=cfg, name="attn")
    y = attn(window_partition(y, window), window, mask, deterministic)
    y = window_reverse(y, window, (b, *dims))
    if shifted:
      y = jnp.roll(y, shift=shift, axis=(1, 2, 3))
    y = y[:, :d, :h, :w, :]
    drop_path = layers.DropPath(self.drop_path)
    x = shortcut + drop_path(y, deterministic)
    y = _norm("norm2", cfg)(x)
    y = Mlp(self.dim, int(self.dim * cfg.mlp_ratio), config=cfg, name="mlp")(y, deterministic)
    return x + drop_path(y, deterministic)


class PatchMerging(nn.Module):
  """MONAI v1 `PatchMerging`: concat 8 neighbours, LayerNorm(8C), Linear(8C->2C).

  The neighbours come in the order `config.patch_merging` names
  (`swin_config.PATCH_MERGING_ORDERS`): MONAI >= 1.5's, or the order of MONAI
  0.9 to 1.4 that released BrainSegFounder weights were trained with.
  """
  dim: int
  config: SwinConfig = SwinConfig()

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    _, d, h, w, _ = x.shape
    x = jnp.pad(x, ((0, 0), (0, d % 2), (0, h % 2), (0, w % 2), (0, 0)))
    offsets = PATCH_MERGING_ORDERS[cfg.patch_merging]
    x = jnp.concatenate([x[:, i::2, j::2, k::2, :] for i, j, k in offsets], axis=-1)
    x = _norm("norm", cfg)(x)
    return layers.Dense(2 * self.dim, use_bias=False, config=cfg,
                        kernel_init=nn.initializers.truncated_normal(0.02), name="reduction")(x)


class BasicLayer(nn.Module):
  """One Swin stage (MONAI `BasicLayer`): blocks with alternating shift, then patch merging."""
  dim: int
  depth: int
  num_heads: int
  window_size: tuple[int, int, int]
  drop_path: Sequence[float]
  config: SwinConfig = SwinConfig()

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    cfg = self.config
    shift = tuple(i // 2 for i in self.window_size)
    block_cls = remat_module(SwinBlock, cfg.remat, static_argnums=(2,))
    for i in range(self.depth):
      x = block_cls(self.dim, self.num_heads, self.window_size,
                    (0, 0, 0) if i % 2 == 0 else shift, self.drop_path[i], config=cfg,
                    name=f"blocks_{i}")(x, deterministic)
    return PatchMerging(self.dim, config=cfg, name="downsample")(x)


class SwinTransformerNet(nn.Module):
  """MONAI `SwinTransformer` (3D, v1 merging). Returns the 5 hidden states.

  Build it with `bsf_jax.models.SwinTransformer(in_channels=..., **MONAI keywords)`.

  Attributes:
    in_channels: input channels.
    config: the encoder settings (`SwinConfig`).
  """
  in_channels: int
  config: SwinConfig = SwinConfig()

  @nn.compact
  def __call__(self, x, deterministic: bool = True) -> list[jax.Array]:
    """x: (B, H, W, D, in_channels) -> list of 5 (B, h_i, w_i, d_i, feature_size * 2^i)."""
    cfg = self.config
    if x.ndim != 5 or x.shape[-1] != self.in_channels:
      raise ValueError(f"expected input (B, H, W, D, {self.in_channels}), got {x.shape}")
    window = layers.as_tuple3(cfg.window_size)
    proj_out = layers.layer_norm if cfg.normalize else (lambda t: t)
    x = _PatchEmbed(config=cfg, name="patch_embed")(x)
    x = nn.Dropout(cfg.drop_rate)(x, deterministic=deterministic)
    hidden = [proj_out(x)]
    # Stochastic depth grows linearly over all blocks (MONAI `dpr`).
    dpr = np.linspace(0.0, cfg.dropout_path_rate, sum(cfg.depths)).tolist()
    start = 0
    for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
      x = BasicLayer(cfg.feature_size * 2 ** i, depth, heads, window,
                     tuple(dpr[start:start + depth]), config=cfg,
                     name=f"layers{i + 1}")(x, deterministic)
      start += depth
      hidden.append(proj_out(x))
    return hidden


class _PatchEmbed(nn.Module):
  """MONAI `PatchEmbed` without norm: Conv3d(kernel=stride=patch_size) named `proj`."""
  config: SwinConfig = SwinConfig()

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    return layers.Conv3d(cfg.feature_size, cfg.patch_size, cfg.patch_size, config=cfg,
                         name="proj")(x)
