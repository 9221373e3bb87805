"""NumPy port of the reference SSL augmentation algorithm (sequential, exact).

Re-implements, step by step, the `patch_rand_drop`, `rot_rand` and `aug_rand`
of BrainSegFounder `pretrain/utils/ops.py` (from MONAI's SwinUNETR
pretraining) on NumPy arrays in the reference's channels-first layout:
a sample is (C, H, W, D) and a batch (B, C, H, W, D). The only change is the
random source: an explicit `np.random.Generator` replaces numpy's global RNG
and torch's `normal_()`. `rng.integers(lo, hi)` and `rng.uniform(0, m)` draw
from the same ranges as the legacy global-state `randint(lo, hi)` and
`uniform(0, m)` calls of the reference.

tests/ssl_views_test.py compares the statistics of `bsf_jax.step.patch_drop` and
`bsf_jax.step.ssl_views` against this port by Monte Carlo.
"""

from typing import Sequence

import numpy as np

Box = tuple[int, int, int, int, int, int]  # r0, r1, c0, c1, s0, s1


def draw_boxes(rng: np.random.Generator, spatial_shape: Sequence[int],
               max_drop: float = 0.3, max_block_sz: float = 0.25,
               tolr: float = 0.05) -> list[Box]:
  """Draws the boxes of one reference `patch_rand_drop` call, in order.

  Args:
    rng: random generator.
    spatial_shape: (H, W, D).
    max_drop: target fraction u ~ U(0, max_drop) of the voxels.
    max_block_sz: box side upper bound (exclusive) as a fraction of each dim.
    tolr: box side lower bound as a fraction of each dim.

  Returns:
    List of (r0, r1, c0, c1, s0, s1) half-open boxes.
  """
  h, w, z = spatial_shape
  n_drop_pix = rng.uniform(0, max_drop) * h * w * z
  mx_h, mx_w, mx_z = int(h * max_block_sz), int(w * max_block_sz), int(
      z * max_block_sz)
  t_h, t_w, t_z = int(tolr * h), int(tolr * w), int(tolr * z)
  boxes = []
  total_pix = 0
  while total_pix < n_drop_pix:
    r0 = rng.integers(0, h - t_h)
    c0 = rng.integers(0, w - t_w)
    s0 = rng.integers(0, z - t_z)
    r1 = min(rng.integers(t_h, mx_h) + r0, h)
    c1 = min(rng.integers(t_w, mx_w) + c0, w)
    s1 = min(rng.integers(t_z, mx_z) + s0, z)
    boxes.append((int(r0), int(r1), int(c0), int(c1), int(s0), int(s1)))
    total_pix += (r1 - r0) * (c1 - c0) * (s1 - s0)
  return boxes


def patch_rand_drop(rng: np.random.Generator, x: np.ndarray,
                    x_rep: np.ndarray | None = None, max_drop: float = 0.3,
                    max_block_sz: float = 0.25, tolr: float = 0.05,
                    boxes: list[Box] | None = None) -> np.ndarray:
  """Reference `patch_rand_drop` on one (C, H, W, D) volume.

  Each box is filled with standard normal noise of the box's shape, min-max
  normalised over the box (all channels), or with the same box of `x_rep`.

  Args:
    rng: random generator.
    x: (C, H, W, D) volume (not modified).
    x_rep: None for noise fill, else a (C, H, W, D) volume to copy boxes from.
    max_drop, max_block_sz, tolr: see `draw_boxes`.
    boxes: optional pre-drawn boxes (then only the noise is drawn from rng).

  Returns:
    The augmented copy of x.
  """
  out = np.array(x, copy=True)
  if boxes is None:
    boxes = draw_boxes(rng, x.shape[1:], max_drop, max_block_sz, tolr)
  for r0, r1, c0, c1, s0, s1 in boxes:
    if (r1 - r0) * (c1 - c0) * (s1 - s0) == 0:
      # A zero-sized box (side 0 happens when int(tolr * n) == 0, n < 20)
      # makes the reference's torch.min raise; it covers nothing, so skip it.
      continue
    if x_rep is None:
      noise = rng.standard_normal((x.shape[0], r1 - r0, c1 - c0, s1 - s0))
      # 0/0 = NaN for a one-element box, exactly as the reference.
      with np.errstate(invalid="ignore", divide="ignore"):
        noise = (noise - noise.min()) / (noise.max() - noise.min())
      out[:, r0:r1, c0:c1, s0:s1] = noise
    else:
      out[:, r0:r1, c0:c1, s0:s1] = x_rep[:, r0:r1, c0:c1, s0:s1]
  return out


def rot_rand(rng: np.random.Generator, x: np.ndarray,
             dims: tuple[int, int] = (1, 2)) -> tuple[np.ndarray, np.ndarray]:
  """Reference `rot_rand`: per sample k ~ U{0..3}, rot90 by k in `dims`.

  Args:
    rng: random generator.
    x: (B, C, H, W, D) batch.
    dims: plane of each (C, H, W, D) sample; the paper's recipe rotates in (1, 2) (H-W),
      the released reference code uses (2, 3) (W-D).

  Returns:
    (rotated copy of x, labels k as int64 [B]).
  """
  out = np.array(x, copy=True)
  labels = np.zeros((x.shape[0],), np.int64)
  for i in range(x.shape[0]):
    k = int(rng.integers(0, 4))
    out[i] = np.rot90(x[i], k, axes=dims)
    labels[i] = k
  return out, labels


def aug_rand(rng: np.random.Generator, samples: np.ndarray,
             **drop_kw) -> np.ndarray:
  """Reference `aug_rand`: sequential, in place on a copy of the batch.

  Sample i gets a noise drop; then a partner index is drawn from the whole
  batch and, if it differs from i, a swap drop copies boxes from the current
  (possibly already augmented) partner.

  Args:
    rng: random generator.
    samples: (B, C, H, W, D) batch (not modified).
    **drop_kw: max_drop, max_block_sz, tolr for `patch_rand_drop`.

  Returns:
    The augmented copy.
  """
  x_aug = np.array(samples, copy=True)
  n = samples.shape[0]
  for i in range(n):
    x_aug[i] = patch_rand_drop(rng, x_aug[i], **drop_kw)
    j = int(rng.integers(0, n))
    if j != i:
      x_aug[i] = patch_rand_drop(rng, x_aug[i], x_aug[j], **drop_kw)
  return x_aug
