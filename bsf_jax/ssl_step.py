"""The SSL objective as a `loss_fn` for `train_step`, and the SSL eval step.

One training step (SPEC section 4): two views per volume,
view_i = aug_rand(rot_rand(x)) (`augment.make_views`), both views through ONE
forward pass of the SSL head (concatenated on the batch axis, so the weights
are gathered once under FSDP and the matmuls are twice as large), then
`losses.ssl_loss` = rotation CE + NT-Xent + L1 reconstruction.

Mixed precision: parameters stay float32; the model computes in `dtype`
(bf16 on accelerators) and the losses upcast to float32.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from bsf_jax import augment, losses, models, sharding


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
  # Swap-drop partners are drawn within groups of this many samples; 0 = the
  # whole global batch. The reference draws them on one GPU (its per-GPU
  # batch); set this to the per-device batch to match it and keep the gather
  # device-local.
  c.swap_group_size = 0
  return c


def _views(cfg: ml_collections.ConfigDict, key: jax.Array, x: jax.Array,
           valid: jax.Array | None = None):
  return augment.make_views(
      key, x, group_size=cfg.swap_group_size or None, max_drop=cfg.max_drop,
      max_block_sz=cfg.max_block_sz, tolr=cfg.tolr, valid=valid)


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
  """Builds `loss_fn(params, batch, rng) -> (loss, metrics)` for SSL.

  Args:
    model: an `SSLHead` (any module returning (rot, con, rec) works). Its
      compute dtype is replaced by `dtype`; parameters keep their dtype.
    cfg_ssl: the `config.ssl` block.
    dtype: compute dtype (jnp.float32 or jnp.bfloat16).

  Returns:
    loss_fn. `batch["image"]` is [B, H, W, D, C]; `rng` drives the views and
    dropout. Metrics: the unweighted terms `rot`, `con`, `rec`.
  """
  model = models.with_compute_dtype(model, dtype)

  def loss_fn(params, batch, rng):
    x = _check_image(batch)
    view_key, dropout_key = jax.random.split(rng)
    view1, view2, rot_labels, targets = _views(cfg_ssl, view_key, x)
    rot, z1, z2, rec = _forward(model, params, view1, view2, dtype,
                                deterministic=False,
                                rngs={"dropout": dropout_key})
    total, parts = losses.ssl_loss(
        rot, rot_labels, z1, z2, rec, targets, w_rot=cfg_ssl.w_rot,
        w_con=cfg_ssl.w_con, w_rec=cfg_ssl.w_rec,
        temperature=cfg_ssl.temperature)
    return total, dict(parts)

  return loss_fn


def make_eval_step(model: nn.Module, cfg_ssl: ml_collections.ConfigDict,
                   mesh: Mesh, dtype: Any = jnp.float32,
                   params_sharding: Any = None) -> Callable[..., Any]:
  """Builds the jitted SSL validation step.

  Validation must be deterministic, unlike the reference's: the caller passes
  a FIXED key per eval batch (e.g. `fold_in(eval_key, batch_index)`), so the
  same crops get the same views in every evaluation.

  Args:
    model: the SSL head.
    cfg_ssl: the `config.ssl` block.
    mesh: mesh from `sharding.create_mesh`.
    dtype: compute dtype.
    params_sharding: shardings of params; None = keep the arrays' own.

  Returns:
    jitted `eval_step(params, batch, key)` -> dict of replicated sums over the
    real samples (`batch["mask"]`, default all real): `rot`, `con`, `rec`,
    `total` (weighted), and `count`. Divide by `count` after summing batches.
    `con` is the NT-Xent over the real samples of each batch, weighted by
    their number; `rot` and `rec` are exact per-sample sums. Padded samples
    are never swap-drop sources (`augment.draw_partners`), so neither their
    content nor their number changes the sums.
  """
  model = models.with_compute_dtype(model, dtype)

  def eval_step(params, batch, key):
    x = _check_image(batch)
    b = x.shape[0]
    mask = batch.get("mask")
    mask = jnp.ones((b,), bool) if mask is None else mask.astype(bool)
    # Padded samples are never swap partners of real ones: the real samples'
    # views, hence the sums, do not depend on the padding.
    view1, view2, rot_labels, targets = _views(cfg_ssl, key, x, mask)
    rot, z1, z2, rec = _forward(model, params, view1, view2, dtype,
                                deterministic=True)
    per_view = jax.vmap(lambda lg, lb, r, t: jnp.stack([
        losses.rotation_loss(lg[None], lb[None]),
        losses.reconstruction_loss(r, t)]))(rot, rot_labels, rec, targets)
    per_sample = (per_view[:b] + per_view[b:]) / 2  # mean of the two views
    m = mask.astype(jnp.float32)
    count = jnp.sum(m)
    sums = {"rot": jnp.sum(per_sample[:, 0] * m),
            "rec": jnp.sum(per_sample[:, 1] * m)}
    # The masked mean runs over 2 * count valid anchors; the eval sums are
    # per sample pair, hence * count (padded samples are not negatives).
    sums["con"] = losses.contrastive_loss(
        z1, z2, cfg_ssl.temperature, mask=mask) * jnp.sum(mask)
    sums["total"] = (cfg_ssl.w_rot * sums["rot"] + cfg_ssl.w_con * sums["con"]
                     + cfg_ssl.w_rec * sums["rec"])
    sums["count"] = count
    return sums

  return jax.jit(eval_step,
                 in_shardings=(params_sharding, sharding.data_sharding(mesh),
                               sharding.replicated(mesh)),
                 out_shardings=sharding.replicated(mesh))
