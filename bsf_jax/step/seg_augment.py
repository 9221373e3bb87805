"""Stage-3 fine-tuning augmentation on the device: flips, intensity scale+shift.

Per sample, a flip of each spatial axis with probability 0.5 and
x * (1 + U(-0.1, 0.1)) + U(-0.1, 0.1), one draw per sample for all channels:
the BrainSegFounder BraTS recipe, MONAI `RandFlipd(prob=0.5, spatial_axis=a)`
for a = 0, 1, 2, `RandScaleIntensityd(factors=0.1, prob=1)` and
`RandShiftIntensityd(offsets=0.1, prob=1)` (monai/transforms/intensity/
array.py), as `bsf_jax.data.transforms.rand_flip` and `rand_scale_shift` do on
the host. Channels-last batches [B, H, W, D, C]; sample i draws from its own
key, so results do not depend on how the batch is sharded.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class SegDraw(NamedTuple):
  """One sample's fine-tuning augmentation.

  Attributes:
    flip: [3] bool, flip spatial axis a (H, W, D) of the sample.
    scale: float32 scalar, the intensity factor 1 + U(-factor, factor).
    shift: float32 scalar, the intensity offset U(-offset, offset).
  """
  flip: Array
  scale: Array
  shift: Array


def draw_seg(key: Array, *, flip_prob: float = 0.5, factor: float = 0.1,
             offset: float = 0.1) -> SegDraw:
  """Draws one sample's flips, scale and shift from its own key."""
  k_flip, k_scale, k_shift = jax.random.split(key, 3)
  flip = jax.random.uniform(k_flip, (3,), jnp.float32) < flip_prob
  scale = 1.0 + jax.random.uniform(k_scale, (), jnp.float32, -factor, factor)
  shift = jax.random.uniform(k_shift, (), jnp.float32, -offset, offset)
  return SegDraw(flip, scale, shift)


def apply_seg(draw: SegDraw, image: Array,
              label: Array | None = None) -> tuple[Array, Array | None]:
  """Flips image [H, W, D, C] (and label [H, W, D, K]), then scales and
  shifts the image's intensities: (flip(x)) * scale + shift."""
  for axis in range(3):
    image = jnp.where(draw.flip[axis], jnp.flip(image, axis), image)
    if label is not None:
      label = jnp.where(draw.flip[axis], jnp.flip(label, axis), label)
  image = image * draw.scale.astype(image.dtype) + draw.shift.astype(image.dtype)
  return image, label


def seg_augment(keys: Array, image: Array, label: Array | None = None,
                **draw_kw) -> tuple[Array, Array | None]:
  """Fine-tuning augmentation of a batch, sample i drawn from keys[i].

  Args:
    keys: [B] PRNG keys, one per sample (`sharding.row_keys` keys them by
      the sample's index in the global batch).
    image: [B, H, W, D, C] crops.
    label: [B, H, W, D, K] label channels flipped with their image, or None.
    **draw_kw: flip_prob, factor, offset (`draw_seg`).

  Returns:
    (image, label) of the input shapes and dtypes.
  """
  if image.ndim != 5:
    raise ValueError(
        f"seg_augment: expected [B, H, W, D, C], got shape {image.shape}")
  draws = jax.vmap(lambda k: draw_seg(k, **draw_kw))(keys)
  if label is None:
    return jax.vmap(lambda d, x: apply_seg(d, x)[0])(draws, image), None
  return jax.vmap(apply_seg)(draws, image, label)
