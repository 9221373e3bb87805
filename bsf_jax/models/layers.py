"""Building blocks shared by the Swin encoder, SwinUNETR and the SSL head.

Everything here mirrors a MONAI/PyTorch layer numerically (channels-last
NDHWC instead of NCDHW): `Conv3d` (torch `nn.Conv3d`, kernel stored DHWIO),
`ConvTranspose3d` for kernel == stride (torch `nn.ConvTranspose3d`), the
parameter-free `instance_norm` (torch `InstanceNorm3d(affine=False)`),
`layer_norm` (PyTorch eps 1e-5), `DropPath` (MONAI `DropPath`), trilinear x2
upsampling (torch `F.interpolate(..., align_corners=False)`), and the UNETR
blocks `UnetResBlock`, `UnetrUpBlock`, `UnetOutBlock`.
"""

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bsf_jax.models import cpu_kernels
from bsf_jax.models.swin_config import SwinConfig, accumulation_dtype, remat_module

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


def layer_norm(x: jax.Array, eps: float = TORCH_NORM_EPS) -> jax.Array:
  """Parameter-free LayerNorm over the last axis (torch `F.layer_norm(x, [C])`)."""
  xa = x.astype(accumulation_dtype(x.dtype))
  mean = jnp.mean(xa, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xa - mean), axis=-1, keepdims=True)
  return ((xa - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def instance_norm(x: jax.Array, eps: float = TORCH_NORM_EPS) -> jax.Array:
  """InstanceNorm without affine parameters over the spatial axes of NDHWC.

  Matches `torch.nn.InstanceNorm3d(C)` (affine=False, biased variance), which
  is what MONAI's `norm_name="instance"` and the BSF SSL head use.
  """
  xa = x.astype(accumulation_dtype(x.dtype))
  axes = tuple(range(1, x.ndim - 1))
  mean = jnp.mean(xa, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(xa - mean), axis=axes, keepdims=True)
  return ((xa - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def leaky_relu(x: jax.Array) -> jax.Array:
  return nn.leaky_relu(x, negative_slope=LEAKY_SLOPE)


def upsample_trilinear_x2(x: jax.Array) -> jax.Array:
  """x2 trilinear upsampling of NDHWC, torch's `align_corners=False`.

  With half-pixel centres a x2 upsample reads, per axis, output 2k as
  0.75*x[k] + 0.25*x[k-1] and 2k+1 as 0.75*x[k] + 0.25*x[k+1], the neighbour
  clamped at the borders (torch clamps negative source coordinates to 0).
  `jax.image.resize` computes the same weights: at a border it drops the
  out-of-range tap and renormalises, which also gives x[0] (max difference to
  a direct stencil 5e-7). It is the fastest form measured on XLA:CPU
  (docs/models.md).
  """
  b, d, h, w, c = x.shape
  return jax.image.resize(x, (b, 2 * d, 2 * h, 2 * w, c), "trilinear")


def conv3d(x: jax.Array, kernel: jax.Array, stride: int = 1, *, impl: str) -> jax.Array:
  """Cross-correlation of NDHWC `x` with a DHWIO kernel, padding k // 2 (torch `Conv3d`).

  Kernel == stride (patch embedding, 1x1x1) is a reshape and a matmul on every
  path. Other stride-1 convs are `lax.conv_general_dilated` for impl="xla"
  and `cpu_kernels.conv3d_same` for impl="cpu".

  Args:
    x: (B, D, H, W, C_in).
    kernel: (k, k, k, C_in, C_out).
    stride: stride on every spatial axis.
    impl: "xla" or "cpu" (`SwinConfig.impl`).

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
  if stride == 1 and k > 1 and impl == "cpu":
    return cpu_kernels.conv3d_same(x, kernel)
  pad = k // 2
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride,) * 3, padding=[(pad, pad)] * 3,
      dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """y + bias (broadcast over all but the last axis), in y's dtype.

  The bias gradient is a sum over every voxel of the batch; autodiff would sum
  in y's dtype, which in bfloat16 loses most of it, so it is summed in float32
  (float64 for a float64 model).
  """
  return y + bias.astype(y.dtype)


def _add_bias_fwd(y, bias):
  return add_bias(y, bias), bias


def _add_bias_bwd(bias, g):
  axes = tuple(range(g.ndim - 1))
  return g, jnp.sum(g, axis=axes, dtype=accumulation_dtype(g.dtype)).astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class Dense(nn.Module):
  """`flax.linen.Dense` with the same params (`kernel` [in, out], `bias`),
  whose bias gradient is summed in float32 (`add_bias`).

  The bias gradient sums over every token of every window; `nn.Dense` would
  sum it in the compute dtype. `config` gives the compute/param dtypes.
  """
  features: int
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  config: SwinConfig = SwinConfig()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                        cfg.param_dtype)
    y = jax.lax.dot_general(x.astype(cfg.dtype), kernel.astype(cfg.dtype),
                            (((x.ndim - 1,), (0,)), ((), ())))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros_init(), (self.features,),
                        cfg.param_dtype)
      y = add_bias(y, bias)
    return y


class Conv3d(nn.Module):
  """3D convolution on NDHWC with 'same' padding (k // 2), like torch `Conv3d`.

  The kernel is stored DHWIO (param name `kernel`), the bias as `bias`.
  `config` gives the compute/param dtypes and the kernel `impl`.
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  use_bias: bool = True
  config: SwinConfig = SwinConfig()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, s, cfg = self.kernel_size, self.stride, self.config
    in_features = x.shape[-1]
    kernel = self.param("kernel", torch_conv_init, (k, k, k, in_features, self.features),
                        cfg.param_dtype)
    y = conv3d(x.astype(cfg.dtype), kernel.astype(cfg.dtype), s, impl=cfg.impl)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), cfg.param_dtype)
      y = add_bias(y, bias)
    return y


class ConvTranspose3d(nn.Module):
  """Transposed 3D conv with kernel == stride (MONAI's 2x2x2 up-sampling).

  Every input voxel writes its own k^3 output block, so it is one matmul plus
  a reshape on every path (never `lax.conv_transpose`, whose 3D gradient is
  slow on GPUs). Kernel stored (k, k, k, C_in, C_out); torch stores (C_in,
  C_out, k, k, k). No bias (MONAI `conv_only=True` with `bias=False`).
  """
  features: int
  kernel_size: int = 2
  config: SwinConfig = SwinConfig()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, cfg = self.kernel_size, self.config
    b, d, h, w, c = x.shape
    kernel = self.param("kernel", torch_conv_init, (k, k, k, c, self.features), cfg.param_dtype)
    y = jnp.einsum("bxyzc,ijkco->bxiyjzko", x.astype(cfg.dtype), kernel.astype(cfg.dtype))
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
  config: SwinConfig = SwinConfig()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda k, name: Conv3d(self.features, k, use_bias=False, config=self.config, name=name)
    y = leaky_relu(instance_norm(conv(3, "conv1")(x)))
    y = instance_norm(conv(3, "conv2")(y))
    residual = x
    if x.shape[-1] != self.features:
      residual = instance_norm(conv(1, "conv3")(x))
    return leaky_relu(y + residual)


class UnetrBasicBlock(nn.Module):
  """MONAI `UnetrBasicBlock(res_block=True)`: a `UnetResBlock` named `layer`."""
  features: int
  config: SwinConfig = SwinConfig()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    block = remat_module(UnetResBlock, self.config.remat)
    return block(self.features, config=self.config, name="layer")(x)


class UnetrUpBlock(nn.Module):
  """MONAI `UnetrUpBlock(res_block=True)`: 2x2x2 transposed conv, concat skip, res block."""
  features: int
  config: SwinConfig = SwinConfig()

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
    up = ConvTranspose3d(self.features, 2, config=self.config, name="transp_conv")(x)
    y = jnp.concatenate([up, skip.astype(up.dtype)], axis=-1)
    block = remat_module(UnetResBlock, self.config.remat)
    return block(self.features, config=self.config, name="conv_block")(y)


class UnetOutBlock(nn.Module):
  """MONAI `UnetOutBlock`: 1x1x1 conv with bias, stored as `conv`."""
  features: int
  config: SwinConfig = SwinConfig()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return Conv3d(self.features, 1, use_bias=True, config=self.config, name="conv")(x)


def as_tuple3(v: int | Sequence[int]) -> tuple[int, int, int]:
  """An int or a 3-sequence as a 3-tuple of ints."""
  if isinstance(v, int):
    return (v, v, v)
  t = tuple(int(i) for i in v)
  if len(t) != 3:
    raise ValueError(f"expected an int or 3 ints, got {v!r}")
  return t
