"""The generic, sharded training step.

`make_train_step(loss_fn, ...)` returns one jitted pure function
`step(state, batch, rng) -> (state, metrics)` for any per-device
`loss_fn(params, batch, rng) -> (loss, metrics)`; the SSL objective lives in
`ssl_step.py`, the Dice objective in the fine-tuning trainer.

- The batch is a global array split over ("data", "fsdp"). The loss runs
  under `jax.shard_map` (`sharded_value_and_grad`): `loss_fn` sees this device's rows
  and the full parameters, returns this device's share (the global loss is
  the mean of the devices' values), and everything it computes stays on the
  device, as in PyTorch DDP. The only collectives are explicit: the pmean of
  the loss, metrics and gradients, and under FSDP the parameter all-gathers
  (`sharding.gather_params`) whose transpose reduce-scatters the gradients.
  A `loss_fn` may add its own (the SSL loss gathers contrastive embeddings
  for global negatives).
- `rng` is the same on every device: a `loss_fn` derives per-device or
  per-sample keys from it with `sharding.shard_index()`.
- The state is donated: its buffers are reused for the new state, so a step
  needs one copy of params and optimizer state, not two.
- Metrics are returned as replicated device scalars; the trainer fetches them
  every `config.train.log_every` steps, so the loop never waits on the host.
- Non-finite guard: if the loss or the gradient norm is NaN/Inf, the update
  is dropped with `jnp.where` (params and optimizer state stay bit-identical),
  `nonfinite_count` grows and `metrics["nonfinite"]` is 1. Under "skip",
  `step` still advances, so the next step folds a fresh key and the trainer's
  step counter stays aligned with the data stream. Under "halt", `step` does
  not advance either: the returned state is exactly the last good state plus
  the counter, and the trainer stops when it sees the flag, so a checkpoint
  written then resumes at the failing step.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from bsf_jax.step import optim, sharding, train_state
from bsf_jax.step.train_state import TrainState

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]

_NONFINITE_MODES = ("skip", "halt")


def sharded_value_and_grad(loss_fn: LossFn, mesh: Mesh,
                           param_specs: Any) -> Callable[..., Any]:
  """`((loss, metrics), grads)` of the global loss, from a per-device loss.

  Under `jax.shard_map`, each device differentiates its own share on its own
  rows, then the gradients are averaged explicitly: a pmean over all devices
  for replicated parameters; for FSDP-split ones the transpose of their
  all-gather (`sharding.gather_params`) already reduce-scattered them over
  "fsdp", and a psum over "data" completes the sum. XLA never sees a
  gradient it could reduce in another shape (the per-window expansion of a
  relative-position bias, say): what is reduced is the gradient of each
  parameter array.

  Args:
    loss_fn: per-device loss, see the module docstring.
    mesh: mesh from `sharding.create_mesh`.
    param_specs: PartitionSpecs of the params (`sharding.param_specs`).

  Returns:
    `f(params, batch, rng) -> ((loss, metrics), grads)` of global arrays:
    loss and metrics are the means over devices (replicated), grads have the
    params' shardings.
  """
  axes = sharding.DATA_AXES

  def body(params, batch, rng):
    def local(p):
      return loss_fn(sharding.gather_params(p, param_specs), batch, rng)

    (loss, metrics), grads = jax.value_and_grad(local, has_aux=True)(params)
    n = sharding.shard_count()

    def reduce(g, spec):
      if "fsdp" in tuple(spec):  # already summed over "fsdp"
        return jax.lax.psum(g, "data") / n
      return jax.lax.pmean(g, axes)

    grads = jax.tree.map(reduce, grads, param_specs)
    return jax.lax.pmean((loss, metrics), axes), grads

  # check_vma=False: the reductions above are explicit, and the models'
  # custom VJPs return device-varying cotangents for parameter-derived inputs.
  return jax.shard_map(body, mesh=mesh,
                       in_specs=(param_specs, P(axes), P()),
                       out_specs=((P(), P()), param_specs), check_vma=False)


def train_step(state: TrainState, batch: Any, rng: jax.Array, *,
               grad_fn: Callable[..., Any],
               optimizer: optax.GradientTransformation,
               nonfinite: str = "skip") -> tuple[TrainState, dict[str, Any]]:
  """One optimizer step (pure; jit it with `make_train_step`).

  Args:
    state: current TrainState.
    batch: pytree of arrays with a leading global batch dim.
    rng: base PRNG key, the same every step; the step's key is
      `fold_in(rng, state.step)`.
    grad_fn: (params, batch, rng) -> ((scalar loss, dict of scalar
      metrics), grads) of the global loss, from `sharded_value_and_grad`.
    optimizer: the optax transformation the state was created with.
    nonfinite: "skip" or "halt", see the module docstring.

  Returns:
    (new_state, metrics) with metrics: the loss_fn's, plus loss, grad_norm,
    param_norm (after the step), lr (applied this step) and nonfinite (0/1).
  """
  key = jax.random.fold_in(rng, state.step)
  (loss, aux), grads = grad_fn(state.params, batch, key)
  grad_norm = optax.tree.norm(grads)
  updates, new_opt_state = optimizer.update(grads, state.opt_state,
                                            state.params)
  new_params = optax.apply_updates(state.params, updates)

  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep_if_bad = lambda new, old: jax.tree.map(
      lambda n, o: jnp.where(finite, n, o), new, old)
  bad = jnp.logical_not(finite).astype(jnp.int32)
  advance = 1 if nonfinite == "skip" else 1 - bad
  new_state = state.replace(
      step=state.step + advance,
      params=keep_if_bad(new_params, state.params),
      opt_state=keep_if_bad(new_opt_state, state.opt_state),
      nonfinite_count=state.nonfinite_count + bad)
  metrics = dict(aux)
  metrics.update(loss=loss, grad_norm=grad_norm,
                 param_norm=optax.tree.norm(new_state.params),
                 lr=optim.current_lr(new_opt_state), nonfinite=bad)
  return new_state, metrics


def make_train_step(loss_fn: LossFn,
                    optimizer: optax.GradientTransformation,
                    mesh: Mesh,
                    state_sharding: Any,
                    *,
                    nonfinite: str = "skip",
                    donate: bool = True) -> Callable[..., Any]:
  """Jits `train_step` with NamedShardings in/out and the state donated.

  Args:
    loss_fn: per-device (params, batch, rng) -> (loss, metrics), see the
      module docstring.
    optimizer: the optax transformation the state was created with.
    mesh: mesh from `sharding.create_mesh`.
    state_sharding: from `train_state.create_train_state`.
    nonfinite: "skip" or "halt" (module docstring).
    donate: donate the input state (turn off only to compare states in tests).

  Returns:
    jitted `step(state, batch, rng) -> (state, metrics)`. The batch must be
    (or will be resharded to) `sharding.data_sharding(mesh)`; metrics are
    replicated scalars.
  """
  if nonfinite not in _NONFINITE_MODES:
    raise ValueError(f"nonfinite={nonfinite!r}; expected one of "
                     f"{_NONFINITE_MODES}")

  grad_fn = sharded_value_and_grad(
      loss_fn, mesh, sharding.param_specs(state_sharding.params))

  def step(state, batch, rng):
    return train_step(state, batch, rng, grad_fn=grad_fn,
                      optimizer=optimizer, nonfinite=nonfinite)

  repl = sharding.replicated(mesh)
  return jax.jit(step,
                 in_shardings=(state_sharding, sharding.data_sharding(mesh),
                               repl),
                 out_shardings=(state_sharding, repl),
                 donate_argnums=(0,) if donate else ())


def build(config: Any, model: Any, loss_fn: LossFn, mesh: Mesh):
  """A run's train step, uncompiled, with what it runs on.

  Args:
    config: the run's config (`optim`, `train`, `data.roi`, `data.modalities`, `mesh.fsdp`).
    model: the flax module.
    loss_fn: its per-device loss (module docstring).
    mesh: the run's mesh.

  Returns:
    (jitted step, abstract state, state shardings, optimizer): the state is
    abstract (`train_state.abstract_train_state`), so nothing is allocated.
  """
  optimizer = optim.make_optimizer(config.optim, config.train.num_steps)
  sample_shape = (1, *config.data.roi, len(config.data.modalities))
  abstract, state_sharding = train_state.abstract_train_state(
      model, optimizer, sample_shape, mesh, fsdp=config.mesh.fsdp != 1)
  step = make_train_step(loss_fn, optimizer, mesh, state_sharding,
                         nonfinite=config.train.nonfinite)
  return step, abstract, state_sharding, optimizer


def batch_spec(config: Any, labelled: bool, sharding: Any) -> dict[str, Any]:
  """The train batch as `jax.ShapeDtypeStruct`s (`make_train_iter`'s output).

  Args:
    config: the run's config.
    labelled: whether batches carry a "label" (segmentation) or not (SSL).
    sharding: the batch's sharding (`sharding.data_sharding(mesh)`).
  """
  b, roi = config.data.batch_size, tuple(config.data.roi)
  spec = {"image": jax.ShapeDtypeStruct(
      (b, *roi, len(config.data.modalities)), jnp.float32, sharding=sharding)}
  if labelled:
    spec["label"] = jax.ShapeDtypeStruct(
        (b, *roi, config.model.out_channels), jnp.float32, sharding=sharding)
  return spec


def compile_step(config: Any, model: Any, loss_fn: LossFn, labelled: bool,
                 mesh: Mesh, rng: jax.Array):
  """Compiles a run's train step from abstract state and batch (no data).

  What a run executes, compiled before any data is read or a checkpoint
  opened, so that `run/preflight.py` can measure it first.

  Args:
    config: the run's config.
    model: the flax module.
    loss_fn: its per-device loss (module docstring).
    labelled: whether batches carry a "label".
    mesh: the run's mesh.
    rng: the step key the run passes.

  Returns:
    (compiled step, abstract state, state shardings, optimizer).
  """
  step, abstract, state_sharding, optimizer = build(config, model, loss_fn, mesh)
  batch = batch_spec(config, labelled, sharding.data_sharding(mesh))
  compiled = step.lower(abstract, batch, rng).compile()
  return compiled, abstract, state_sharding, optimizer
