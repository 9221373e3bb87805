"""Train state and its sharded initialisation.

The state is a plain pytree (no model or optimizer functions inside), so Orbax
can save it as is and `jax.jit` can donate it.

Initialisation as in the Flax and big_vision examples: `jax.eval_shape(init)` gives abstract
shapes, `sharding.state_shardings` turns them into NamedShardings, and
`jax.jit(init, out_shardings=...)` materialises every array directly in its
final layout on the devices. No full copy of the parameters ever lives on the
host, which matters once FSDP splits them over devices.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from bsf_jax.step import sharding


_FAST_COMPILE = {"xla_backend_optimization_level": 0,
                 "xla_llvm_disable_expensive_passes": True}


class TrainState(struct.PyTreeNode):
  """Everything a training step reads and writes.

  Attributes:
    step: int32 scalar; number of train steps run (skipped ones included).
    params: model parameters (float32).
    opt_state: optimizer state.
    nonfinite_count: int32 scalar; steps skipped for a non-finite loss or
      gradient.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  nonfinite_count: jax.Array


def _init_fn(model, optimizer, sample_input_shape):
  if len(sample_input_shape) != 5:
    raise ValueError(f"sample_input_shape={tuple(sample_input_shape)} must be "
                     "5-D (batch, H, W, D, channels)")

  def init(rng):
    x = jnp.zeros(sample_input_shape, jnp.float32)
    params_rng, dropout_rng = jax.random.split(rng)
    variables = model.init({"params": params_rng, "dropout": dropout_rng}, x,
                           deterministic=True)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params),
                      nonfinite_count=jnp.zeros((), jnp.int32))

  return init


def abstract_train_state(model: nn.Module,
                         optimizer: optax.GradientTransformation,
                         sample_input_shape: tuple[int, ...],
                         mesh: Mesh,
                         fsdp: bool) -> tuple[TrainState, Any]:
  """The state's shapes, dtypes and shardings, without computing anything.

  What a restore or a compile-only run needs (`jax.ShapeDtypeStruct` leaves
  carrying their NamedSharding); see `create_train_state` for the args.

  Returns:
    (abstract_state, state_sharding).
  """
  init = _init_fn(model, optimizer, sample_input_shape)
  abstract = jax.eval_shape(init, jax.random.key(0))
  state_sharding = sharding.state_shardings(abstract, mesh, fsdp)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract, state_sharding), state_sharding


def create_train_state(model: nn.Module,
                       optimizer: optax.GradientTransformation,
                       rng: jax.Array,
                       sample_input_shape: tuple[int, ...],
                       mesh: Mesh,
                       fsdp: bool) -> tuple[TrainState, Any]:
  """Initialises model and optimizer directly on the devices, sharded.

  Args:
    model: a linen module called as `model(x, deterministic=True)`.
    optimizer: the optax transformation (e.g. `optim.make_optimizer`).
    rng: PRNG key for the parameter init.
    sample_input_shape: input shape, e.g. (1, 96, 96, 96, 2) (NDHWC); only
      shapes are traced, the batch size does not affect the parameters.
    mesh: mesh from `sharding.create_mesh`.
    fsdp: shard params and optimizer state over the mesh's "fsdp" axis.

  Returns:
    (state, state_sharding): the initialised state and the pytree of
    NamedShardings it lives in (pass it to `train_step.make_train_step`).
  """
  init = _init_fn(model, optimizer, sample_input_shape)
  _, state_sharding = abstract_train_state(model, optimizer,
                                           sample_input_shape, mesh, fsdp)
  # Init runs once, so XLA's backend optimisations only cost time here: on
  # CPU they make compiling the init ~5x slower (160 s -> 29 s measured for
  # the tiny test model) for no gain worth having.
  # (Only at top level: inside a trace, e.g. jax.eval_shape of this function,
  # JAX refuses compiler options on the nested jit.)
  options = None if isinstance(rng, jax.core.Tracer) else _FAST_COMPILE
  state = jax.jit(init, out_shardings=state_sharding,
                  compiler_options=options)(rng)
  return state, state_sharding
