"""Loss functions: the SSL objectives of BrainSegFounder and MONAI-style Dice.

All functions are pure and jittable. They accept bf16 (or any float) inputs and
compute in float32 internally, because softmax / log-sum-exp and large spatial
sums lose too much precision in bf16.

SSL objectives (the paper's Stage 1 pretraining), used by the pretraining step:

* `rotation_loss`: cross-entropy of the 4-way rotation logits.
* `contrastive_loss`: NT-Xent (SimCLR) over the 2B x 2B cosine-similarity
  matrix without its diagonal, averaged over the 2B rows.
* `reconstruction_loss`: mean absolute error.

Negatives for NT-Xent: the reference (`Contrast` in BrainSegFounder
`pretrain/losses/loss.py`) runs under DistributedDataParallel, so every GPU
builds its similarity matrix from its *own* mini-batch (2 x 2 samples per GPU
in stage 1): each anchor sees 2B_local - 2 negatives. The SSL step
(`ssl_step.py`) calls these losses on each device's own rows under
`shard_map`: with `negatives="device"` as the reference does; with
`negatives="global"` it first all-gathers the embeddings of every device
explicitly, so each anchor sees 2B_global - 2 negatives. With one device the
two are identical. See docs/ssl.md.

Segmentation losses, channels-last ([B, H, W, D, K]), following
`monai.losses.DiceLoss` / `DiceCELoss` (MONAI 1.6):

* `dice_loss`
* `dice_ce_loss`
"""

import jax
import jax.numpy as jnp

Array = jax.Array


def _f32(x: Array) -> Array:
  return jnp.asarray(x).astype(jnp.float32)


def rotation_loss(logits: Array, labels: Array) -> Array:
  """Mean softmax cross-entropy of rotation logits (torch CrossEntropyLoss).

  Args:
    logits: [N, R] rotation logits (R = 4 for 90-degree rotations).
    labels: [N] integer rotation classes in [0, R).

  Returns:
    Scalar float32 loss, averaged over N.
  """
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(
        f"rotation_loss expects logits [N, R] and labels [N]; got logits "
        f"{logits.shape} and labels {labels.shape}")
  logp = jax.nn.log_softmax(_f32(logits), axis=-1)
  picked = jnp.take_along_axis(logp, labels.astype(jnp.int32)[:, None], axis=-1)
  return -jnp.mean(picked)


def _l2_normalize(z: Array, eps: float = 1e-12) -> Array:
  # Same clamp as torch.nn.functional.normalize: x / max(||x||, eps).
  norm = jnp.sqrt(jnp.sum(z * z, axis=-1, keepdims=True))
  return z / jnp.maximum(norm, eps)


def contrastive_loss(z1: Array, z2: Array, temperature: float = 0.5, *,
                     mask: Array | None = None) -> Array:
  """NT-Xent loss between two views (reference `Contrast`).

  Row i of the 2B x 2B cosine-similarity matrix of [z1; z2] has its positive at
  column i + B (or i - B); the denominator sums exp(sim / T) over every column
  except the diagonal (so it includes the positive). The loss is
  sum_i -log(exp(pos_i / T) / sum_{j != i} exp(sim_ij / T)) / 2B.

  All 2B - 2 other samples of the batch passed in are negatives: one
  device's rows (the reference's per-GPU negatives) or the embeddings of
  every device gathered first (see module docstring and docs/ssl.md).

  Args:
    z1: [B, E] embeddings of view 1.
    z2: [B, E] embeddings of view 2 (row i is the positive of z1 row i).
    temperature: softmax temperature T.
    mask: optional [B] bool, False for padding samples: they are neither
      anchors nor negatives, and the mean runs over the 2 * sum(mask) valid
      anchors (0 if there are none).

  Returns:
    Scalar float32 loss.
  """
  if z1.ndim != 2 or z1.shape != z2.shape:
    raise ValueError(
        f"contrastive_loss expects z1, z2 of equal shape [B, E]; got "
        f"{z1.shape} and {z2.shape}")
  b = z1.shape[0]
  z = jnp.concatenate([_l2_normalize(_f32(z1)), _l2_normalize(_f32(z2))], 0)
  # HIGHEST precision: on GPU/TPU the default matmul precision would round the
  # similarities to bf16, which is visible at T = 0.5.
  sim = jnp.matmul(z, z.T, precision=jax.lax.Precision.HIGHEST) / temperature
  n = 2 * b
  rows = jnp.arange(n)
  allowed = rows[:, None] != rows[None, :]
  valid = jnp.ones((n,), bool)
  if mask is not None:
    if mask.shape != (b,):
      raise ValueError(f"contrastive_loss: mask shape {mask.shape} != ({b},)")
    valid = jnp.concatenate([mask, mask]).astype(bool)
    allowed &= valid[None, :]
  log_denom = jax.nn.logsumexp(jnp.where(allowed, sim, -jnp.inf), axis=1)
  pos = jnp.take_along_axis(sim, ((rows + b) % n)[:, None], axis=1)[:, 0]
  per_anchor = jnp.where(valid, log_denom - pos, 0.0)
  return jnp.sum(per_anchor) / jnp.maximum(jnp.sum(valid), 1)


def reconstruction_loss(pred: Array, target: Array) -> Array:
  """Mean absolute error (torch L1Loss), computed in float32.

  Args:
    pred: reconstruction, any shape.
    target: same shape as `pred`.

  Returns:
    Scalar float32 loss.
  """
  if pred.shape != target.shape:
    raise ValueError(
        f"reconstruction_loss: pred shape {pred.shape} != target shape "
        f"{target.shape}")
  return jnp.mean(jnp.abs(_f32(pred) - _f32(target)))


def _check_seg_shapes(name: str, logits: Array, target: Array) -> None:
  if logits.ndim < 3:
    raise ValueError(
        f"{name}: logits must be [B, *spatial, K]; got shape {logits.shape}")
  if target.shape != logits.shape:
    raise ValueError(
        f"{name}: target shape {target.shape} != logits shape {logits.shape} "
        f"(pass to_onehot_y=True for [B, *spatial, 1] integer labels)")


def _one_hot_target(logits: Array, target: Array, to_onehot_y: bool) -> Array:
  """Converts [B, ..., 1] labels to one-hot when asked (MONAI `to_onehot_y`)."""
  k = logits.shape[-1]
  if not to_onehot_y or k == 1:
    return target
  if target.shape[-1] != 1 or target.shape[:-1] != logits.shape[:-1]:
    raise ValueError(
        f"to_onehot_y needs target [B, *spatial, 1] matching logits "
        f"{logits.shape}; got {target.shape}")
  return jax.nn.one_hot(target[..., 0].astype(jnp.int32), k, dtype=jnp.float32)


def dice_loss(
    logits: Array,
    target: Array,
    *,
    sigmoid: bool = False,
    softmax: bool = False,
    squared_pred: bool = False,
    include_background: bool = True,
    to_onehot_y: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = False,
) -> Array:
  """Soft Dice loss with `monai.losses.DiceLoss` semantics (mean reduction).

  f = 1 - (2 * sum(p * g) + smooth_nr) / (sum(p^o) + sum(g^o) + smooth_dr),
  o = 2 if `squared_pred` else 1, summed over spatial axes (and over the batch
  when `batch=True`), then averaged over the remaining (batch, channel) entries.
  As in MONAI, `softmax` and `include_background=False` are ignored for a
  single-channel prediction.

  Args:
    logits: [B, *spatial, K] raw network outputs (or probabilities if neither
      `sigmoid` nor `softmax`).
    target: [B, *spatial, K] (one-hot / multi-label) or, with `to_onehot_y`,
      [B, *spatial, 1] integer labels.
    sigmoid: apply a sigmoid to `logits` first.
    softmax: apply a softmax over channels first.
    squared_pred: square predictions and targets in the denominator.
    include_background: if False, drop channel 0 (when K > 1).
    to_onehot_y: one-hot encode an integer label target.
    smooth_nr: added to the numerator.
    smooth_dr: added to the denominator.
    batch: sum over the batch before dividing (one Dice per channel).

  Returns:
    Scalar float32 loss.
  """
  if sigmoid and softmax:
    raise ValueError("dice_loss: sigmoid and softmax are mutually exclusive")
  target = _one_hot_target(logits, target, to_onehot_y)
  _check_seg_shapes("dice_loss", logits, target)
  p = _f32(logits)
  g = _f32(target)
  k = p.shape[-1]
  if sigmoid:
    p = jax.nn.sigmoid(p)
  if softmax and k > 1:
    p = jax.nn.softmax(p, axis=-1)
  if not include_background and k > 1:
    p, g = p[..., 1:], g[..., 1:]
  axes = tuple(range(1, p.ndim - 1))
  if batch:
    axes = (0,) + axes
  intersection = jnp.sum(p * g, axis=axes)
  if squared_pred:
    denom = jnp.sum(p * p, axis=axes) + jnp.sum(g * g, axis=axes)
  else:
    denom = jnp.sum(p, axis=axes) + jnp.sum(g, axis=axes)
  f = 1.0 - (2.0 * intersection + smooth_nr) / (denom + smooth_dr)
  return jnp.mean(f)


def dice_ce_loss(
    logits: Array,
    target: Array,
    *,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
    **dice_kw,
) -> Array:
  """Dice + cross-entropy with `monai.losses.DiceCELoss` semantics.

  The cross-entropy term always sees the raw `logits`, whatever `sigmoid` /
  `softmax` say, and follows MONAI's rule:
  * K == 1: binary cross-entropy with logits, averaged over all voxels;
  * K > 1 and a [B, ..., 1] label target: softmax CE with integer labels;
  * K > 1 and a [B, ..., K] target: softmax CE with the target used as class
    probabilities (torch CrossEntropyLoss with soft targets). Note this is what
    MONAI does even with `sigmoid=True` on multi-label (BraTS TC/WT/ET)
    channels; it is reproduced, not corrected.

  Args:
    logits: [B, *spatial, K] raw network outputs.
    target: [B, *spatial, K] or [B, *spatial, 1].
    lambda_dice: weight of the Dice term.
    lambda_ce: weight of the cross-entropy term.
    **dice_kw: the keywords of `dice_loss` (sigmoid, softmax, squared_pred,
      include_background, to_onehot_y, smooth_nr, smooth_dr, batch), for the
      Dice term only.

  Returns:
    Scalar float32 loss.
  """
  k = logits.shape[-1]
  if target.ndim != logits.ndim or target.shape[-1] not in (1, k):
    raise ValueError(
        f"dice_ce_loss: target must be [B, *spatial, 1] or [B, *spatial, {k}] "
        f"for logits {logits.shape}; got {target.shape}")
  if target.shape[-1] == 1 and k > 1 and not dice_kw.get("to_onehot_y"):
    # MONAI's Dice term would fail on this shape too; say so clearly.
    raise ValueError(
        f"dice_ce_loss: label target {target.shape} with {k} channels needs "
        "to_onehot_y=True")
  dice = dice_loss(logits, target, **dice_kw)
  x = _f32(logits)
  if k == 1:
    t = _f32(target)
    # Stable BCE-with-logits: max(x, 0) - x t + log(1 + exp(-|x|)).
    ce = jnp.mean(jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x))))
  else:
    logp = jax.nn.log_softmax(x, axis=-1)
    if target.shape[-1] == 1:
      labels = target[..., 0].astype(jnp.int32)
      ce = -jnp.mean(jnp.take_along_axis(logp, labels[..., None], -1))
    else:
      ce = -jnp.mean(jnp.sum(_f32(target) * logp, axis=-1))
  return lambda_dice * dice + lambda_ce * ce
