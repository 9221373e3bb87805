"""Optimizer: AdamW with warm-up cosine, optional clipping and a freeze mask.

The stage-1 recipe of BrainSegFounder (paper Section 3.2 and Table 3; the
reference `pretrain/main_T1T2.py`) is AdamW, a linear warm-up over 500 steps
followed by a cosine decay to zero, weight decay 0.1 on every parameter, and
gradient clipping only when `--grad_clip` is passed. `default_config()` holds
that recipe; fine-tuning configs override `lr` and `freeze`.

The learning rate is injected as an optimizer hyperparameter
(`optax.inject_hyperparams`), so the train step can report the rate it applied
by reading the optimizer state (`current_lr`) instead of re-evaluating the
schedule on the host.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import optax

_SCHEDULES = ("warmup_cosine", "constant")


def default_config() -> ml_collections.ConfigDict:
  """Returns the `config.optim` block with the stage-1 paper settings."""
  c = ml_collections.ConfigDict()
  # Peak learning rate. Paper Section 3.2: 6e-6 for stage 1 (UKB); Table 3:
  # 1e-4 for BraTS stage 2 and fine-tuning, 5e-3 for ATLAS stage 2.
  c.lr = 6e-6
  # Linear warm-up steps from 0 to `lr`. Paper Section 3.2: 500 iterations.
  c.warmup_steps = 500
  # Decoupled (AdamW) weight decay. Paper Section 3.2 ("decay of 0.1"); the
  # reference script applies it to all parameters, biases and norms included.
  c.weight_decay = 0.1
  # Adam first-moment decay. Paper Section 3.2 ("momentum of 0.9").
  c.b1 = 0.9
  # Adam second-moment decay. torch.optim.AdamW default used by the reference.
  c.b2 = 0.999
  # Adam epsilon. torch.optim.AdamW default used by the reference.
  c.eps = 1e-8
  # Max global gradient norm; 0 = no clipping. The reference clips at 1.0 only
  # when run with --grad_clip, which its launch scripts do not pass.
  c.grad_clip = 0.0
  # "warmup_cosine" (reference WarmupCosineSchedule) or "constant" (after the
  # same warm-up).
  c.schedule = "warmup_cosine"
  # Final lr as a fraction of `lr` at the end of the cosine. Reference: 0.
  c.min_lr_ratio = 0.0
  # Regex over '/'-joined param paths (e.g. "^encoder/") whose parameters get
  # zero updates and no weight decay; "" freezes nothing. Our addition for
  # frozen-encoder fine-tuning.
  c.freeze = ""
  return c


def make_schedule(cfg: ml_collections.ConfigDict,
                  total_steps: int) -> optax.Schedule:
  """Builds the learning-rate schedule.

  Args:
    cfg: the `config.optim` block.
    total_steps: number of optimizer steps of the whole run; the cosine ends
      there. Must exceed `cfg.warmup_steps` for "warmup_cosine".

  Returns:
    A function step -> learning rate.
  """
  if cfg.schedule not in _SCHEDULES:
    raise ValueError(f"config.optim.schedule={cfg.schedule!r}; expected one "
                     f"of {_SCHEDULES}")
  if cfg.warmup_steps < 0 or total_steps <= 0:
    raise ValueError(f"config.optim.warmup_steps={cfg.warmup_steps} and "
                     f"total_steps={total_steps} must be >= 0 and > 0")
  if cfg.schedule == "constant":
    if cfg.warmup_steps == 0:
      return optax.constant_schedule(cfg.lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps),
         optax.constant_schedule(cfg.lr)], [cfg.warmup_steps])
  if total_steps <= cfg.warmup_steps:
    raise ValueError(
        f"total_steps={total_steps} must exceed config.optim.warmup_steps="
        f"{cfg.warmup_steps} for the warmup_cosine schedule")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
      decay_steps=total_steps, end_value=cfg.lr * cfg.min_lr_ratio)


def param_path(path) -> str:
  """'/'-joined names of a pytree key path, e.g. 'encoder/layers1/kernel'."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def freeze_labels(params, pattern: str):
  """Labels each leaf "frozen" if its path matches `pattern`, else "trainable".

  Args:
    params: parameter pytree (or its abstract shapes).
    pattern: regex searched in each '/'-joined path; "" freezes nothing.

  Returns:
    A pytree of strings with the structure of `params`.
  """
  regex = re.compile(pattern) if pattern else None
  return jax.tree_util.tree_map_with_path(
      lambda p, _: "frozen" if regex and regex.search(param_path(p))
      else "trainable", params)


def make_optimizer(cfg: ml_collections.ConfigDict,
                   total_steps: int) -> optax.GradientTransformation:
  """Builds AdamW (+ optional global-norm clipping, + optional freeze).

  Clipping sees only the trainable gradients, so frozen weights neither move
  nor shrink the updates of the others. Frozen leaves keep no Adam moments.

  Args:
    cfg: the `config.optim` block.
    total_steps: number of optimizer steps of the whole run.

  Returns:
    An optax GradientTransformation whose state records the current learning
    rate (see `current_lr`).
  """
  if cfg.grad_clip < 0:
    raise ValueError(f"config.optim.grad_clip={cfg.grad_clip} must be >= 0")
  schedule = make_schedule(cfg, total_steps)

  def adamw(learning_rate):
    parts = []
    if cfg.grad_clip > 0:
      parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay))
    return optax.chain(*parts)

  tx = optax.inject_hyperparams(adamw)(learning_rate=schedule)
  if not cfg.freeze:
    return tx
  try:
    re.compile(cfg.freeze)
  except re.error as e:
    raise ValueError(f"config.optim.freeze={cfg.freeze!r} is not a valid "
                     f"regex: {e}") from e
  return optax.multi_transform(
      {"trainable": tx, "frozen": optax.set_to_zero()},
      lambda params: freeze_labels(params, cfg.freeze))


def current_lr(opt_state) -> jax.Array:
  """The learning rate applied by the last update, read from `opt_state`.

  Args:
    opt_state: state of an optimizer from `make_optimizer`.

  Returns:
    A float32 scalar (0 if the state holds no injected learning rate).
  """
  found = []

  def visit(x):
    if isinstance(x, (optax.InjectHyperparamsState,
                      optax.InjectStatefulHyperparamsState)):
      found.append(x.hyperparams["learning_rate"])
      return True
    return False

  jax.tree_util.tree_map(lambda _: None, opt_state, is_leaf=visit)
  if not found:
    return jnp.zeros((), jnp.float32)
  return jnp.asarray(found[0], jnp.float32)
