"""The window-attention core of the Swin blocks: softmax(q k^T + bias + mask) v.

MONAI's `WindowAttention` (monai/networks/nets/swin_unetr.py) adds a learned
relative-position bias and, in shifted blocks, -100 between tokens of
different regions, then takes a softmax. Three kernels compute it
(`SwinConfig.attention`):

- "einsum": plain einsums with a hand-written VJP (`einsum_attention`). On
  `impl="cpu"` its forward runs by window chunks (`cpu_kernels`).
- "xla_dpa": `jax.nn.dot_product_attention(implementation="xla")`, with the
  relative-position bias as `bias` and the shift regions as a boolean `mask`.
- "cudnn": the same call with `implementation="cudnn"` (NVIDIA GPUs, bf16 or
  fp16 only). cuDNN's fused kernels want a token count that is a multiple of
  64, and a 7^3 window has 343, so the windows are zero-padded to 384 tokens
  and the padded keys are masked with `key_value_seq_lengths`; the padded
  query rows are dropped.

In every kernel q k^T accumulates in float32 (`preferred_element_type`) and the
softmax runs in float32, whatever the compute dtype (float64 in a float64
model: `swin_config.accumulation_dtype`). A boolean mask gives the
same probabilities as MONAI's -100: exp(-100) ~ 4e-44 of a key's weight is
below float32's resolution next to the unmasked keys (every token shares a
region with itself).
"""

import functools

import jax
import jax.numpy as jnp

from bsf_jax.models import cpu_kernels
from bsf_jax.models.swin_config import accumulation_dtype

# cuDNN's fused attention kernels take token counts that are multiples of this.
CUDNN_TOKEN_MULTIPLE = 64


def attention_probs(q, k, bias, mask):
  """softmax(q k^T + bias + mask) in float32, cast to q's dtype: (bw, heads, n, n).

  q: (bw, n, heads, d), already scaled; bias: (heads, n, n) float32;
  mask: (nW, n, n) additive float32, repeating every nW windows, or None.
  """
  bw, n, heads, _ = q.shape
  logits = jnp.einsum("bnhd,bmhd->bhnm", q, k,
                      preferred_element_type=accumulation_dtype(q.dtype)) + bias
  if mask is not None:
    nw = mask.shape[0]
    logits = logits.reshape(bw // nw, nw, heads, n, n) + mask[None, :, None]
    logits = logits.reshape(bw, heads, n, n)
  return jax.nn.softmax(logits, axis=-1).astype(q.dtype)


def probs_times(probs, x):
  """(b, heads, n, m) probabilities (or their gradient) @ (b, m, heads, d) -> (b, n, heads, d).

  Written heads-major then transposed, the layout XLA:CPU's dot writes fastest.
  """
  return jnp.einsum("bhnm,bmhd->bhnd", probs, x).transpose(0, 2, 1, 3)


def sum_over_windows(g: jax.Array) -> jax.Array:
  """(bw, heads, n, n) -> (heads, n, n) float32 sum over windows, as a matmul with ones.

  The relative-position bias gradient; XLA:CPU runs a reduction over a
  non-minor axis far slower than this dot.
  """
  trailing = g.shape[1:]
  rows = g.reshape(g.shape[0], -1)
  ones = jnp.ones((rows.shape[0],), rows.dtype)
  return jnp.dot(ones, rows, preferred_element_type=accumulation_dtype(rows.dtype)).reshape(trailing)


def _with_probs(q, k, v, bias, mask):
  probs = attention_probs(q, k, bias, mask)
  return probs_times(probs, v), probs


def _forward(q, k, v, bias, mask, impl, keep_probs):
  if impl == "cpu":
    block = functools.partial(_with_probs, bias=bias)
    return cpu_kernels.scan_window_chunks(
        lambda qc, kc, vc, mc: block(qc, kc, vc, mask=mc), q, k, v, mask, keep_probs)
  out, probs = _with_probs(q, k, v, bias, mask)
  return (out, probs) if keep_probs else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def einsum_attention(q, k, v, bias, mask, impl):
  """softmax(q k^T + bias + mask) v with a hand-written VJP: (bw, n, heads, d).

  The backward uses the flash-attention identity rowsum(dP * P) = rowsum(dO * O),
  a reduction over head_dim instead of over the n keys, and sums the bias
  gradient over windows as a matmul (`sum_over_windows`).

  Args:
    q, k, v: (bw, n, heads, d); q already scaled.
    bias: (heads, n, n) float32 relative-position bias.
    mask: (nW, n, n) additive float32 shift mask, or None.
    impl: "cpu" runs the forward by window chunks, "xla" on the whole array.
  """
  return _forward(q, k, v, bias, mask, impl, keep_probs=False)


def _einsum_attention_fwd(q, k, v, bias, mask, impl):
  out, probs = _forward(q, k, v, bias, mask, impl, keep_probs=True)
  return out, (q, k, v, probs, out, mask)


def _einsum_attention_bwd(impl, res, d_out):
  del impl  # The backward is whole-array einsums on every path.
  q, k, v, probs, out, mask = res
  d_v = jnp.einsum("bhnm,bnhd->bmhd", probs, d_out)
  acc = accumulation_dtype(q.dtype)
  d_probs = jnp.einsum("bnhd,bmhd->bhnm", d_out, v, preferred_element_type=acc)
  # An elementwise product and a minor-axis sum (as an einsum, XLA:CPU makes
  # it a batched dot with a head_dim-long contraction, which is slower).
  row = jnp.sum(d_out.astype(acc) * out.astype(acc), axis=-1)
  row = row.transpose(0, 2, 1)  # (bw, heads, n)
  d_logits = probs.astype(acc) * (d_probs - row[..., None])
  d_bias = sum_over_windows(d_logits)
  d_logits = d_logits.astype(q.dtype)
  d_q = probs_times(d_logits, k)
  d_k = jnp.einsum("bhnm,bnhd->bmhd", d_logits, q)
  d_mask = None if mask is None else jnp.zeros_like(mask)
  return d_q, d_k, d_v, d_bias, d_mask


einsum_attention.defvjp(_einsum_attention_fwd, _einsum_attention_bwd)


def region_mask(mask: jax.Array, windows: int) -> jax.Array:
  """The additive (nW, n, n) shift mask as a boolean (windows, 1, n, n) 'may attend'."""
  nw, n, _ = mask.shape
  allowed = mask == 0
  return jnp.broadcast_to(allowed[None], (windows // nw, nw, n, n)).reshape(windows, 1, n, n)


def dot_product_attention(q, k, v, bias, mask, *, implementation: str,
                          token_multiple: int = 1):
  """Window attention through `jax.nn.dot_product_attention`: (bw, n, heads, d).

  Args:
    q, k, v: (bw, n, heads, d); q already scaled.
    bias: (heads, n, n) float32 relative-position bias.
    mask: (nW, n, n) additive shift mask, or None.
    implementation: "xla" or "cudnn" (`jax.nn.dot_product_attention`).
    token_multiple: windows are zero-padded to a multiple of this many tokens
      and the padded keys masked by sequence length (cuDNN: 64).
  """
  bw, n, heads, _ = q.shape
  padded = -(-n // token_multiple) * token_multiple
  boolean_mask = None if mask is None else region_mask(mask, bw)
  # cuDNN takes the bias in the compute dtype; the XLA implementation adds a
  # float32 bias to its float32 logits.
  bias = bias[None].astype(q.dtype if implementation == "cudnn" else accumulation_dtype(q.dtype))
  lengths = None
  if padded != n:
    pad = padded - n
    pad_tokens = lambda t: jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q, k, v = pad_tokens(q), pad_tokens(k), pad_tokens(v)
    bias = jnp.pad(bias, ((0, 0), (0, 0), (0, pad), (0, pad)))
    if boolean_mask is not None:
      boolean_mask = jnp.pad(boolean_mask, ((0, 0), (0, 0), (0, pad), (0, pad)))
    lengths = jnp.full((bw,), n, jnp.int32)
  out = jax.nn.dot_product_attention(
      q, k, v, bias=bias, mask=boolean_mask, scale=1.0,
      query_seq_lengths=lengths, key_value_seq_lengths=lengths,
      implementation=implementation)
  return out[:, :n]


def window_attention(q, k, v, bias, mask, *, impl: str, kernel: str):
  """softmax(q k^T + bias + mask) v by the kernel `kernel` (module docstring)."""
  if kernel == "einsum":
    return einsum_attention(q, k, v, bias, mask, impl)
  if kernel == "xla_dpa":
    return dot_product_attention(q, k, v, bias, mask, implementation="xla")
  if kernel == "cudnn":
    return dot_product_attention(q, k, v, bias, mask, implementation="cudnn",
                                 token_multiple=CUDNN_TOKEN_MULTIPLE)
  raise ValueError(f"unknown attention kernel {kernel!r}")


def dropout_attention(q, k, v, bias, mask, dropout):
  """Attention with `dropout(probabilities)`: plain autodiff (training with attn_drop > 0)."""
  return probs_times(dropout(attention_probs(q, k, bias, mask)), v)

