"""Kernels for `impl="cpu"`: the same arithmetic as the XLA path, in a loop order XLA:CPU runs fast.

Nothing here changes what a model computes; each function equals its
`impl="xla"` counterpart up to float rounding, and the parity tests run both
paths against MONAI. Why each form is faster on XLA:CPU, with the measurements,
is in docs/models.md and BENCHMARKS.md.

- `conv3d_same`: a stride-1 'same' 3D convolution, as one im2col matmul for
  small feature maps, otherwise as a 2D convolution over slices plus a
  shifted sum, whose kernel gradient is k^3 shifted matmuls (custom VJP).
- `scan_window_chunks`: window attention run a few windows at a time
  (`lax.scan`), so each step's probabilities stay in cache.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from bsf_jax.models.swin_config import accumulation_dtype

# Largest im2col patch tensor (elements) for which a conv runs as one matmul.
IM2COL_MAX_ELEMENTS = 2 ** 24

# Bytes of attention probabilities one step of the chunked attention holds,
# sized to stay within a core's L2 cache.
CHUNK_BYTES = 1 << 20


def conv3d_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 'same' cross-correlation of NDHWC `x` with a DHWIO kernel (k > 1)."""
  k = kernel.shape[0]
  if x.size * k ** 3 <= IM2COL_MAX_ELEMENTS:
    return _conv3d_as_matmul(x, kernel)
  return _conv3d_slicewise(x, kernel)


def _shifted_windows(xp: jax.Array, k: int, d: int, h: int, w: int):
  """The k^3 shifted (d, h, w) views of a padded input, in kernel order."""
  return [xp[:, i:i + d, j:j + h, l:l + w, :]
          for i in range(k) for j in range(k) for l in range(k)]


def _pad_same(x: jax.Array, k: int) -> jax.Array:
  pad = k // 2
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (pad, pad), (0, 0)))


def _conv3d_as_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """im2col + one matmul; forward and both gradients are plain matmuls."""
  k, _, _, c_in, c_out = kernel.shape
  _, d, h, w, _ = x.shape
  patches = jnp.concatenate(_shifted_windows(_pad_same(x, k), k, d, h, w), axis=-1)
  return jnp.dot(patches, kernel.reshape(k ** 3 * c_in, c_out))


def _conv3d_as_conv2d(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """One conv2d over the slices of the first spatial axis, then a shifted sum.

  Every slice is convolved over the other two axes with all k kernel planes
  at once (k * C_out output channels); plane i of slice d + i - k//2 is summed
  into output slice d.
  """
  k, _, _, c_in, c_out = kernel.shape
  pad = k // 2
  b, d, h, w, _ = x.shape
  planes = jnp.moveaxis(kernel, 0, 3).reshape(k, k, c_in, k * c_out)
  y = jax.lax.conv_general_dilated(
      x.reshape(b * d, h, w, c_in), planes, window_strides=(1, 1),
      padding=[(pad, pad)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = y.reshape(b, d, h, w, k, c_out)
  y = jnp.pad(y, ((0, 0), (pad, pad), (0, 0), (0, 0), (0, 0), (0, 0)))
  return sum(y[:, i:i + d, :, :, i] for i in range(k))


@jax.custom_vjp
def _conv3d_slicewise(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`_conv3d_as_conv2d` whose kernel gradient is k^3 shifted matmuls.

  The input gradient is the transposed slice-wise convolution (autodiff).
  """
  return _conv3d_as_conv2d(x, kernel)


def _conv3d_slicewise_fwd(x, kernel):
  return _conv3d_as_conv2d(x, kernel), (x, kernel)


def _conv3d_slicewise_bwd(res, g):
  x, kernel = res
  _, input_vjp = jax.vjp(lambda x_: _conv3d_as_conv2d(x_, kernel), x)
  k, _, _, c_in, c_out = kernel.shape
  _, d, h, w, _ = x.shape
  g_rows = g.reshape(-1, c_out)
  d_kernel = jnp.stack([
      jnp.dot(window.reshape(-1, c_in).T, g_rows, preferred_element_type=accumulation_dtype(x.dtype))
      for window in _shifted_windows(_pad_same(x, k), k, d, h, w)])
  return input_vjp(g)[0], d_kernel.reshape(kernel.shape).astype(kernel.dtype)


_conv3d_slicewise.defvjp(_conv3d_slicewise_fwd, _conv3d_slicewise_bwd)


def windows_per_chunk(period: int, heads: int, n: int) -> int:
  """Largest divisor of `period` windows whose fp32 probabilities fit `CHUNK_BYTES`.

  One window when even one does not fit (stage 1: 3 heads x 343^2 floats).

  Args:
    period: the mask's window count (a chunk must not straddle two mask
      repetitions), or all windows when there is no mask.
    heads: attention heads.
    n: tokens per window.
  """
  per_window = heads * n * n * 4
  fits = [c for c in range(1, period + 1) if period % c == 0 and c * per_window <= CHUNK_BYTES]
  return max(fits, default=1)


def scan_window_chunks(
    block: Callable[..., tuple[jax.Array, jax.Array]],
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
    keep_probs: bool = False):
  """Runs `block(q, k, v, mask) -> (out, probs)` over chunks of windows.

  Args:
    block: attention on a chunk: (c, n, heads, d) q/k/v and a (c, n, n) mask
      or None -> ((c, n, heads, d) output, (c, heads, n, n) probabilities).
    q, k, v: (bw, n, heads, d) for all windows.
    mask: (nW, n, n), repeating every nW windows, or None.
    keep_probs: also return the (bw, heads, n, n) probabilities (the training
      forward, whose backward needs them).

  Returns:
    The output, or (output, probabilities).
  """
  bw, n, heads, _ = q.shape
  period = bw if mask is None else mask.shape[0]
  c = windows_per_chunk(period, heads, n)
  chunk = lambda t: t.reshape(t.shape[0] // c, c, *t.shape[1:])
  mask_chunks = None if mask is None else chunk(mask)

  def step(_, xs):
    i, qc, kc, vc = xs
    mc = None if mask is None else mask_chunks[i % (period // c)]
    out, probs = block(qc, kc, vc, mc)
    return None, ((out, probs) if keep_probs else out)

  _, ys = jax.lax.scan(step, None, (jnp.arange(bw // c), chunk(q), chunk(k), chunk(v)))
  if keep_probs:
    return ys[0].reshape(q.shape), ys[1].reshape(bw, heads, n, n)
  return ys.reshape(q.shape)
