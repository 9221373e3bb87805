"""The SSL objective as a per-device `loss_fn` for `train_step`, and the SSL eval step.

One training step (the paper's Stage 1 pretraining): two views per volume,
view_i = aug_rand(rot_rand(x)) (`ssl_views.make_views`), both views through ONE
forward pass of the SSL head (concatenated on the batch axis, so the matmuls
are twice as large), then rotation CE + NT-Xent + L1 reconstruction
(`losses`).

Everything runs on each device's own rows (`train_step.sharded_value_and_grad`), as
each GPU of the reference's DDP run does: views, rotations, cutout boxes,
swap-drop partners and the concatenation never leave the device. Swap-drop
partners are drawn within groups of `swap_group_size` consecutive samples (a
divisor of the per-device batch; 0 = the whole per-device batch, the
reference's rule). Group g of the global batch draws its views from
`fold_in(key, g)`, so the views depend on the group size, never on how many
devices hold the groups. NT-Xent negatives are either the whole global batch
(`negatives="global"`: the 512-d embeddings of both views are all-gathered,
2 x global batch x 512 x 4 bytes per step, 1 MiB at 256 crops) or this
device's samples only (`"device"`, the reference's per-GPU loss).

Mixed precision: parameters stay float32; the model computes in `dtype`
(bf16 on accelerators) and the losses upcast to float32.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, PartitionSpec as P

from bsf_jax.step import losses, sharding, ssl_views
from bsf_jax import models

NEGATIVES = ("global", "device")


def default_config() -> ml_collections.ConfigDict:
  """Returns the `config.ssl` block (reference defaults)."""
  c = ml_collections.ConfigDict()
  # Weight of the rotation CE. Reference `Loss`: alpha1 = 1.0.
  c.w_rot = 1.0
  # Weight of the NT-Xent term. Reference: alpha2 = 1.0.
  c.w_con = 1.0
  # Weight of the L1 reconstruction term. Reference: alpha3 = 1.0.
  c.w_rec = 1.0
  # NT-Xent temperature. Reference `Contrast(temperature=0.5)`.
  c.temperature = 0.5
  # Max fraction of voxels dropped per view. Reference patch_rand_drop.
  c.max_drop = 0.3
  # Max box side as a fraction of each dim. Reference patch_rand_drop.
  c.max_block_sz = 0.25
  # Min box side as a fraction of each dim. Reference patch_rand_drop.
  c.tolr = 0.05
  # Swap-drop partners are drawn within groups of this many consecutive
  # samples, a divisor of the per-device batch; 0 = the per-device batch, as
  # the reference draws them among one GPU's samples.
  c.swap_group_size = 0
  # NT-Xent negatives: "global" (all devices' samples; gathers the 512-d
  # embeddings) or "device" (this device's samples, the reference's per-GPU
  # loss).
  c.negatives = "global"
  return c


def _views(cfg: ml_collections.ConfigDict, key: jax.Array, x: jax.Array,
           valid: jax.Array | None = None):
  """`ssl_views.make_views` on each swap group of this device's rows.

  Group g of the global batch uses `fold_in(key, g)`. Labels and targets come
  back in `make_views` order: this device's view-1 samples, then view-2.
  """
  b = x.shape[0]
  group = cfg.swap_group_size or b
  if group < 1 or b % group:
    raise ValueError(
        f"config.ssl.swap_group_size={cfg.swap_group_size} must divide the "
        f"per-device batch {b} (global batch / devices)")
  n = b // group
  keys = sharding.row_keys(key, n)  # one per group of the global batch
  kw = dict(max_drop=cfg.max_drop, max_block_sz=cfg.max_block_sz,
            tolr=cfg.tolr)
  xs = x.reshape((n, group) + x.shape[1:])
  if valid is None:
    out = jax.vmap(lambda k, xg: ssl_views.make_views(k, xg, **kw))(keys, xs)
  else:
    out = jax.vmap(lambda k, xg, vg: ssl_views.make_views(
        k, xg, valid=vg, **kw))(keys, xs, valid.reshape(n, group))
  view1, view2, labels, targets = out
  # [n, 2, group, ...] -> [2, n * group, ...]: all view-1 samples first.
  by_view = lambda a: jnp.swapaxes(
      a.reshape((n, 2, group) + a.shape[2:]), 0, 1).reshape(
          (2 * b,) + a.shape[2:])
  return (view1.reshape(x.shape), view2.reshape(x.shape), by_view(labels),
          by_view(targets))


def _negatives(cfg: ml_collections.ConfigDict, *arrays: jax.Array):
  """The contrastive inputs over the negatives `cfg.negatives` names."""
  if cfg.negatives not in NEGATIVES:
    raise ValueError(f"config.ssl.negatives={cfg.negatives!r}: expected one "
                     f"of {NEGATIVES}")
  if cfg.negatives == "device":
    return arrays
  return tuple(jax.lax.all_gather(a, sharding.DATA_AXES, tiled=True)
               for a in arrays)


def _forward(model: nn.Module, params, view1, view2, dtype, **apply_kw):
  """One forward of concat(view1, view2); contrastive split back per view."""
  b = view1.shape[0]
  x = jnp.concatenate([view1, view2], axis=0).astype(dtype)
  rot, con, rec = model.apply({"params": params}, x, **apply_kw)
  return rot, con[:b], con[b:], rec


def _check_image(batch: Any) -> jax.Array:
  if not isinstance(batch, dict) or "image" not in batch:
    keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
    raise ValueError(f"SSL batch must be a dict with 'image'; got {keys}")
  x = batch["image"]
  if x.ndim != 5:
    raise ValueError(f"batch['image'] shape {x.shape}: expected "
                     "[B, H, W, D, C]")
  return x


def make_loss_fn(model: nn.Module, cfg_ssl: ml_collections.ConfigDict,
                 dtype: Any = jnp.float32) -> Callable[..., Any]:
  """Builds the per-device `loss_fn(params, batch, rng) -> (loss, metrics)`.

  Args:
    model: an `SSLHead`. Its compute dtype is replaced by `dtype`;
      parameters keep their dtype.
    cfg_ssl: the `config.ssl` block.
    dtype: compute dtype (jnp.float32 or jnp.bfloat16).

  Returns:
    loss_fn for `train_step.make_train_step` (it runs under `shard_map`).
    `batch["image"]` is this device's [b, H, W, D, C]; `rng`, the same on
    every device, drives the views (per swap group) and dropout (per device).
    The loss is this device's share: rotation and reconstruction means over
    its samples, NT-Xent over the negatives `cfg_ssl.negatives` names, so the
    mean over devices is the loss of the global batch. Metrics: the
    unweighted terms `rot`, `con`, `rec`.
  """
  model = models.with_compute_dtype(model, dtype)

  def loss_fn(params, batch, rng):
    x = _check_image(batch)
    view_key, dropout_key = jax.random.split(rng)
    view1, view2, rot_labels, targets = _views(cfg_ssl, view_key, x)
    rot, z1, z2, rec = _forward(
        model, params, view1, view2, dtype, deterministic=False,
        rngs={"dropout": jax.random.fold_in(dropout_key,
                                            sharding.shard_index())})
    z1, z2 = _negatives(cfg_ssl, z1, z2)
    parts = {"rot": losses.rotation_loss(rot, rot_labels),
             "con": losses.contrastive_loss(z1, z2, cfg_ssl.temperature),
             "rec": losses.reconstruction_loss(rec, targets)}
    return _weighted(cfg_ssl, parts), parts

  return loss_fn


def _weighted(cfg: ml_collections.ConfigDict, parts: dict[str, Any]):
  return (cfg.w_rot * parts["rot"] + cfg.w_con * parts["con"]
          + cfg.w_rec * parts["rec"])


def make_eval_step(model: nn.Module, cfg_ssl: ml_collections.ConfigDict,
                   mesh: Mesh, dtype: Any = jnp.float32,
                   params_sharding: Any = None) -> Callable[..., Any]:
  """Builds the jitted SSL validation step.

  Validation must be deterministic, unlike the reference's: the caller passes
  a FIXED key per eval batch (e.g. `fold_in(eval_key, batch_index)`), so the
  same crops get the same views in every evaluation. Like training, it runs
  on each device's rows, with the same swap groups and negatives.

  Args:
    model: the SSL head.
    cfg_ssl: the `config.ssl` block.
    mesh: mesh from `sharding.create_mesh`.
    dtype: compute dtype (the run's `config.model.dtype`).
    params_sharding: shardings of params (FSDP leaves are gathered inside);
      None = replicated.

  Returns:
    jitted `eval_step(params, batch, key)` -> dict of replicated sums over the
    real samples (`batch["mask"]`, default all real): `rot`, `con`, `rec`,
    `total` (weighted), and `count`. Divide by `count` after summing batches.
    `con` is the NT-Xent over the real samples among the negatives (the
    batch's, or each device's), weighted by their number; `rot` and `rec` are
    exact per-sample sums. Padded samples are never swap-drop sources
    (`ssl_views.draw_partners`), so neither their content nor their number
    changes the sums.
  """
  model = models.with_compute_dtype(model, dtype)
  specs = (P() if params_sharding is None
           else sharding.param_specs(params_sharding))

  def eval_step(params, batch, key):
    x = _check_image(batch)
    b = x.shape[0]
    mask = batch.get("mask")
    mask = jnp.ones((b,), bool) if mask is None else mask.astype(bool)
    # Padded samples are never swap partners of real ones: the real samples'
    # views, hence the sums, do not depend on the padding.
    view1, view2, rot_labels, targets = _views(cfg_ssl, key, x, mask)
    params = (params if params_sharding is None
              else sharding.gather_params(params, specs))
    rot, z1, z2, rec = _forward(model, params, view1, view2, dtype,
                                deterministic=True)
    per_view = jax.vmap(lambda lg, lb, r, t: jnp.stack([
        losses.rotation_loss(lg[None], lb[None]),
        losses.reconstruction_loss(r, t)]))(rot, rot_labels, rec, targets)
    per_sample = (per_view[:b] + per_view[b:]) / 2  # mean of the two views
    m = mask.astype(jnp.float32)
    axes = sharding.DATA_AXES
    sums = {"rot": jax.lax.psum(jnp.sum(per_sample[:, 0] * m), axes),
            "rec": jax.lax.psum(jnp.sum(per_sample[:, 1] * m), axes),
            "count": jax.lax.psum(jnp.sum(m), axes)}
    # The masked mean runs over 2 * count valid anchors; the eval sums are
    # per sample pair, hence * count (padded samples are not negatives).
    z1, z2, mask = _negatives(cfg_ssl, z1, z2, mask)
    con = losses.contrastive_loss(z1, z2, cfg_ssl.temperature,
                                  mask=mask) * jnp.sum(mask)
    # Global negatives: every device computed the same value.
    sums["con"] = (jax.lax.psum(con, axes) if cfg_ssl.negatives == "device"
                   else jax.lax.pmean(con, axes))
    sums["total"] = _weighted(cfg_ssl, sums)
    return sums

  body = jax.shard_map(eval_step, mesh=mesh,
                       in_specs=(specs, P(sharding.DATA_AXES), P()),
                       out_specs=P(), check_vma=False)
  return jax.jit(body,
                 in_shardings=(params_sharding, sharding.data_sharding(mesh),
                               sharding.replicated(mesh)),
                 out_shardings=sharding.replicated(mesh))
