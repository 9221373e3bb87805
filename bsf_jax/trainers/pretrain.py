"""SSL pretraining (stages 1 and 2): rotation + contrastive + inpainting.

Validation is deterministic: fixed crops from the eval pipeline and a fixed
augmentation key, so numbers compare across runs and resumes. The best
checkpoint is the one with the lowest validation reconstruction loss, as the
reference selects it.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bsf_jax.step import sharding, ssl_step, ssl_views
from bsf_jax import models
from bsf_jax.run import kinds
from bsf_jax.weights import transfer
from bsf_jax.data import pipeline
from bsf_jax.trainers import loop

# Validation keys never change, whatever the step or run.
_EVAL_SEED = 20240101


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  logging.info("%s", transfer.resolve_patch_merging(config))
  mesh = sharding.create_mesh(config.mesh)
  return loop.run(config, workdir, make_job(config, mesh), mesh)


def make_job(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> loop.Job:
  """Stages 1-2 on `mesh`: the SSL model, its loss, validation and previews."""
  model = models.from_config(config, devices=list(mesh.devices.flat))
  dtype = jnp.dtype(config.model.dtype)
  loss_fn = ssl_step.make_loss_fn(model, config.ssl, dtype)
  eval_step = ssl_step.make_eval_step(model, config.ssl, mesh, dtype)
  data_sharding = sharding.data_sharding(mesh)
  eval_key = jax.random.key(_EVAL_SEED)

  def evaluate(params, step):
    del step
    totals: dict[str, float] = {}
    for i, batch in enumerate(pipeline.make_eval_iter(config.data, task=kinds.SSL.task)):
      if 0 <= config.train.eval_batches <= i:
        break
      batch = pipeline.to_global_batch(batch, data_sharding)
      sums = jax.device_get(eval_step(params, batch, jax.random.fold_in(eval_key, i)))
      for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    count = max(totals.pop("count", 0.0), 1.0)
    return {f"val_{k}": v / count for k, v in totals.items()}

  @functools.partial(jax.jit)
  def _preview(params, x, key):
    view1, _, _, _ = ssl_views.make_views(key, x)
    _, _, recon = model.apply({"params": params}, view1)
    return x, view1, recon

  def images(params, step):
    del step
    batch = next(iter(pipeline.make_eval_iter(config.data, task=kinds.SSL.task)))
    x = jnp.asarray(batch["image"][:1])
    return {f"preview/{k}": v for k, v in zip(
        ("input", "augmented", "reconstruction"),
        (mid_slice(np.asarray(a)) for a in _preview(params, x, eval_key)))}

  return loop.Job(model=model, loss_fn=loss_fn, kind=kinds.SSL, evaluate=evaluate,
                  images=images)


def mid_slice(volume: np.ndarray) -> np.ndarray:
  """[N,H,W,D,C] -> [N,H,W,1] mid-depth slice of channel 0, scaled to [0,1]."""
  s = volume[:, :, :, volume.shape[3] // 2, :1].astype(np.float32)
  lo, hi = s.min(), s.max()
  return (s - lo) / max(hi - lo, 1e-6)
