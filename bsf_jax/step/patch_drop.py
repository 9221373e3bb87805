"""Box inpainting on the device: the reference `patch_rand_drop`.

Jittable, keyed and vectorised re-implementation of the reference
`patch_rand_drop` (BrainSegFounder `pretrain/utils/ops.py`, from MONAI's
SwinUNETR pretraining), for channels-last batches [B, H, W, D, C]. Every
sample draws from its own key (`jax.random.split(key, B)[i]`), so results do
not depend on how the batch is sharded, and there is no Python loop over
samples. The SSL views built from it are in `ssl_views`.

Reference box rule, per spatial dim of size n: lo = int(tolr * n),
hi = int(max_block_sz * n); start ~ U{0 .. n - lo - 1}, side ~ U{lo .. hi - 1},
stop = min(start + side, n). A target u * H * W * D with u ~ U(0, max_drop) is
drawn first and boxes are drawn while the running sum of box volumes (overlaps
counted twice, clipped sides as drawn) is below the target; later boxes
overwrite earlier ones. With static shapes we draw a fixed `max_boxes` per
sample and enable box k iff the volume of boxes 0..k-1 is below the target:
the same stopping rule, including the overshoot of the last box. `max_boxes`
defaults to `default_max_boxes`, a 6-sigma bound that truncates with
probability below 1e-9 (docs/ssl.md).

Noise fill: the reference fills each box with standard normal noise of the
box's shape (all channels), min-max normalised over that box to [0, 1]. We
reproduce each box's normaliser exactly by sampling the box's extreme order
statistics (max, then min of the rest) and each visible element's marginal
exactly: it is the box maximum or minimum with probability 1/n each, otherwise
a normal truncated to [min, max]. Only the joint law of two elements of one box
differs (never observable per voxel). Boxes with n = 1 element (C = 1, 1-voxel
box) give 0/0 = NaN in the reference; we treat them as n = 2 (value 0 or 1).
"""

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Normal-approximation quantile for default_max_boxes: P(truncation) < 1e-9.
_MAX_BOXES_Z = 6.0


class Boxes(NamedTuple):
  """Fixed-size set of candidate boxes for one volume.

  Attributes:
    start: [N, 3] int32 first voxel of each box (H, W, D).
    stop: [N, 3] int32 one past the last voxel (already clipped to the volume).
    enabled: [N] bool, boxes the reference loop would have drawn.
    truncated: bool scalar, True if the reference would have drawn more than N.
  """
  start: Array
  stop: Array
  enabled: Array
  truncated: Array


def block_limits(spatial_shape: Sequence[int], max_block_sz: float,
                 tolr: float) -> tuple[tuple[int, int], ...]:
  """Per-dim (lo, hi) of the reference box rule: side ~ U{lo .. hi - 1}.

  Args:
    spatial_shape: (H, W, D).
    max_block_sz: largest box side as a fraction of the dim (exclusive).
    tolr: smallest box side as a fraction of the dim.

  Returns:
    ((lo, hi), ...) per spatial dim.

  Raises:
    ValueError: if a dim cannot hold a box of positive size (the reference
      raises inside numpy's randint, or loops forever when every side is 0).
  """
  limits = []
  for axis, n in enumerate(spatial_shape):
    lo, hi = int(tolr * n), int(max_block_sz * n)
    if hi <= lo or hi < 2:
      raise ValueError(
          f"patch_rand_drop: spatial dim {axis} of size {n} (shape "
          f"{tuple(spatial_shape)}) gives box sides in [{lo}, {hi}) with "
          f"max_block_sz={max_block_sz}, tolr={tolr}; need hi > lo and hi >= 2")
    limits.append((lo, hi))
  return tuple(limits)


def default_max_boxes(spatial_shape: Sequence[int], max_drop: float = 0.3,
                      max_block_sz: float = 0.25, tolr: float = 0.05) -> int:
  """Number of candidate boxes so that truncation is negligible.

  Uses the exact mean mu and s.d. sigma of one (clipped) box volume and takes
  the smallest N with N mu - z sigma sqrt(N) >= max_drop * H * W * D, z = 6:
  even at the largest target the sum of N volumes falls short with probability
  below ~1e-9 (the lower tail of a sum of positive skewed volumes is lighter
  than the normal one, so this errs on the safe side). Examples (defaults):
  32^3 -> 273, 64^3 -> 189, 96^3 -> 195, 128^3 -> 177.

  Args:
    spatial_shape: (H, W, D).
    max_drop: largest dropped fraction.
    max_block_sz: see `block_limits`.
    tolr: see `block_limits`.

  Returns:
    The number of candidate boxes (>= 1).
  """
  mean, second = 1.0, 1.0
  for n, (lo, hi) in zip(spatial_shape,
                         block_limits(spatial_shape, max_block_sz, tolr)):
    starts = np.arange(0, n - lo)[:, None]
    sides = np.minimum(np.arange(lo, hi)[None, :], n - starts)
    sides = sides.astype(np.float64)
    mean *= sides.mean()
    second *= (sides**2).mean()
  sigma = math.sqrt(max(second - mean * mean, 0.0))
  target = max_drop * float(np.prod(spatial_shape))
  z = _MAX_BOXES_Z
  root = (z * sigma + math.sqrt((z * sigma)**2 + 4 * mean * target))
  root /= 2 * mean
  return max(1, math.ceil(root * root))


def sample_boxes(key: Array, spatial_shape: Sequence[int], *,
                 max_drop: float = 0.3, max_block_sz: float = 0.25,
                 tolr: float = 0.05, max_boxes: int | None = None) -> Boxes:
  """Draws the boxes of one reference `patch_rand_drop` call (one volume).

  Args:
    key: PRNG key.
    spatial_shape: (H, W, D), static.
    max_drop: target fraction u ~ U(0, max_drop).
    max_block_sz: see `block_limits`.
    tolr: see `block_limits`.
    max_boxes: candidate boxes; default `default_max_boxes(...)`.

  Returns:
    A `Boxes` tuple (use `jax.vmap` over keys for many volumes).
  """
  spatial_shape = tuple(int(n) for n in spatial_shape)
  limits = block_limits(spatial_shape, max_block_sz, tolr)
  if max_boxes is None:
    max_boxes = default_max_boxes(spatial_shape, max_drop, max_block_sz, tolr)
  n = np.asarray(spatial_shape, np.int32)
  lo = np.asarray([l for l, _ in limits], np.int32)
  hi = np.asarray([h for _, h in limits], np.int32)
  # One uniform draw for everything (cheaper to compile than several
  # randint calls); floor(u * m) is uniform on {0 .. m - 1} up to float32
  # rounding (m <= a few hundred here, so the bias is below 1e-4 relative).
  u = jax.random.uniform(key, (max_boxes * 6 + 1,), jnp.float32)
  target = u[0] * max_drop * float(np.prod(spatial_shape))
  u = u[1:].reshape(max_boxes, 6)

  def pick(v, low, count):
    return low + jnp.minimum(jnp.floor(v * count).astype(jnp.int32), count - 1)

  start = pick(u[:, :3], 0, n - lo)
  side = pick(u[:, 3:], lo, hi - lo)
  stop = jnp.minimum(start + side, n)
  volume = jnp.prod(stop - start, axis=1).astype(jnp.float32)
  # Box k is drawn iff the voxels counted before it are below the target.
  before = jnp.cumsum(volume) - volume
  enabled = before < target
  truncated = jnp.sum(volume) < target
  return Boxes(start.astype(jnp.int32), stop.astype(jnp.int32), enabled,
               truncated)


# Boxes per bit-packed group in `last_box_index`: group sums stay below 2^24,
# so float32 holds them exactly.
_BOXES_PER_GROUP = 24


def last_box_index(boxes: Boxes, spatial_shape: Sequence[int]) -> Array:
  """Index of the last enabled box covering each voxel, -1 where none.

  Later boxes overwrite earlier ones in the reference, so this is the box
  whose fill a voxel shows. Box membership is separable: voxel (x, y, z) is
  in box k iff in_hw[k, (x, y)] and in_d[k, z]. Boxes are packed 24 to a
  group with weights 2^j, and one matmul per group,
  sum_j 2^j in_hw[k_j, (x, y)] in_d[k_j, z], is an integer below 2^24 whose
  highest set bit is the last box of the group covering the voxel. All
  products and sums are small integers, so the float32 matmul is exact. That
  is 2 N H W D flops of dense matmul (0.4 GFLOP at 96^3), instead of a
  scatter-max over the N box footprints (about 1 s of an SSL step at 96^3 on
  CPU) or the N H W D temporaries of a dense membership test.

  Args:
    boxes: `Boxes` of one volume.
    spatial_shape: (H, W, D).

  Returns:
    [H, W, D] int32.
  """
  h, w, d = (int(n) for n in spatial_shape)
  n = boxes.enabled.shape[0]
  groups = -(-n // _BOXES_PER_GROUP)
  pad = groups * _BOXES_PER_GROUP - n

  def inside(axis, size):  # [N, size] bool: the box's range on this axis
    pos = jnp.arange(size, dtype=jnp.int32)[None, :]
    return ((pos >= boxes.start[:, axis, None])
            & (pos < boxes.stop[:, axis, None]))

  in_h = inside(0, h) & boxes.enabled[:, None]
  in_hw = (in_h[:, :, None] & inside(1, w)[:, None, :]).reshape(n, h * w)
  in_d = inside(2, d)
  in_hw = jnp.pad(in_hw, ((0, pad), (0, 0)))
  in_d = jnp.pad(in_d, ((0, pad), (0, 0)))
  weight = jnp.asarray(2.0**np.arange(_BOXES_PER_GROUP), jnp.float32)
  in_hw = in_hw.reshape(groups, _BOXES_PER_GROUP, h * w).astype(jnp.float32)
  in_d = (in_d.reshape(groups, _BOXES_PER_GROUP, d).astype(jnp.float32)
          * weight[None, :, None])
  packed = jnp.einsum("gjv,gjz->gvz", in_hw, in_d,
                      precision=jax.lax.Precision.HIGHEST)  # [G, HW, D]
  # frexp(s) = (m, e) with s = m 2^e, m in [0.5, 1): the highest bit is e - 1.
  bit = jnp.frexp(packed)[1] - 1
  base = (jnp.arange(groups, dtype=jnp.int32) * _BOXES_PER_GROUP)[:, None, None]
  index = jnp.where(packed > 0, base + bit, -1)
  return jnp.max(index, axis=0).reshape(h, w, d)


def _extremes(key: Array, n: Array) -> tuple[Array, Array, Array, Array]:
  """(lo, hi, Phi(lo), Phi(hi)) of n iid standard normals; see below."""
  tiny = jnp.finfo(jnp.float32).tiny
  u_max, u_min = jax.random.uniform(key, (2,) + n.shape, jnp.float32, tiny,
                                    1.0)
  upper_tail = -jnp.expm1(jnp.log(u_max) / n)  # 1 - Phi(max)
  hi = -jax.scipy.special.ndtri(upper_tail)
  cdf_hi = 1.0 - upper_tail
  cdf_lo = cdf_hi * -jnp.expm1(jnp.log(u_min) / (n - 1.0))
  lo = jax.scipy.special.ndtri(cdf_lo)
  return lo, hi, cdf_lo, cdf_hi


def box_noise_extremes(key: Array, n: Array) -> tuple[Array, Array]:
  """Samples (min, max) of n iid standard normals, exactly.

  max: P(max <= t) = Phi(t)^n. min given max: the other n - 1 are iid normal
  truncated above at max. Computed through tail probabilities (expm1/log) so
  that large n keeps float32 precision.

  Args:
    key: PRNG key.
    n: element counts (any shape, >= 2), float32.

  Returns:
    (lo, hi) arrays of n's shape.
  """
  lo, hi, _, _ = _extremes(key, n)
  return lo, hi


def normalised_noise(u: Array, n: Array, lo: Array, hi: Array) -> Array:
  """Marginal of one element of min-max normalised normal noise of size n.

  With probability 1/n the element is the maximum (1.0), with 1/n the minimum
  (0.0), else a normal truncated to [lo, hi], normalised to (0, 1).

  Args:
    u: uniform(0, 1) draws, one per element.
    n: element count of the element's box (broadcastable to u, >= 2).
    lo: box minimum (broadcastable to u).
    hi: box maximum (broadcastable to u).

  Returns:
    float32 values in [0, 1], shape of u.
  """
  ndtr = jax.scipy.special.ndtr
  return _normalised_noise(u, n, lo, hi, ndtr(lo), ndtr(hi))


def _normalised_noise(u, n, lo, hi, cdf_lo, cdf_hi):
  p_ext = 1.0 / n
  w = jnp.clip((u - p_ext) / jnp.maximum(1.0 - 2.0 * p_ext, 1e-12), 0.0, 1.0)
  g = jax.scipy.special.ndtri(cdf_lo + w * (cdf_hi - cdf_lo))
  mid = jnp.clip((g - lo) / (hi - lo), 0.0, 1.0)
  return jnp.where(u < p_ext, 1.0, jnp.where(u >= 1.0 - p_ext, 0.0, mid))


# One patch_rand_drop of one sample uses its key as: boxes, extremes, fill.
def box_index(key: Array, spatial: tuple[int, ...],
              cfg: dict) -> tuple[Array, Array]:
  """Boxes of one sample -> ([H, W, D] last-box index, [N] box volumes)."""
  boxes = sample_boxes(jax.random.split(key, 3)[0], spatial, **cfg)
  idx = last_box_index(boxes, spatial)
  return idx, jnp.prod(boxes.stop - boxes.start, axis=1).astype(jnp.float32)


def _noise_fill(key: Array, x: Array, idx: Array, volume: Array) -> Array:
  """Normalised-noise values for every voxel of one [H, W, D, C] sample."""
  _, k_ext, k_fill = jax.random.split(key, 3)
  n = jnp.maximum(volume * x.shape[-1], 2.0)
  # Per-box parameters are computed once per box, then gathered per voxel.
  safe = jnp.maximum(idx, 0)[..., None]
  per_voxel = [t[safe] for t in (n, *_extremes(k_ext, n))]
  u = jax.random.uniform(k_fill, x.shape, jnp.float32)
  return _normalised_noise(u, *per_voxel).astype(x.dtype)


def fill_boxes(keys, x, x_rep, idx, volume):
  """Fills the boxed voxels of a batch with noise (x_rep None) or x_rep."""
  if x_rep is None:
    x_rep = jax.vmap(_noise_fill)(keys, x, idx, volume)
  return jnp.where((idx >= 0)[..., None], x_rep, x)


def check_batch(name: str, x: Array) -> None:
  """Raises unless x is a [B, H, W, D, C] batch; `name` is the caller."""
  if x.ndim != 5:
    raise ValueError(f"{name}: expected [B, H, W, D, C], got shape {x.shape}")


def drop_config(x, max_drop, max_block_sz, tolr, max_boxes):
  """(spatial shape, `sample_boxes` keywords) of a drop on batch x."""
  spatial = tuple(int(n) for n in x.shape[1:4])
  if max_boxes is None:
    max_boxes = default_max_boxes(spatial, max_drop, max_block_sz, tolr)
  return spatial, dict(max_drop=max_drop, max_block_sz=max_block_sz,
                       tolr=tolr, max_boxes=max_boxes)


def patch_rand_drop(key: Array, x: Array, x_rep: Array | None = None,
                    max_drop: float = 0.3, max_block_sz: float = 0.25,
                    tolr: float = 0.05,
                    max_boxes: int | None = None) -> Array:
  """Reference `patch_rand_drop` on every sample of a batch.

  Args:
    key: PRNG key; sample i uses `jax.random.split(key, B)[i]`.
    x: [B, H, W, D, C] volumes.
    x_rep: None for noise fill, else [B, H, W, D, C] whose boxes are copied
      into x (sample i from x_rep[i]).
    max_drop: target dropped fraction u ~ U(0, max_drop) per sample.
    max_block_sz: largest box side as a fraction of each dim (exclusive).
    tolr: smallest box side as a fraction of each dim.
    max_boxes: candidate boxes per sample; default `default_max_boxes`.

  Returns:
    Array of x's shape and dtype.
  """
  check_batch("patch_rand_drop", x)
  if x_rep is not None and x_rep.shape != x.shape:
    raise ValueError(f"patch_rand_drop: x_rep shape {x_rep.shape} != x shape "
                     f"{x.shape}")
  spatial, cfg = drop_config(x, max_drop, max_block_sz, tolr, max_boxes)
  keys = jax.random.split(key, x.shape[0])
  idx, volume = jax.vmap(lambda k: box_index(k, spatial, cfg))(keys)
  return fill_boxes(keys, x, x_rep, idx, volume)
