"""The Swin encoder's settings, shared by `SwinTransformer`, `SwinUNETR` and `SSLHead`.

`SwinConfig` holds MONAI's `SwinTransformer` keyword names (feature_size,
depths, num_heads, window_size, ...) plus three execution choices that do not
change the numbers a model computes, only how:

- `impl`: which kernels run. "xla" is the portable path (native
  `lax.conv_general_dilated` 3D convolutions, whole-array window attention) that
  accelerators take; "cpu" swaps in the kernels of `bsf_jax.models.cpu_kernels`
  (im2col / slice-wise convolutions, window attention by chunks) that run
  faster on XLA:CPU. "auto" is resolved once, by `resolve_impl`, from the
  platform of the devices a run uses. The table is in docs/models.md.
- `attention`: the window-attention kernel (`bsf_jax.models.attention`).
- `remat`: what the backward pass recomputes (`remat_module`).

Compute `dtype` and `param_dtype` live here too, so every module of the
encoder and its decoders reads one frozen value.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bsf_jax.models import variants

IMPLS = ("auto", "xla", "cpu")
ATTENTION_KERNELS = ("einsum", "xla_dpa", "cudnn")
# "none", "block" (recompute each block from its input), or the name of a
# `jax.checkpoint_policies` policy that says which intermediates are saved.
REMAT_POLICIES = ("dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable", "nothing_saveable")
REMAT_CHOICES = ("none", "block") + REMAT_POLICIES

# The order in which a patch merging concatenates the 8 voxels of each 2x2x2
# block, as (d, h, w) offsets (monai/networks/nets/swin_unetr.py,
# `PatchMerging.forward`, x0..x7). MONAI 0.9 to 1.4 took (0, 1, 0) and (0, 0, 1)
# twice and never (1, 1, 0) or (0, 1, 1); it was kept for weight compatibility
# (https://github.com/Project-MONAI/MONAI/pull/5106, declined) and fixed in
# MONAI 1.5.0 (https://github.com/Project-MONAI/MONAI/pull/8285; compare
# swin_unetr.py at MONAI's tags 1.4.0 and 1.5.0).
# Weights trained before then, BrainSegFounder's released checkpoints and
# MONAI's `model_swinvit.pt` among them, expect "duplicated_neighbours".
PATCH_MERGING_ORDERS = {
    "all_neighbours": ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1),
                       (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)),
    "duplicated_neighbours": ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1),
                              (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1)),
}
# The MONAI releases whose `SwinUNETR` computes each order.
MONAI_VERSIONS = {"all_neighbours": "MONAI >= 1.5.0",
                  "duplicated_neighbours": "MONAI 0.9 to 1.4.x"}


def accumulation_dtype(dtype: Any) -> jnp.dtype:
  """What norms, softmax and matmul sums run in for compute `dtype`.

  float32 for bfloat16/float16/float32 compute; float64 compute stays
  float64, so a float64 model is a float64 computation end to end.
  """
  return jnp.promote_types(jnp.dtype(dtype), jnp.float32)


def resolve_impl(impl: str, devices: Sequence[jax.Device] | None = None) -> str:
  """"auto" -> "cpu" when the run's devices are CPUs, else "xla".

  Args:
    impl: "auto", "xla" or "cpu".
    devices: the devices the run computes on (a mesh's `devices.flat`);
      None means `jax.devices()`, the devices a run without a mesh uses.

  Returns:
    "xla" or "cpu".
  """
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
  if impl != "auto":
    return impl
  devices = list(jax.devices() if devices is None else devices)
  platforms = sorted({d.platform for d in devices})
  if len(platforms) != 1:
    raise ValueError(f"impl='auto' needs devices of one platform, got {platforms}")
  return "cpu" if platforms[0] == "cpu" else "xla"


def remat_module(module_cls: type[nn.Module], remat: str, **kwargs: Any) -> type[nn.Module]:
  """`module_cls`, rematerialised as `remat` says ("none" returns it unchanged).

  kwargs go to `nn.remat` (e.g. static_argnums for a `deterministic` flag).
  """
  if remat == "none":
    return module_cls
  policy = None if remat == "block" else getattr(jax.checkpoint_policies, remat)
  return nn.remat(module_cls, policy=policy, **kwargs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SwinConfig:
  """MONAI `SwinTransformer` settings plus the execution choices (module docstring).

  Attributes:
    feature_size: embedding width of stage 1 (MONAI `embed_dim`); stage i has
      feature_size * 2**i channels.
    depths: Swin blocks per stage (4 stages).
    num_heads: attention heads per stage.
    window_size: attention window (int or 3 ints).
    patch_size: patch-embedding kernel and stride.
    mlp_ratio, qkv_bias: as in MONAI.
    drop_rate, attn_drop_rate, dropout_path_rate: dropout, attention dropout
      and stochastic depth (rng "dropout", only when deterministic=False).
    normalize: parameter-free LayerNorm on each hidden state (MONAI `normalize`).
    impl: "xla" or "cpu" ("auto" must be resolved with `resolve_impl` first).
    attention: one of `ATTENTION_KERNELS`.
    remat: one of `REMAT_CHOICES`.
    patch_merging: a key of `PATCH_MERGING_ORDERS`, the neighbour order the
      weights were trained with.
    dtype: compute dtype; param_dtype: parameter dtype (float64 needs
      `jax_enable_x64`).
  """
  feature_size: int = 48
  depths: tuple[int, ...] = (2, 2, 2, 2)
  num_heads: tuple[int, ...] = variants.NUM_HEADS
  window_size: int | tuple[int, int, int] = 7
  patch_size: int = 2
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  dropout_path_rate: float = 0.0
  normalize: bool = True
  impl: str = "xla"
  attention: str = "einsum"
  remat: str = "none"
  patch_merging: str = "all_neighbours"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    # Frozen: fields are normalised through object.__setattr__ so that equal
    # settings compare (and hash, for jit's static arguments) equal.
    set_ = lambda k, v: object.__setattr__(self, k, v)
    set_("depths", tuple(int(d) for d in self.depths))
    set_("num_heads", tuple(int(h) for h in self.num_heads))
    if not isinstance(self.window_size, int):
      set_("window_size", tuple(int(w) for w in self.window_size))
    set_("dtype", jnp.dtype(self.dtype))
    set_("param_dtype", jnp.dtype(self.param_dtype))
    problem = self._problem()
    if problem:
      raise ValueError(problem)

  def _problem(self) -> str | None:
    """The first setting that cannot work, as "field=value: why", or None.

    Every check of the encoder's settings lives here; a run's config is
    checked by building its model (`config_lib.validate`), whose messages
    then name `config.model.<field>`.
    """
    if len(self.depths) != 4 or len(self.num_heads) != 4:
      return (f"num_heads={self.num_heads}: need one entry per stage of the 4-stage Swin "
              f"encoder, as depths={self.depths}")
    for i, heads in enumerate(self.num_heads):
      # Stage i works at width feature_size * 2**i, split evenly over its heads.
      width = self.feature_size * 2**i
      if heads <= 0 or width % heads:
        return (f"num_heads[{i}]={heads} does not divide stage {i}'s width "
                f"feature_size * 2**{i} = {width}")
    if self.impl not in ("xla", "cpu"):
      return (f"impl={self.impl!r}: expected 'xla' or 'cpu' (resolve 'auto' with "
              "swin_config.resolve_impl)")
    if self.attention not in ATTENTION_KERNELS:
      return f"attention={self.attention!r}: expected one of {list(ATTENTION_KERNELS)}"
    if self.attention == "cudnn" and self.dtype not in (jnp.bfloat16, jnp.float16):
      return (f"attention='cudnn' needs dtype='bfloat16' (or float16): cuDNN's fused "
              f"attention has no {self.dtype} kernel; use attention='xla_dpa' or 'einsum'")
    if self.remat not in REMAT_CHOICES:
      return f"remat={self.remat!r}: expected one of {list(REMAT_CHOICES)}"
    if self.patch_merging not in PATCH_MERGING_ORDERS:
      return (f"patch_merging={self.patch_merging!r}: expected one of "
              f"{list(PATCH_MERGING_ORDERS)}")
    if jnp.float64 in (self.dtype, self.param_dtype) and not jax.config.jax_enable_x64:
      return ("dtype=float64 needs 64-bit JAX: set JAX_ENABLE_X64=1 or "
              "jax.config.update('jax_enable_x64', True) before building the model")
    if self.dtype == jnp.float64 and self.attention != "einsum":
      return (f"attention={self.attention!r} computes its softmax in float32 "
              "(jax.nn.dot_product_attention); a float64 model needs attention='einsum'")
    return None


ENCODER_FIELDS = tuple(f.name for f in dataclasses.fields(SwinConfig))


def split_encoder_kwargs(kwargs: dict[str, Any], devices=None) -> tuple[SwinConfig, dict[str, Any]]:
  """MONAI-style keyword arguments -> (SwinConfig, the remaining kwargs).

  "auto" impl (the default) is resolved here, once, from `devices`.
  """
  encoder = {k: v for k, v in kwargs.items() if k in ENCODER_FIELDS}
  rest = {k: v for k, v in kwargs.items() if k not in ENCODER_FIELDS}
  encoder["impl"] = resolve_impl(encoder.get("impl", "auto"), devices)
  return SwinConfig(**encoder), rest


def constructor(module_cls: type[nn.Module], doc: str) -> Callable[..., nn.Module]:
  """A keyword-only constructor taking MONAI's names for `module_cls`.

  `SwinUNETR(in_channels=4, out_channels=3, feature_size=48, impl="xla")`
  builds `module_cls(in_channels=4, out_channels=3, config=SwinConfig(...))`.
  The optional `devices` keyword is what "auto" impl resolves against.
  """
  def build(*, devices: Sequence[jax.Device] | None = None, **kwargs: Any) -> nn.Module:
    encoder, rest = split_encoder_kwargs(kwargs, devices)
    return module_cls(config=encoder, **rest)
  build.__name__ = build.__qualname__ = module_cls.__name__.removesuffix("Net")
  build.__doc__ = doc
  build.module_class = module_cls
  return build


def with_compute_dtype(model: nn.Module, dtype: Any) -> nn.Module:
  """`model` (any module with a `SwinConfig` field `config`) computing in `dtype`."""
  return model.clone(config=dataclasses.replace(model.config, dtype=jnp.dtype(dtype)))
