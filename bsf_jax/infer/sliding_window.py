"""Jitted sliding-window inference over whole volumes (MONAI-compatible).

`sliding_window_inference` reproduces `monai.inferers.sliding_window_inference`
for channels-last volumes: the same window grid (MONAI's `_get_scan_interval` /
`dense_patch_slices` rule), the same importance maps (constant or Gaussian,
clamped at `max(min, 1e-3)`), the same padding of inputs smaller than the ROI
and the same crop back. Differences are engineering only:

* The window grid is computed in NumPy from static shapes at trace time, so the
  whole inference is one XLA program: window gather, predictor, importance
  weighting, accumulation and the final division all run on device.
* Windows are processed `sw_batch_size` at a time inside a `lax.scan`; a
  remainder batch, when `sw_batch_size` does not divide the window count, runs
  once after it at its own size (a second trace of the predictor, but no
  predicted padding windows: one 96^3 window at sw_batch_size 4 would otherwise
  cost four).
* With a `mesh`, the window batch axis is sharded along `data_axis`, so every
  device predicts `sw_batch_size / n_devices` windows per step.

Typical use with a Flax model (params are traced arguments, not constants):

  logits = sliding_window_inference(
      x, (96, 96, 96), model.apply, overlap=0.5, mode="gaussian",
      sw_batch_size=4, predictor_args=({"params": params},))

`bsf_jax.infer.inference` builds the predictors runs and tools use on it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_PAD_MODES = {
    # torch.nn.functional.pad mode -> jnp.pad mode
    "constant": "constant",
    "reflect": "reflect",
    "replicate": "edge",
    "circular": "wrap",
}
_BLEND_MODES = ("constant", "gaussian")


def _as_tuple(value, n: int, name: str) -> tuple:
  """Broadcasts a scalar to an n-tuple, or checks a sequence has length n."""
  if isinstance(value, Sequence) and not isinstance(value, str):
    if len(value) != n:
      raise ValueError(f"{name} has {len(value)} entries {tuple(value)}, "
                       f"expected one per spatial dim ({n}).")
    return tuple(value)
  return (value,) * n


def resolve_roi_size(roi_size, image_size: Sequence[int]) -> tuple[int, ...]:
  """Replaces None/non-positive ROI entries by the image size (MONAI rule).

  Args:
    roi_size: int or sequence of ints/None, one per spatial dim.
    image_size: spatial size of the (unpadded) input.

  Returns:
    The ROI size as a tuple of positive ints.
  """
  roi = _as_tuple(roi_size, len(image_size), "roi_size")
  return tuple(int(s) if (r is None or r <= 0) else int(r)
               for r, s in zip(roi, image_size))


def scan_interval(image_size: Sequence[int], roi_size: Sequence[int],
                  overlap: Sequence[float]) -> tuple[int, ...]:
  """Stride between windows per dim: `int(roi * (1 - overlap))`, at least 1.

  A dim where the ROI equals the image gets a stride of the full ROI (one
  window), as in MONAI's `_get_scan_interval`.

  Args:
    image_size: spatial size after padding to at least the ROI.
    roi_size: window size.
    overlap: overlap fraction per dim, each in [0, 1).

  Returns:
    The stride per dim.
  """
  out = []
  for img, roi, ov in zip(image_size, roi_size, overlap):
    if roi == img:
      out.append(int(roi))
    else:
      out.append(max(int(roi * (1 - ov)), 1))
  return tuple(out)


def window_starts(image_size: Sequence[int], roi_size: Sequence[int],
                  overlap: Sequence[float] | float) -> np.ndarray:
  """Start corners of all windows, in MONAI's `dense_patch_slices` order.

  Per dim, window i starts at `i * stride`, shifted back so the last window
  ends exactly at the image border; the number of windows is the smallest that
  reaches the border. Dims are enumerated in C order (last dim fastest).

  Args:
    image_size: spatial size, each >= the ROI (pad first).
    roi_size: window size.
    overlap: overlap fraction, scalar or per dim.

  Returns:
    int array [n_windows, n_spatial_dims].
  """
  ndim = len(image_size)
  overlap = _as_tuple(overlap, ndim, "overlap")
  roi = tuple(min(int(r), int(s)) for r, s in zip(roi_size, image_size))
  stride = scan_interval(image_size, roi, overlap)
  per_dim = []
  for img, r, st in zip(image_size, roi, stride):
    # Smallest n with (n - 1) * stride + roi >= img.
    n = 1 + max(math.ceil((img - r) / st), 0)
    starts = [min(i * st, img - r) for i in range(n)]
    per_dim.append(starts)
  grid = np.meshgrid(*per_dim, indexing="ij")
  return np.stack([g.reshape(-1) for g in grid], axis=1).astype(np.int64)


def importance_map_1d(roi_size: Sequence[int], mode: str,
                      sigma_scale: Sequence[float] | float) -> list[np.ndarray]:
  """Per-dim factors of the blending weight map (float32, unclamped).

  The full map is their outer product; see `_importance_map`.

  Args:
    roi_size: window size.
    mode: "constant" or "gaussian".
    sigma_scale: Gaussian sigma as a fraction of the ROI, scalar or per dim.

  Returns:
    One float32 vector per spatial dim.
  """
  if mode not in _BLEND_MODES:
    raise ValueError(f"mode must be one of {_BLEND_MODES}, got {mode!r}.")
  if mode == "constant":
    return [np.ones((r,), np.float32) for r in roi_size]
  scales = _as_tuple(sigma_scale, len(roi_size), "sigma_scale")
  factors = []
  for r, sc in zip(roi_size, scales):
    sigma = r * sc
    # Same float32 arithmetic as MONAI's compute_importance_map.
    x = np.arange(-(r - 1) / 2.0, (r - 1) / 2.0 + 1, dtype=np.float32)
    factors.append(np.exp(x**2 / np.float32(-2 * sigma**2)).astype(np.float32))
  return factors


def _importance_map(factors: list[np.ndarray], dtype) -> jax.Array:
  """Outer product of the 1-D factors on device, clamped at max(min, 1e-3)."""
  w = jnp.asarray(factors[0])
  for f in factors[1:]:
    w = w[..., None] * jnp.asarray(f)
  # Zero weights would make the count map 0 (division by zero) at far corners.
  return jnp.maximum(w, jnp.maximum(jnp.min(w), 1e-3)).astype(dtype)


def _check_args(x, roi_size, overlap, sw_batch_size, padding_mode, mesh,
                data_axis):
  """Validates arguments that the jitted body cannot report clearly."""
  if x.ndim < 3:
    raise ValueError(f"x must be channels-last [B, *spatial, C], got shape "
                     f"{tuple(x.shape)}.")
  spatial = tuple(x.shape[1:-1])
  roi = resolve_roi_size(roi_size, spatial)
  ov = tuple(float(o) for o in _as_tuple(overlap, len(spatial), "overlap"))
  if any(not 0 <= o < 1 for o in ov):
    raise ValueError(f"overlap must be in [0, 1), got {ov}.")
  if not isinstance(sw_batch_size, int) or sw_batch_size < 1:
    raise ValueError(f"sw_batch_size must be a positive int, got "
                     f"{sw_batch_size!r}.")
  if padding_mode not in _PAD_MODES:
    raise ValueError(f"padding_mode must be one of {tuple(_PAD_MODES)}, got "
                     f"{padding_mode!r}.")
  if mesh is not None:
    if data_axis not in mesh.shape:
      raise ValueError(f"mesh has axes {tuple(mesh.shape)}, no {data_axis!r}.")
    n = mesh.shape[data_axis]
    if sw_batch_size % n:
      raise ValueError(f"sw_batch_size={sw_batch_size} must be a multiple of "
                       f"mesh axis {data_axis!r} size {n} to shard windows.")
  return roi, ov


def sliding_window_inference(
    x: jax.Array,
    roi_size: Sequence[int] | int,
    predictor: Callable[..., jax.Array],
    overlap: Sequence[float] | float = 0.5,
    mode: str = "constant",
    sw_batch_size: int = 4,
    sigma_scale: Sequence[float] | float = 0.125,
    padding_mode: str = "constant",
    cval: float = 0.0,
    *,
    predictor_args: tuple[Any, ...] = (),
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str = "data",
) -> jax.Array:
  """Sliding-window inference with MONAI semantics, as one jitted program.

  Args:
    x: channels-last input [B, *spatial, C].
    roi_size: window size; None/non-positive entries take the image size.
    predictor: called as `predictor(*predictor_args, windows)`, maps windows
      [n, *roi, C] to [n, *roi, K]; arguments first so that a Flax
      `model.apply` (variables, x) works as is. It is a static argument of the
      jit: pass a stable callable (a module-level function, `model.apply`) and
      put arrays such as params in `predictor_args`, or every new closure
      recompiles.
    overlap: overlap fraction between windows, scalar or per dim, in [0, 1).
    mode: "constant" (equal weights) or "gaussian" blending.
    sw_batch_size: windows per predictor call (static). When it does not
      divide the window count, the last, smaller batch is a second call (one
      more compile of the predictor, no wasted windows), as in MONAI.
    sigma_scale: Gaussian sigma as a fraction of the ROI (mode="gaussian").
    padding_mode: how inputs smaller than the ROI are padded: "constant",
      "reflect", "replicate" or "circular" (torch names).
    cval: fill value for constant padding.
    predictor_args: pytrees passed to `predictor` before the windows (traced).
    mesh: optional mesh; the window batch axis is sharded along `data_axis`.
    data_axis: mesh axis name used to shard windows.

  Returns:
    Blended predictions [B, *spatial, K] in float32 (float64 for float64 x).
  """
  roi, ov = _check_args(x, roi_size, overlap, sw_batch_size, padding_mode,
                        mesh, data_axis)
  ndim = len(roi)
  sigma = tuple(float(s) for s in _as_tuple(sigma_scale, ndim, "sigma_scale"))
  if mode not in _BLEND_MODES:
    raise ValueError(f"mode must be one of {_BLEND_MODES}, got {mode!r}.")
  return _sliding_window_jit(
      x, tuple(predictor_args), roi_size=roi, predictor=predictor, overlap=ov,
      mode=mode, sw_batch_size=sw_batch_size, sigma_scale=sigma,
      padding_mode=padding_mode, cval=float(cval), mesh=mesh,
      data_axis=data_axis)


@functools.partial(
    jax.jit,
    static_argnames=("roi_size", "predictor", "overlap", "mode",
                     "sw_batch_size", "sigma_scale", "padding_mode", "cval",
                     "mesh", "data_axis"))
def _sliding_window_jit(x, predictor_args, *, roi_size, predictor, overlap,
                        mode, sw_batch_size, sigma_scale, padding_mode, cval,
                        mesh, data_axis):
  """Jitted body of `sliding_window_inference` (arguments already checked)."""
  batch, *orig_size, channels = x.shape
  ndim = len(orig_size)
  acc_dtype = jnp.promote_types(x.dtype, jnp.float32)

  # Pad dims smaller than the ROI, split like torch: half before, rest after.
  pads = []
  for s, r in zip(orig_size, roi_size):
    diff = max(r - s, 0)
    pads.append((diff // 2, diff - diff // 2))
  if any(p != (0, 0) for p in pads):
    pad_width = [(0, 0)] + pads + [(0, 0)]
    if padding_mode == "constant":
      x = jnp.pad(x, pad_width, mode="constant", constant_values=cval)
    else:
      x = jnp.pad(x, pad_width, mode=_PAD_MODES[padding_mode])
  image_size = tuple(x.shape[1:-1])

  # Static window table: (batch index, start corner) per window, in MONAI's
  # order (image-major, then dense_patch_slices order). Full batches of
  # sw_batch_size run in a scan; the remainder runs once as a smaller batch
  # (as MONAI does), padded only up to the mesh's data-axis size with
  # zero-weight repeats of window 0.
  starts = window_starts(image_size, roi_size, overlap)
  n_win = starts.shape[0]
  total = batch * n_win
  n_full, rest = divmod(total, sw_batch_size)
  shards = 1 if mesh is None else mesh.shape[data_axis]
  rest_padded = -(-rest // shards) * shards
  idx = np.arange(n_full * sw_batch_size + rest_padded)
  valid = (idx < total).astype(np.float32)
  idx = np.where(idx < total, idx, 0)
  table = np.concatenate([(idx // n_win)[:, None], starts[idx % n_win]],
                         1).astype(np.int32)
  split = n_full * sw_batch_size
  full_table = table[:split].reshape(n_full, sw_batch_size, ndim + 1)
  full_valid = valid[:split].reshape(n_full, sw_batch_size)

  w_map = _importance_map(importance_map_1d(roi_size, mode, sigma_scale),
                          acc_dtype)
  zero = jnp.zeros((), jnp.int32)

  def window(vol, corner, size):
    """[1, *size, ch] block of vol at (batch, *start) = corner."""
    return jax.lax.dynamic_slice(vol, (*corner, zero),
                                 (1, *size, vol.shape[-1]))

  def add_window(vol, corner, value):
    block = window(vol, corner, value.shape[1:-1]) + value
    return jax.lax.dynamic_update_slice(vol, block, (*corner, zero))

  # Count map, shared by all batch elements as in MONAI ([1, *image, 1]).
  starts_dev = jnp.asarray(starts, jnp.int32)

  def count_body(i, cnt):
    corner = (zero, *(starts_dev[i, d] for d in range(ndim)))
    return add_window(cnt, corner, w_map[None, ..., None])

  count = jax.lax.fori_loop(0, n_win, count_body,
                            jnp.zeros((1, *image_size, 1), acc_dtype))

  def run_batch(out, corners, weights):
    """Predicts the windows at `corners` and adds them, weighted, into out."""
    wins = jax.vmap(lambda c: window(x, tuple(c), roi_size)[0])(corners)
    if mesh is not None:
      wins = jax.lax.with_sharding_constraint(
          wins, jax.sharding.NamedSharding(
              mesh, jax.sharding.PartitionSpec(data_axis)))
    pred = predictor(*predictor_args, wins)
    if pred.ndim != ndim + 2 or tuple(pred.shape[1:-1]) != tuple(roi_size):
      raise ValueError(
          f"predictor must map [n, *roi, C] to [n, *roi, K] with roi "
          f"{tuple(roi_size)}; got {tuple(pred.shape)} for windows "
          f"{tuple(wins.shape)}.")
    pred = pred.astype(acc_dtype) * w_map[None, ..., None]
    pred = pred * weights.astype(acc_dtype).reshape((-1,) + (1,) * (ndim + 1))

    # Sequential adds keep overlapping windows of one batch correct.
    def add_one(i, acc):
      corner = tuple(corners[i, d] for d in range(ndim + 1))
      return add_window(acc, corner, pred[i][None])

    return jax.lax.fori_loop(0, corners.shape[0], add_one, out)

  # The output channel count is only known after tracing the predictor.
  probe = jax.eval_shape(
      lambda a: predictor(*predictor_args, a),
      jax.ShapeDtypeStruct((min(sw_batch_size, total), *roi_size, channels),
                           x.dtype))
  out = jnp.zeros((batch, *image_size, probe.shape[-1]), acc_dtype)
  if n_full:
    out, _ = jax.lax.scan(
        lambda acc, xs: (run_batch(acc, *xs), None), out,
        (jnp.asarray(full_table), jnp.asarray(full_valid)))
  if rest_padded:
    out = run_batch(out, jnp.asarray(table[split:]),
                    jnp.asarray(valid[split:]))
  out = out / count

  crop = tuple(slice(p[0], p[0] + s) for p, s in zip(pads, orig_size))
  return out[(slice(None), *crop, slice(None))]


# Names of the three spatial axes of a RAS volume [H, W, D, C] (`data.io.to_ras`):
