"""Building blocks shared by the Swin encoder, SwinUNETR and the SSL head.

Everything here mirrors a MONAI/PyTorch layer numerically (channels-last
NDHWC instead of NCDHW): `Conv3d` (torch `nn.Conv3d`, kernel stored DHWIO),
`ConvTranspose3d` for kernel == stride (torch `nn.ConvTranspose3d`), the
parameter-free `instance_norm` (torch `InstanceNorm3d(affine=False)`),
`layer_norm` (PyTorch eps 1e-5), `DropPath` (MONAI `DropPath`), trilinear x2
upsampling (torch `F.interpolate(..., align_corners=False)`), and the UNETR
blocks `UnetResBlock`, `UnetrUpBlock`, `UnetOutBlock`.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# PyTorch's LayerNorm / InstanceNorm epsilon; Flax defaults to 1e-6.
TORCH_NORM_EPS = 1e-5
LEAKY_SLOPE = 0.01


def torch_conv_init(key, shape, dtype=jnp.float32):
  """PyTorch's default conv/linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  Args:
    key: jax PRNG key.
    shape: kernel shape, last axis = output features, the rest = fan in.
    dtype: parameter dtype.

  Returns:
    The initialised kernel.
  """
  fan_in = int(np.prod(shape[:-1]))
  bound = 1.0 / np.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def sum_leading(g: jax.Array, trailing_shape: tuple[int, ...]) -> jax.Array:
  """Sums `g` over its leading axes down to `trailing_shape`, as a matmul.

  XLA:CPU lowers a reduction over non-minor axes to a tree of reduce-windows
  that re-runs the producer fusion; a dot with a ones vector runs on the
  matmul library and reads a materialised operand. Used for the relative
  position bias gradient (a sum over all windows of the batch).
  """
  size = int(np.prod(trailing_shape))
  rows = g.reshape(-1, size)
  ones = jnp.ones((rows.shape[0],), rows.dtype)
  return jnp.dot(ones, rows, preferred_element_type=jnp.float32).astype(
      g.dtype).reshape(trailing_shape)


def layer_norm(x: jax.Array, eps: float = TORCH_NORM_EPS) -> jax.Array:
  """Parameter-free LayerNorm over the last axis (torch `F.layer_norm(x, [C])`)."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def instance_norm(x: jax.Array, eps: float = TORCH_NORM_EPS) -> jax.Array:
  """InstanceNorm without affine parameters over the spatial axes of NDHWC.

  Matches `torch.nn.InstanceNorm3d(C)` (affine=False, biased variance), which
  is what MONAI's `norm_name="instance"` and the BSF SSL head use.
  """
  x32 = x.astype(jnp.float32)
  axes = tuple(range(1, x.ndim - 1))
  mean = jnp.mean(x32, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=axes, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def leaky_relu(x: jax.Array) -> jax.Array:
  return nn.leaky_relu(x, negative_slope=LEAKY_SLOPE)


def upsample_trilinear_x2(x: jax.Array) -> jax.Array:
  """x2 trilinear upsampling of NDHWC, torch's `align_corners=False`.

  With half-pixel centres a x2 upsample reads, per axis, output 2k as
  0.75*x[k] + 0.25*x[k-1] and 2k+1 as 0.75*x[k] + 0.25*x[k+1], the neighbour
  clamped at the borders (torch clamps negative source coordinates to 0).
  `jax.image.resize` computes the same weights: at a border it drops the
  out-of-range tap and renormalises, which also gives x[0] (max difference to
  a direct stencil 5e-7). It is used because it is the fastest form on XLA:CPU:
  written as shifted adds, the upsample's transpose feeding the previous
  InstanceNorm's gradient ran 8x slower (2.8 s vs 0.35 s fwd+bwd at
  [2, 32^3, 48], /tmp profiling, BENCHMARKS.md).
  """
  b, d, h, w, c = x.shape
  return jax.image.resize(x, (b, 2 * d, 2 * h, 2 * w, c), "trilinear")


def conv3d(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  """Cross-correlation of NDHWC `x` with a DHWIO kernel, padding k // 2 (torch `Conv3d`).

  Args:
    x: (B, D, H, W, C_in).
    kernel: (k, k, k, C_in, C_out).
    stride: stride on every spatial axis.

  Returns:
    (B, D', H', W', C_out).
  """
  k = kernel.shape[0]
  if k == stride:
    # Non-overlapping patches (patch embedding, 1x1x1): a reshape and a matmul.
    b, d, h, w, c = x.shape
    if d % k or h % k or w % k:
      raise ValueError(f"conv3d kernel=stride={k} needs spatial dims divisible by {k}, got {x.shape}")
    x = x.reshape(b, d // k, k, h // k, k, w // k, k, c)
    return jnp.einsum("bxiyjzkc,ijkco->bxyzo", x, kernel)
  pad = k // 2
  if stride == 1 and k > 1 and jax.default_backend() == "cpu":
    if x.size * k ** 3 <= _IM2COL_MAX_ELEMENTS:
      return _conv3d_as_matmul(x, kernel)
    return _conv3d_slicewise(x, kernel)
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride,) * 3, padding=[(pad, pad)] * 3,
      dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


# Largest im2col patch tensor (elements) for which a CPU conv runs as a matmul.
_IM2COL_MAX_ELEMENTS = 2 ** 24


def _conv3d_as_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 'same' conv3d as im2col + one matmul, for small feature maps.

  On XLA:CPU the conv's weight gradient at a small spatial size and many
  channels (the SSL decoder's 768 -> 384 conv at 2^3) ran as a slow
  convolution (~0.5 s); the patch matrix here is at most 64 MB and its
  forward and both gradients are plain matmuls.
  """
  k, _, _, c_in, c_out = kernel.shape
  pad = k // 2
  b, d, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (pad, pad), (0, 0)))
  patches = jnp.concatenate(
      [xp[:, i:i + d, j:j + h, l:l + w, :]
       for i in range(k) for j in range(k) for l in range(k)], axis=-1)
  return jnp.dot(patches, kernel.reshape(k ** 3 * c_in, c_out))


def _conv3d_as_conv2d(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 'same' conv3d as one conv2d over slices plus a shifted sum.

  XLA's CPU backend runs 3D convolutions several times slower than 2D ones
  (measured here: a 3x3x3 conv on [4, 64^3, 24] took 18.2 s as conv3d and
  2.8 s as slice-wise conv2d; torch/oneDNN 2.9 s). So every slice along the
  first spatial axis is convolved over the other two axes with all k kernel
  planes at once (k * C_out output channels), and plane i of slice d + i - p
  is summed into output slice d. Same arithmetic, different loop order.
  GPUs keep the native conv3d (cuDNN is fast there).
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

  XLA:CPU computes the slice-wise conv2d's kernel gradient as a convolution
  with a huge contraction (1.35 s for [2, 48^3, 48] -> 48, the SSL decoder's
  last conv at 96^3); as 27 dots of a shifted input slice with the output
  gradient it takes 0.54 s. The input gradient stays XLA's transposed conv.
  """
  return _conv3d_as_conv2d(x, kernel)


def _conv3d_slicewise_fwd(x, kernel):
  return _conv3d_as_conv2d(x, kernel), (x, kernel)


def _conv3d_slicewise_bwd(res, g):
  x, kernel = res
  _, input_vjp = jax.vjp(lambda x_: _conv3d_as_conv2d(x_, kernel), x)
  k, _, _, c_in, c_out = kernel.shape
  pad = k // 2
  _, d, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (pad, pad), (0, 0)))
  g_rows = g.reshape(-1, c_out)
  d_kernel = jnp.stack([
      jnp.dot(xp[:, i:i + d, j:j + h, l:l + w, :].reshape(-1, c_in).T, g_rows,
              preferred_element_type=jnp.float32)
      for i in range(k) for j in range(k) for l in range(k)])
  return input_vjp(g)[0], d_kernel.reshape(kernel.shape).astype(kernel.dtype)


_conv3d_slicewise.defvjp(_conv3d_slicewise_fwd, _conv3d_slicewise_bwd)


class Conv3d(nn.Module):
  """3D convolution on NDHWC with 'same' padding (k // 2), like torch `Conv3d`.

  The kernel is stored DHWIO (param name `kernel`), the bias as `bias`.
  Kernel == stride (patch embedding) and 1x1x1 kernels run as a matmul.
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, s = self.kernel_size, self.stride
    in_features = x.shape[-1]
    kernel = self.param("kernel", torch_conv_init, (k, k, k, in_features, self.features),
                        self.param_dtype)
    y = conv3d(x.astype(self.dtype), kernel.astype(self.dtype), s)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class ConvTranspose3d(nn.Module):
  """Transposed 3D conv with kernel == stride (MONAI's 2x2x2 up-sampling).

  Every input voxel writes its own k^3 output block, so it is one matmul plus
  a reshape. Kernel stored (k, k, k, C_in, C_out); torch stores (C_in, C_out,
  k, k, k). No bias (MONAI `conv_only=True` with `bias=False`).
  """
  features: int
  kernel_size: int = 2
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    b, d, h, w, c = x.shape
    kernel = self.param("kernel", torch_conv_init, (k, k, k, c, self.features), self.param_dtype)
    y = jnp.einsum("bxyzc,ijkco->bxiyjzko", x.astype(self.dtype), kernel.astype(self.dtype))
    return y.reshape(b, d * k, h * k, w * k, self.features)


class DropPath(nn.Module):
  """Stochastic depth per sample (MONAI `DropPath`, scale_by_keep=True). Rng "dropout"."""
  rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class UnetResBlock(nn.Module):
  """MONAI `UnetResBlock` (kernel 3, stride 1, InstanceNorm, LeakyReLU 0.01).

  conv1 -> norm -> lrelu -> conv2 -> norm, plus a 1x1x1 conv3 + norm on the
  residual when channels change, then lrelu. Convs have no bias (MONAI).
  """
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda k, name: Conv3d(self.features, k, use_bias=False, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name=name)
    y = leaky_relu(instance_norm(conv(3, "conv1")(x)))
    y = instance_norm(conv(3, "conv2")(y))
    residual = x
    if x.shape[-1] != self.features:
      residual = instance_norm(conv(1, "conv3")(x))
    return leaky_relu(y + residual)


def _maybe_remat(module_cls, remat: bool):
  return nn.remat(module_cls) if remat else module_cls


class UnetrBasicBlock(nn.Module):
  """MONAI `UnetrBasicBlock(res_block=True)`: a `UnetResBlock` named `layer`."""
  features: int
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    block = _maybe_remat(UnetResBlock, self.remat)
    return block(self.features, self.dtype, self.param_dtype, name="layer")(x)


class UnetrUpBlock(nn.Module):
  """MONAI `UnetrUpBlock(res_block=True)`: 2x2x2 transposed conv, concat skip, res block."""
  features: int
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
    up = ConvTranspose3d(self.features, 2, self.dtype, self.param_dtype, name="transp_conv")(x)
    y = jnp.concatenate([up, skip.astype(up.dtype)], axis=-1)
    block = _maybe_remat(UnetResBlock, self.remat)
    return block(self.features, self.dtype, self.param_dtype, name="conv_block")(y)


class UnetOutBlock(nn.Module):
  """MONAI `UnetOutBlock`: 1x1x1 conv with bias, stored as `conv`."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return Conv3d(self.features, 1, use_bias=True, dtype=self.dtype,
                  param_dtype=self.param_dtype, name="conv")(x)


def as_tuple3(v: int | Sequence[int]) -> tuple[int, int, int]:
  """An int or a 3-sequence as a 3-tuple of ints."""
  if isinstance(v, int):
    return (v, v, v)
  t = tuple(int(i) for i in v)
  if len(t) != 3:
    raise ValueError(f"expected an int or 3 ints, got {v!r}")
  return t
