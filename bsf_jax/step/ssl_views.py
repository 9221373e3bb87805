"""The two SSL views of stages 1-2, on the device: aug_rand(rot_rand(x)).

Jittable, keyed and vectorised re-implementations of the reference
`rot_rand` / `aug_rand` (BrainSegFounder `pretrain/utils/ops.py`, from MONAI's
SwinUNETR pretraining), for channels-last batches [B, H, W, D, C], and
`make_views`, the two-view recipe of the SSL step. The boxes and their noise
fill are `patch_drop.patch_rand_drop`'s.

Documented deviation in `aug_rand`: the reference swaps sequentially in place,
so sample i copies from x_aug[j], which is already augmented when j < i and
untouched when j > i. Here all noise drops happen first and every swap copies
from the noise-dropped partner, so all samples are treated alike. Swap
partners can be restricted to groups (`group_size`, e.g. the per-device batch,
as the reference draws partners on its own GPU); the group gather is then local
to a device.
"""

import jax
import jax.numpy as jnp

from bsf_jax.step import patch_drop

Array = jax.Array


def rot_rand(key: Array, x: Array,
             axes: tuple[int, int] = (1, 2)) -> tuple[Array, Array]:
  """Rotates each sample by k * 90 degrees, k ~ U{0, 1, 2, 3}.

  With the default axes (1, 2) of [B, H, W, D, C] this is the H-W plane and
  sample i equals `torch.rot90(v, k_i, (1, 2))` of its (C, H, W, D) layout v
  (the paper's Stage 1 pretraining). The released reference code rotates
  (C, H, W, D) dims (2, 3), the W-D plane: pass axes=(2, 3) to reproduce it.

  Args:
    key: PRNG key.
    x: [B, H, W, D, C]; the two rotated dims must have equal size.
    axes: the two axes of x spanning the rotation plane (1, 2 or 3).

  Returns:
    (x_rot, labels): x_rot of x's shape and dtype, labels [B] int32 = k.
  """
  patch_drop.check_batch("rot_rand", x)
  a, b = axes
  if sorted((a, b)) not in ([1, 2], [1, 3], [2, 3]):
    raise ValueError(f"rot_rand: axes must be two spatial axes of [B, H, W, "
                     f"D, C] (1, 2 or 3), got {axes}")
  if x.shape[a] != x.shape[b]:
    raise ValueError(
        f"rot_rand: 90-degree rotation in the plane of axes {axes} needs equal "
        f"sizes, got {x.shape[a]} and {x.shape[b]} (x shape {x.shape})")
  labels = jax.random.randint(key, (x.shape[0],), 0, 4, dtype=jnp.int32)
  k = labels.reshape((-1, 1, 1, 1, 1))
  out = x
  # Select among the four rotations: elementwise, so it stays local to the
  # device holding each sample under batch sharding.
  for quarter in (1, 2, 3):
    out = jnp.where(k == quarter, jnp.rot90(x, quarter, axes=(a, b)), out)
  return out, labels


def draw_partners(key: Array, bsz: int, group: int,
                  valid: Array | None = None) -> Array:
  """Swap partner of each sample: [B // group, group] indices within a group.

  Without `valid`, partner ~ U{0 .. group - 1} (the reference rule). With a
  [B] bool `valid` (False for padding), partners are drawn among the valid
  members of the group only: rank r ~ U{0 .. n_valid - 1}, partner = the r-th
  valid member. So padded samples are never swap sources, and a valid
  sample's partner depends only on the valid samples before it: neither the
  content nor the number of padded samples changes it (with valid samples
  first, as the eval pipeline pads, and the partitionable threefry PRNG,
  whose draws for index i do not depend on the batch size). With every
  sample valid this is exactly the unmasked draw.
  """
  shape = (bsz // group, group)
  if valid is None:
    return jax.random.randint(key, shape, 0, group)
  v = jnp.asarray(valid).astype(bool).reshape(shape)
  n_valid = jnp.sum(v, axis=1, keepdims=True)
  rank = jax.random.randint(key, shape, 0, jnp.maximum(n_valid, 1))
  order = jnp.cumsum(v, axis=1) - 1  # rank of each valid member
  hit = v[:, None, :] & (order[:, None, :] == rank[:, :, None])  # [G, g, g]
  return jnp.argmax(hit, axis=-1).astype(rank.dtype)


def aug_rand(key: Array, x: Array, *, group_size: int | None = None,
             max_drop: float = 0.3, max_block_sz: float = 0.25,
             tolr: float = 0.05, max_boxes: int | None = None,
             valid: Array | None = None) -> Array:
  """Reference `aug_rand`: a noise drop, then maybe a swap drop, per sample.

  Sample i draws a partner j uniformly from its group (possibly itself); if
  j != i, boxes of the noise-dropped partner are copied into it by a second
  drop (the reference skips the swap when j == i). See the module docstring
  for the one deviation (swap source). With k_noise, k_partner, k_swap =
  `jax.random.split(key, 3)`, the result equals
  `patch_drop.patch_rand_drop(k_swap, noised, partners)` where the swap
  applies, else `noised = patch_drop.patch_rand_drop(k_noise, x)`.

  Args:
    key: PRNG key.
    x: [B, H, W, D, C] volumes.
    group_size: partners are drawn within consecutive groups of this size
      (B must be divisible by it). None: the whole batch. Set it to the
      per-device batch to keep the swap device-local and match the reference,
      which draws partners among one GPU's samples.
    max_drop, max_block_sz, tolr, max_boxes: see
      `patch_drop.patch_rand_drop`.
    valid: optional [B] bool, False for padding samples (eval batches): they
      are never swap partners, see `draw_partners`. None: all valid.

  Returns:
    Array of x's shape and dtype.
  """
  patch_drop.check_batch("aug_rand", x)
  bsz = x.shape[0]
  group = bsz if group_size is None else int(group_size)
  if group < 1 or bsz % group:
    raise ValueError(f"aug_rand: batch {bsz} (x shape {x.shape}) is not "
                     f"divisible by group_size {group_size}")
  spatial, cfg = patch_drop.drop_config(x, max_drop, max_block_sz, tolr,
                                        max_boxes)
  k_noise, k_partner, k_swap = jax.random.split(key, 3)
  keys = jnp.stack([jax.random.split(k_noise, bsz),
                    jax.random.split(k_swap, bsz)])
  # Both drops' boxes in one vmapped computation (one copy in the program).
  idx, volume = jax.vmap(jax.vmap(
      lambda k: patch_drop.box_index(k, spatial, cfg)))(keys)
  noised = patch_drop.fill_boxes(keys[0], x, None, idx[0], volume[0])
  partner = draw_partners(k_partner, bsz, group, valid)
  grouped = noised.reshape((bsz // group, group) + x.shape[1:])
  source = jax.vmap(lambda g, j: g[j])(grouped, partner).reshape(x.shape)
  do_swap = (partner != jnp.arange(group)[None, :]).reshape((bsz, 1, 1, 1))
  idx_swap = jnp.where(do_swap, idx[1], -1)
  return patch_drop.fill_boxes(keys[1], noised, source, idx_swap, volume[1])


def make_views(key: Array, x: Array, *, group_size: int | None = None,
               rot_axes: tuple[int, int] = (1, 2), max_drop: float = 0.3,
               max_block_sz: float = 0.25, tolr: float = 0.05,
               max_boxes: int | None = None, valid: Array | None = None
               ) -> tuple[Array, Array, Array, Array]:
  """The two-view recipe: view_i = aug_rand(rot_rand(x)).

  Feed view1 and view2 through the SSL model; its rotation logits and
  reconstructions, concatenated view 1 then view 2, pair with rot_labels and
  rotated_targets in the losses (`ssl_step.make_loss_fn`).

  View v (0 or 1) uses k_v = `jax.random.split(key, 2)[v]`, split again into
  (rotation key, augmentation key): view v equals
  `aug_rand(k_aug, rot_rand(k_rot, x)[0])`. The two views run as one vmapped
  program, which halves compile time and keeps samples on their devices.

  Args:
    key: PRNG key (fold in the step).
    x: [B, H, W, D, C] input crops.
    group_size: swap-partner groups, see `aug_rand`.
    rot_axes: rotation plane, see `rot_rand`.
    max_drop, max_block_sz, tolr, max_boxes: see
      `patch_drop.patch_rand_drop`.
    valid: optional [B] bool marking real samples; padding (False) is never
      copied into a real sample's view, see `aug_rand`.

  Returns:
    (view1 [B, ...], view2 [B, ...], rot_labels [2B] int32,
    rotated_targets [2B, ...]): labels and targets are view-1 samples first,
    then view-2 samples; targets are the rotated, un-augmented volumes.
  """
  patch_drop.check_batch("make_views", x)
  kw = dict(group_size=group_size, max_drop=max_drop,
            max_block_sz=max_block_sz, tolr=tolr, max_boxes=max_boxes,
            valid=valid)

  def one_view(k):
    k_rot, k_aug = jax.random.split(k)
    rotated, labels = rot_rand(k_rot, x, rot_axes)
    return aug_rand(k_aug, rotated, **kw), labels, rotated

  views, labels, rotated = jax.vmap(one_view)(jax.random.split(key, 2))
  return (views[0], views[1], labels.reshape(-1),
          rotated.reshape((-1,) + x.shape[1:]))
