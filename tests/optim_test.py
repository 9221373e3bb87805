"""Optimizer: schedule values, AdamW vs torch.optim.AdamW, clipping, freeze."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bsf_jax.step import optim


def cfg(**kw):
  c = optim.default_config()
  c.update(kw)
  return c


def test_default_config_is_the_paper_recipe():
  c = optim.default_config()
  assert (c.lr, c.warmup_steps, c.weight_decay, c.b1) == (6e-6, 500, 0.1, 0.9)
  assert c.schedule == "warmup_cosine" and c.grad_clip == 0 and c.freeze == ""


def test_warmup_cosine_matches_reference_formula():
  # Reference WarmupCosineSchedule (MONAI SSL recipe): linear warm-up, then
  # 0.5 * (1 + cos(pi * progress)) with progress over the remaining steps.
  c = cfg(lr=1e-4, warmup_steps=10)
  sched = optim.make_schedule(c, total_steps=50)
  for step in (0, 3, 10, 11, 30, 49, 50):
    if step < 10:
      want = 1e-4 * step / 10
    else:
      want = 1e-4 * 0.5 * (1 + np.cos(np.pi * (step - 10) / 40))
    assert float(sched(step)) == pytest.approx(want, rel=1e-5, abs=1e-10)
  floor = optim.make_schedule(cfg(lr=1.0, warmup_steps=0, min_lr_ratio=0.1),
                              20)
  assert float(floor(20)) == pytest.approx(0.1)
  const = optim.make_schedule(cfg(lr=2.0, warmup_steps=4, schedule="constant"),
                              10)
  assert [float(const(s)) for s in (0, 2, 4, 9)] == [0.0, 1.0, 2.0, 2.0]


def test_bad_settings_raise():
  with pytest.raises(ValueError, match="schedule='poly'"):
    optim.make_schedule(cfg(schedule="poly"), 10)
  with pytest.raises(ValueError, match="must exceed"):
    optim.make_schedule(cfg(warmup_steps=500), 100)
  with pytest.raises(ValueError, match="grad_clip=-1"):
    optim.make_optimizer(cfg(grad_clip=-1.0), 1000)
  with pytest.raises(ValueError, match="not a valid regex"):
    optim.make_optimizer(cfg(freeze="(", warmup_steps=0), 10)


def test_adamw_warmup_cosine_matches_torch():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(5, 3)).astype(np.float32)
  targets = [rng.normal(size=(5, 3)).astype(np.float32) for _ in range(6)]
  c = cfg(lr=0.05, warmup_steps=2, weight_decay=0.1)
  total = 6

  tx = optim.make_optimizer(c, total)
  params = {"w": jnp.asarray(w0)}
  opt_state = tx.init(params)
  lrs = []
  for t in targets:
    grads = jax.grad(lambda p: jnp.sum((p["w"] - t) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    lrs.append(float(optim.current_lr(opt_state)))

  w = torch.tensor(w0, requires_grad=True)
  opt = torch.optim.AdamW([w], lr=c.lr, betas=(c.b1, c.b2), eps=c.eps,
                          weight_decay=c.weight_decay)

  def lam(step):
    if step < c.warmup_steps:
      return step / c.warmup_steps
    progress = (step - c.warmup_steps) / (total - c.warmup_steps)
    return 0.5 * (1 + np.cos(np.pi * progress))

  sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
  torch_lrs = []
  for t in targets:
    opt.zero_grad()
    ((w - torch.tensor(t)) ** 2).sum().backward()
    torch_lrs.append(opt.param_groups[0]["lr"])
    opt.step()
    sched.step()
  np.testing.assert_allclose(lrs, torch_lrs, rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(params["w"], w.detach().numpy(), rtol=1e-5,
                             atol=1e-6)


def test_grad_clip_bounds_the_first_moment():
  tx = optim.make_optimizer(cfg(lr=1.0, warmup_steps=0, grad_clip=1.0), 10)
  params = {"a": jnp.zeros(4), "b": jnp.zeros(3)}
  grads = {"a": jnp.full(4, 100.0), "b": jnp.full(3, -100.0)}
  _, state = tx.update(grads, tx.init(params), params)
  mu = state.inner_state[1][0].mu
  # mu = (1 - b1) * clipped grad, and the clipped grad has global norm 1.
  assert float(optax.tree.norm(mu)) == pytest.approx(0.1, rel=1e-5)


def test_freeze_regex_gives_zero_updates_and_no_moments():
  tx = optim.make_optimizer(cfg(lr=0.1, warmup_steps=0,
                                freeze="^encoder/"), 10)
  params = {"encoder": {"kernel": jnp.ones((2, 2))},
            "head": {"kernel": jnp.ones((2, 2))}}
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  np.testing.assert_array_equal(updates["encoder"]["kernel"], 0.0)
  assert np.all(np.asarray(updates["head"]["kernel"]) < 0)
  assert optim.param_path(
      jax.tree_util.tree_flatten_with_path(params)[0][0][0]) == (
          "encoder/kernel")
  assert float(optim.current_lr(state)) == pytest.approx(0.1)
  n_moment_leaves = sum(
      x.size for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) == 2)
  assert n_moment_leaves == 2 * 4  # mu and nu of the head kernel only
