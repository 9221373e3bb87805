"""Whole-volume predictors: one model, or several models and test-time flips.

`make_ensemble_predictor(models, config, mirror)` runs
`sliding_window.sliding_window_inference` as a run's config sets it
(`config.seg`) for several models (their params stacked) and test-time flips,
averaged on the device in one program: what `predict` and `evaluate` run
(`bsf_jax.weights.ensemble`). `make_volume_predictor(model, config)` is its
one model, no flips case, fine-tuning's validation.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bsf_jax.infer.sliding_window import sliding_window_inference

# x runs left to right, y posterior to anterior, z inferior to superior.
AXIS_NAMES = "xyz"


def flip_combinations(axes: str) -> list[tuple[int, ...]]:
  """Every subset of the named axes, the identity first: 2^len(axes) flips.

  Args:
    axes: names from `AXIS_NAMES`, e.g. "xyz" (the 8 flips nnU-Net mirrors
      with by default) or "x" (left-right only); "" gives the identity alone.

  Returns:
    Tuples of spatial axis indices, one per flip.
  """
  if len(set(axes)) != len(axes) or any(a not in AXIS_NAMES for a in axes):
    raise ValueError(f"mirror axes {axes!r}: expected distinct letters of "
                     f"{AXIS_NAMES!r} (x left-right, y posterior-anterior, z "
                     "inferior-superior)")
  dims = sorted(AXIS_NAMES.index(a) for a in axes)
  return [combo for r in range(len(dims) + 1)
          for combo in itertools.combinations(dims, r)]


def stack_members(params: Sequence[Any]) -> Any:
  """The params of same-architecture models stacked along a leading axis.

  Raises:
    ValueError: the trees differ in structure or in a leaf's shape.
  """
  first = jax.tree_util.tree_structure(params[0])
  for i, p in enumerate(params[1:], 1):
    if jax.tree_util.tree_structure(p) != first:
      raise ValueError(f"member {i}'s params have another structure than "
                       "member 0's; they cannot share one model")
  leaves = [jax.tree_util.tree_leaves_with_path(p) for p in params]
  for (path, leaf), *others in zip(*leaves):
    for i, (_, other) in enumerate(others, 1):
      if np.shape(other) != np.shape(leaf):
        raise ValueError(
            f"member {i}'s {jax.tree_util.keystr(path)} has shape "
            f"{np.shape(other)}, member 0's {np.shape(leaf)}")
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                      *params)


def _members_predictor(model, models_per_step: int | None):
  """`predictor(stacked_params, windows [n, *roi, C]) -> [n, *roi, M * K]`.

  Member m's K logits are channels m*K..(m+1)*K-1, so the sliding window
  blends every member at once. Members run `models_per_step` at a time
  (`lax.map` with `batch_size`: a vmap over that many, a loop over the
  groups); None runs all of them in one vmap.
  """
  def predict(stacked, windows):
    members = jax.tree.leaves(stacked)[0].shape[0]
    apply = lambda p: model.apply({"params": p}, windows)
    if members == 1:
      out = apply(jax.tree.map(lambda p: p[0], stacked))[None]
    elif models_per_step == 1:
      out = jax.lax.map(apply, stacked)
    else:
      out = jax.lax.map(apply, stacked,
                        batch_size=min(models_per_step or members, members))
    # [M, n, *roi, K] -> [n, *roi, M * K]
    out = jnp.moveaxis(out, 0, -2)
    return out.reshape(*out.shape[:-2], -1)

  return predict


def _flip(volume, flags):
  """Flips spatial axis d of [H, W, D, K] where traced bool flags[d] is set."""
  for d in range(3):
    volume = jax.lax.cond(flags[d], lambda v, d=d: jnp.flip(v, d),
                          lambda v: v, volume)
  return volume


def window_devices(sw_batch_size: int, available: int) -> int:
  """How many devices split each window batch: the most, up to `available`,
  whose number divides `sw_batch_size` (every device predicts as many
  windows per step)."""
  return max(k for k in range(1, min(available, sw_batch_size) + 1)
             if sw_batch_size % k == 0)


def window_mesh(sw_batch_size: int, devices=None):
  """A data-only mesh over the local accelerators that split each window batch.

  `window_devices` of this process's devices; None for one device, and for
  CPU devices: they share the host's cores, which XLA:CPU already spreads
  one device's work over (splitting windows across the fake devices of
  `--xla_force_host_platform_device_count` only adds overhead).
  """
  devices = list(devices if devices is not None else jax.local_devices())
  n = window_devices(sw_batch_size, len(devices))
  if n == 1 or devices[0].platform == "cpu":
    return None
  return jax.sharding.Mesh(np.array(devices[:n]), ("data",))


def default_models_per_step(devices=None) -> int | None:
  """Members vmapped together by default: all on accelerators, one on CPUs.

  On XLA:CPU a vmap over models turns every convolution into a grouped one,
  which runs several times slower than the models one after another
  (BENCHMARKS.md, ensemble inference).
  """
  devices = devices if devices is not None else jax.local_devices()
  return 1 if devices[0].platform == "cpu" else None


def make_ensemble_predictor(models: Sequence[Any], config, mirror: str = "",
                            mesh=None, models_per_step: int | None = None):
  """Returns `predict(stacked_params, image [H,W,D,C]) -> probabilities [H,W,D,K]`.

  The mean, over every member of every group and every flip, of the sigmoid
  probabilities of the member's sliding-window logits on the flipped volume,
  flipped back: what a loop of `sliding_window_inference` calls over models
  and flips computes (nnU-Net's mirroring, SwinUNETR's BraTS ensembles), as
  one jitted program. The flips are a `lax.scan` around the sliding window
  (the model is traced once), members of a group share each window batch.

  Args:
    models: one segmentation module per architecture group.
    config: `data.roi` and the `seg.sw_*` settings.
    mirror: axes to mirror over (`flip_combinations`); "" for none.
    mesh: optional mesh whose data axis splits each step's windows.
    models_per_step: members run at once (see `_members_predictor`); None:
      `default_models_per_step` of the mesh's devices.

  The returned function takes a tuple with one stacked params pytree per
  group (`stack_members`), in the order of `models`; it compiles once per
  image shape.
  """
  seg, roi = config.seg, tuple(config.data.roi)
  flips = flip_combinations(mirror)
  flags = np.asarray([[d in f for d in range(3)] for f in flips])
  if models_per_step is None:
    models_per_step = default_models_per_step(
        None if mesh is None else list(mesh.devices.flat))
  predictors = [_members_predictor(m, models_per_step) for m in models]

  def blended(predictor, stacked, image):
    return sliding_window_inference(
        image[None], roi, predictor, overlap=seg.sw_overlap, mode=seg.sw_mode,
        sw_batch_size=seg.sw_batch_size, predictor_args=(stacked,),
        mesh=mesh)[0]

  @jax.jit
  def probabilities(stacked_groups, image):
    if len(stacked_groups) != len(predictors):
      raise ValueError(f"{len(stacked_groups)} params groups for "
                       f"{len(predictors)} models")
    total, count = 0.0, 0
    for predictor, stacked in zip(predictors, stacked_groups):
      members = jax.tree.leaves(stacked)[0].shape[0]

      def member_probs(logits, members=members):
        """[..., M * K] blended logits -> the sum of the M members' sigmoids."""
        return jax.nn.sigmoid(
            logits.reshape(*logits.shape[:-1], members, -1)).sum(-2)

      if len(flips) == 1:
        total = total + member_probs(blended(predictor, stacked, image))
      else:
        def one_flip(acc, f, predictor=predictor, stacked=stacked,
                     member_probs=member_probs):
          # A flip is its own inverse: flip the input, flip the output back.
          logits = _flip(blended(predictor, stacked, _flip(image, f)), f)
          return acc + member_probs(logits), None

        window = jax.ShapeDtypeStruct((1, *roi, image.shape[-1]), image.dtype)
        channels = jax.eval_shape(predictor, stacked, window).shape[-1]
        zeros = jnp.zeros((*image.shape[:-1], channels // members),
                          jnp.promote_types(image.dtype, jnp.float32))
        group_total, _ = jax.lax.scan(one_flip, zeros, flags)
        total = total + group_total
      count += members * len(flips)
    return total / count

  return probabilities


def make_volume_predictor(model, config, mesh=None):
  """Returns `predict(params, image [H,W,D,C]) -> probabilities [H,W,D,K]`.

  One model, no flips: `make_ensemble_predictor` with a single member.

  Args:
    model: a segmentation module (`models.from_config`).
    config: the run's config: `data.roi` and the `seg.sw_*` settings.
    mesh: optional mesh whose data axis splits each step's windows
      (`sharding.process_local_mesh`).
  """
  ensemble = make_ensemble_predictor([model], config, mesh=mesh)

  @jax.jit
  def probabilities(params, image):
    return ensemble((jax.tree.map(lambda p: p[None], params),), image)

  return probabilities
