"""Tests for bsf_jax.step.patch_drop and bsf_jax.step.ssl_views: reference
statistics, exactness, determinism."""

import functools

import numpy as np
import pytest
from scipy import stats

import jax
import jax.numpy as jnp

from bsf_jax.step import patch_drop, ssl_views
from bsf_jax.reference import augment as ref

# Monte Carlo comparisons use two-sample KS tests with fixed seeds. The family
# of comparisons below is tested at an overall level of 1%, split evenly
# (Bonferroni) over the KS tests; KS is conservative for discrete data, so the
# real false-failure rate is lower still. Fixed seeds make this deterministic.
N_DRAWS = 1500
MC_SHAPES = [(32, 32, 32), (40, 32, 24)]
N_KS_TESTS = len(MC_SHAPES) * 9 + 3 * 3 + 1
ALPHA = 0.01 / N_KS_TESTS


# Small programs: compile them fast (conftest.py).
pytestmark = pytest.mark.usefixtures("fast_compile")


def _ks(a, b, what):
  p = stats.ks_2samp(a, b).pvalue
  assert p > ALPHA, f"{what}: KS p-value {p:.2e} <= {ALPHA:.1e}"


def _paint(boxes, shape):
  """Numpy painting in reference order: last box wins; returns rank map."""
  out = np.zeros(shape, np.int32)
  for k, (r0, r1, c0, c1, s0, s1) in enumerate(boxes):
    out[r0:r1, c0:c1, s0:s1] = k + 1
  return out - 1


def _jax_box_lists(b):
  """Boxes namedtuple (batched, numpy) -> list of per-draw enabled box lists."""
  lists = []
  for start, stop, en in zip(b.start, b.stop, b.enabled):
    lists.append([(s[0], e[0], s[1], e[1], s[2], e[2])
                  for s, e in zip(start[en], stop[en])])
  return lists


def _draw_stats(box_lists, shape):
  vol = float(np.prod(shape))
  count, counted, union = [], [], []
  first_side, first_start = [], []
  for boxes in box_lists:
    sizes = np.array([[b[1] - b[0], b[3] - b[2], b[5] - b[4]] for b in boxes])
    count.append(len(boxes))
    counted.append(np.prod(sizes, axis=1).sum() / vol)
    union.append((_paint(boxes, shape) >= 0).mean())
    first_side.append(sizes[0])
    first_start.append([boxes[0][0], boxes[0][2], boxes[0][4]])
  return dict(count=np.array(count), counted=np.array(counted),
              union=np.array(union), side=np.array(first_side),
              start=np.array(first_start))


@functools.lru_cache(maxsize=None)
def _sampled(shape):
  keys = jax.random.split(jax.random.key(1234), N_DRAWS)
  fn = jax.jit(jax.vmap(lambda k: patch_drop.sample_boxes(k, shape)))
  return jax.tree.map(np.asarray, fn(keys))


@pytest.mark.parametrize("shape", MC_SHAPES)
def test_box_statistics_match_reference(shape):
  boxes = _sampled(shape)
  assert not boxes.truncated.any(), (
      f"{boxes.truncated.sum()} of {N_DRAWS} draws truncated at "
      f"max_boxes={boxes.enabled.shape[1]}")
  mine = _draw_stats(_jax_box_lists(boxes), shape)
  rng = np.random.default_rng(5678)
  theirs = _draw_stats([ref.draw_boxes(rng, shape) for _ in range(N_DRAWS)],
                       shape)
  for key in ("count", "counted", "union"):
    _ks(mine[key], theirs[key], f"{shape} {key}")
  for axis in range(3):
    _ks(mine["side"][:, axis], theirs["side"][:, axis], f"{shape} side {axis}")
    _ks(mine["start"][:, axis], theirs["start"][:, axis],
        f"{shape} start {axis}")
  # The dropped fraction can never exceed the counted one (overlaps), and the
  # counted one overshoots the target by at most one box.
  assert (mine["union"] <= mine["counted"] + 1e-12).all()
  max_box = np.prod([int(0.25 * n) - 1 for n in shape]) / np.prod(shape)
  assert mine["counted"].max() < 0.3 + max_box


def test_last_box_index_is_reference_painting():
  shape = MC_SHAPES[1]
  boxes = _sampled(shape)
  lists = _jax_box_lists(boxes)
  fn = jax.jit(lambda b: patch_drop.last_box_index(b, shape))
  for i in range(12):
    one = jax.tree.map(lambda a: a[i], boxes)
    got = np.asarray(fn(one))
    enabled_rank = np.cumsum(one.enabled) - 1  # rank among enabled boxes
    want = _paint(lists[i], shape)
    np.testing.assert_array_equal(
        np.where(got >= 0, enabled_rank[np.maximum(got, 0)], -1), want)


@pytest.mark.parametrize("n", [2, 27, 2000])
def test_noise_fill_marginal_matches_reference(n):
  count = 3000
  k_ext, k_u = jax.random.split(jax.random.key(n))
  nn = jnp.full((count,), float(n))
  lo, hi = patch_drop.box_noise_extremes(k_ext, nn)
  u = jax.random.uniform(k_u, (count,))
  got = np.asarray(patch_drop.normalised_noise(u, nn, lo, hi))
  rng = np.random.default_rng(n)
  g = rng.standard_normal((count, n))
  gmin, gmax = g.min(1), g.max(1)
  want = (g[:, 0] - gmin) / (gmax - gmin)
  assert ((got >= 0) & (got <= 1)).all()
  _ks(got, want, f"n={n} normalised value")
  _ks(np.asarray(lo), gmin, f"n={n} box min")
  _ks(np.asarray(hi), gmax, f"n={n} box max")


def test_aug_rand_changed_fraction_matches_reference():
  # Per-sample changed-voxel fraction of aug_rand (noise drop, then a swap
  # drop with probability (G - 1) / G) against the sequential reference with
  # batches of G = 4. Random normal data, so every boxed voxel changes.
  groups, g, shape = 50, 4, (1, 24, 24, 24)
  rng = np.random.default_rng(11)
  theirs = []
  for _ in range(groups):
    x = rng.normal(size=(g,) + shape).astype(np.float32)
    theirs.extend((ref.aug_rand(rng, x) != x).mean(axis=(1, 2, 3, 4)))
  x = _batch(12, (groups * g, 24, 24, 24, 1))
  out = jax.jit(functools.partial(ssl_views.aug_rand, group_size=g))(
      jax.random.key(13), x)
  mine = (np.asarray(out) != np.asarray(x)).mean(axis=(1, 2, 3, 4))
  _ks(mine, np.array(theirs), "aug_rand changed fraction")


def test_default_max_boxes_values():
  # Values quoted in docs/ssl.md.
  assert patch_drop.default_max_boxes((32, 32, 32)) == 273
  assert patch_drop.default_max_boxes((96, 96, 96)) == 195
  with pytest.raises(ValueError, match="spatial dim 2 of size 4"):
    patch_drop.default_max_boxes((32, 32, 4))


# One batch shape and one set of jitted functions for all the batch tests:
# compilation dominates their run time on CPU.
X_SHAPE = (4, 16, 16, 16, 2)
GROUP = 2
_drop = jax.jit(patch_drop.patch_rand_drop)
_aug = jax.jit(functools.partial(ssl_views.aug_rand, group_size=GROUP))
_views = jax.jit(functools.partial(ssl_views.make_views, group_size=GROUP))


def _batch(seed, shape=X_SHAPE):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape),
                     jnp.float32)


def test_patch_rand_drop_fill_and_batch_semantics():
  x = _batch(0)
  key = jax.random.key(7)
  out = np.asarray(_drop(key, x))
  changed = out != np.asarray(x)
  # Noise lies in [0, 1]; changed voxels change in all channels at once.
  assert ((out[changed] >= 0) & (out[changed] <= 1)).all()
  np.testing.assert_array_equal(changed[..., 0], changed[..., 1])
  # Sample i depends only on its own key and data: editing sample 1 leaves
  # samples 0 and 2 untouched, and identical samples get different boxes.
  x2 = x.at[1].set(0.0)
  out2 = np.asarray(_drop(key, x2))
  np.testing.assert_array_equal(out2[[0, 2, 3]], out[[0, 2, 3]])
  same = jnp.stack([x[0]] * X_SHAPE[0])
  out3 = np.asarray(_drop(key, same))
  assert not np.array_equal(out3[0], out3[1])
  # Swap fill copies exactly the boxes from x_rep.
  rep = x + 100.0
  out4 = np.asarray(_drop(key, x, rep))
  moved = out4 != np.asarray(x)
  np.testing.assert_array_equal(out4[moved], np.asarray(rep)[moved])


def test_determinism_keys_jit_and_dtype():
  x = _batch(1)
  k1, k2 = jax.random.key(0), jax.random.key(1)
  a = _views(k1, x)
  b = _views(k1, x)
  c = _views(k2, x)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u, v)
  assert not np.array_equal(a[0], c[0])
  assert not np.array_equal(a[2], c[2]) or not np.array_equal(a[1], c[1])
  # The jitted pipeline equals its jitted parts composed by hand.
  kr1, ka1 = jax.random.split(jax.random.split(k1, 2)[0])
  rot = jax.jit(ssl_views.rot_rand)
  x1, l1 = rot(kr1, x)
  np.testing.assert_allclose(a[0], _aug(ka1, x1), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(a[2][:X_SHAPE[0]], l1)
  np.testing.assert_array_equal(a[3][:X_SHAPE[0]], x1)
  # bf16 in, bf16 out (checked abstractly: a second compile costs seconds).
  v1, v2, _, t = jax.eval_shape(_views, k1, x.astype(jnp.bfloat16))
  assert v1.dtype == v2.dtype == t.dtype == jnp.bfloat16


@pytest.mark.parametrize("axes,dims", [((1, 2), (1, 2)), ((2, 3), (2, 3))])
def test_rot_rand_matches_torch_rot90(axes, dims):
  torch = pytest.importorskip("torch")
  x = _batch(2, (8, 6, 6, 6, 2))
  rot, labels = jax.jit(ssl_views.rot_rand, static_argnums=2)(
      jax.random.key(3), x, axes)
  assert set(np.asarray(labels).tolist()) == {0, 1, 2, 3}
  xt = torch.from_numpy(np.moveaxis(np.asarray(x), -1, 1).copy())
  for i, k in enumerate(np.asarray(labels)):
    want = torch.rot90(xt[i], int(k), dims).numpy()  # (C, H, W, D)
    np.testing.assert_array_equal(np.moveaxis(np.asarray(rot[i]), -1, 0), want)
  # The NumPy port agrees with torch too.
  got_ref, lab_ref = ref.rot_rand(np.random.default_rng(0), xt.numpy(), dims)
  for i, k in enumerate(lab_ref):
    np.testing.assert_array_equal(got_ref[i],
                                  torch.rot90(xt[i], int(k), dims).numpy())


def test_rot_rand_rejects_non_square_plane():
  with pytest.raises(ValueError, match="equal sizes, got 8 and 6"):
    ssl_views.rot_rand(jax.random.key(0), jnp.zeros((1, 8, 6, 6, 1)))
  with pytest.raises(ValueError, match=r"\[B, H, W, D, C\]"):
    ssl_views.rot_rand(jax.random.key(0), jnp.zeros((8, 6, 6, 1)))


def test_aug_rand_swaps_within_groups():
  b = X_SHAPE[0]
  x = jnp.broadcast_to((10.0 + jnp.arange(b))[:, None, None, None, None],
                       X_SHAPE)
  seen_swap = seen_plain = False
  for seed in range(6):
    out = np.asarray(_aug(jax.random.key(seed), x))
    for i in range(b):
      vals = out[i]
      foreign = np.unique(vals[(vals >= 10) & (vals != 10 + i)])
      partner = 10 + (i ^ 1)  # the other member of i's group
      assert set(foreign.tolist()) <= {partner}, (seed, i, foreign)
      assert ((vals == 10 + i) | (vals == partner)
              | ((vals >= 0) & (vals <= 1))).all()
      seen_swap |= foreign.size > 0
      seen_plain |= foreign.size == 0
  assert seen_swap and seen_plain
  with pytest.raises(ValueError, match="not divisible by group_size 3"):
    ssl_views.aug_rand(jax.random.key(0), x, group_size=3)


def test_partners_skip_padding_and_ignore_its_amount():
  key = jax.random.key(3)
  # All valid: the masked draw is the reference draw, bit for bit.
  np.testing.assert_array_equal(
      ssl_views.draw_partners(key, 8, 4, jnp.ones(8, bool)),
      ssl_views.draw_partners(key, 8, 4))
  valid = np.array([True, True, True, False, False, False, False, False])
  seen = set()
  for seed in range(20):
    k = jax.random.key(seed)
    p = np.asarray(ssl_views.draw_partners(k, 8, 8, valid))[0]
    assert valid[p[:3]].all(), (seed, p)  # real samples pair with real ones
    seen |= set(p[:3].tolist())
    # Real samples first, then padding: the same partners whatever the amount.
    for bsz in (4, 16):
      more = np.arange(bsz) < 3
      q = np.asarray(ssl_views.draw_partners(k, bsz, bsz, more))[0]
      np.testing.assert_array_equal(q[:3], p[:3])
  assert seen == {0, 1, 2}  # every real sample is drawn
  # Views of the real samples do not see the padding's content; without the
  # mask they do (a real sample copies boxes out of a padded partner).
  x = np.asarray(_batch(5, (8, 16, 16, 16, 2)))
  y = x.copy()
  y[3:] = 7.0
  masked = jax.jit(functools.partial(ssl_views.make_views, valid=valid))
  leaked = False
  for seed in range(3):
    k = jax.random.key(seed)
    a, b = masked(k, x), masked(k, y)
    for view in (0, 1):
      np.testing.assert_array_equal(a[view][:3], b[view][:3])
    a, b = ssl_views.make_views(k, x), ssl_views.make_views(k, y)
    leaked |= any(not np.array_equal(a[v][:3], b[v][:3]) for v in (0, 1))
  assert leaked


def test_make_views_layout():
  b = X_SHAPE[0]
  x = _batch(4)
  v1, v2, labels, targets = _views(jax.random.key(9), x)
  assert v1.shape == v2.shape == x.shape
  assert labels.shape == (2 * b,) and labels.dtype == jnp.int32
  assert targets.shape == (2 * b,) + x.shape[1:]
  for i, k in enumerate(np.asarray(labels)):
    np.testing.assert_array_equal(
        targets[i], np.rot90(np.asarray(x[i % b]), int(k), axes=(0, 1)))
  # View 1 is aug(targets[:B]), view 2 is aug(targets[B:]): each drop covers
  # at most ~30% + one box, so most voxels of a view equal its own target.
  for view, tgt in ((v1, targets[:b]), (v2, targets[b:])):
    same = np.asarray(view) == np.asarray(tgt)
    assert same.mean(axis=(1, 2, 3, 4)).min() > 0.3


def test_reference_port_runs():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 2, 16, 16, 16)).astype(np.float32)
  out = ref.aug_rand(rng, x)
  assert out.shape == x.shape and not np.array_equal(out, x)
  one = ref.patch_rand_drop(rng, x[0])
  changed = one != x[0]
  assert ((one[changed] >= 0) & (one[changed] <= 1)).all()
