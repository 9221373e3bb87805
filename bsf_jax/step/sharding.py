"""Device mesh and shardings for data parallelism and FSDP.

The mesh has two axes, ("data", "fsdp"), built from `config.mesh`:

- The batch is split over *both* axes (every device sees different samples);
  `data_sharding(mesh)` puts the leading batch dim on ("data", "fsdp").
- Parameters and optimizer state are replicated over "data" and, when the
  "fsdp" axis is larger than 1, split over "fsdp" along one dimension per array
  (ZeRO-3 style).
- The loss runs under `jax.shard_map` over both axes (`train_step`): each
  device computes on its own rows only, so no activation ever crosses devices.
  The collectives are explicit: under FSDP each parameter is all-gathered over
  "fsdp" for the forward (`gather_params`), whose transpose reduce-scatters
  its gradient; the gradients of replicated parameters are all-reduced.

"fsdp" is the inner (fastest-varying) mesh axis, so an FSDP group is a set of
neighbouring devices, i.e. the devices of one host whenever fsdp <= local
device count; the weight all-gathers then stay on the fast intra-node links.

Both axes are `AxisType.Auto` (GSPMD propagation from the jit in/out
shardings), because `jax.make_mesh` defaults to explicit-sharding axes, which
would make every op in the model carry sharding types.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")

# Arrays smaller than this stay replicated under FSDP: sharding biases and
# norm scales saves nothing and adds a collective per array.
FSDP_MIN_SIZE = 2**12


def default_config() -> ml_collections.ConfigDict:
  """Returns the `config.mesh` block."""
  c = ml_collections.ConfigDict()
  # Data-parallel axis size; -1 = all devices not used by `fsdp`.
  c.data = -1
  # FSDP axis size (params and optimizer state are split over it); 1 = plain
  # data parallelism with replicated params, as in the reference (DDP).
  c.fsdp = 1
  # Use only the first N devices (0 = all): debugging on one GPU of a node,
  # or tests on 1 of 8 fake CPU devices.
  c.num_devices = 0
  return c


def create_mesh(cfg: ml_collections.ConfigDict,
                devices: list[jax.Device] | None = None) -> Mesh:
  """Builds the ("data", "fsdp") mesh over all (global) devices.

  Args:
    cfg: the `config.mesh` block; at most one of `data`/`fsdp` may be -1.
    devices: devices to use; defaults to `jax.devices()` (all processes).

  Returns:
    A `jax.sharding.Mesh` with Auto axis types.
  """
  devices = list(jax.devices() if devices is None else devices)
  if cfg.get("num_devices", 0) > 0:
    if cfg.num_devices > len(devices):
      raise ValueError(f"config.mesh.num_devices={cfg.num_devices} but only "
                       f"{len(devices)} devices are available")
    devices = devices[:cfg.num_devices]
  n = len(devices)
  sizes = [int(cfg.data), int(cfg.fsdp)]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh data={cfg.data} fsdp={cfg.fsdp}: sizes must "
                     "be positive, with at most one -1")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if n % known:
      raise ValueError(f"config.mesh data={cfg.data} fsdp={cfg.fsdp}: {n} "
                       f"devices are not divisible by {known}")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise ValueError(f"config.mesh data={cfg.data} fsdp={cfg.fsdp} needs "
                     f"{math.prod(sizes)} devices, but {n} are available")
  return jax.make_mesh(tuple(sizes), DATA_AXES,
                       axis_types=(AxisType.Auto,) * 2, devices=devices)


def shard_index() -> jax.Array:
  """This device's position along the batch axes, inside `jax.shard_map`.

  Rows [i * b, (i + 1) * b) of the global batch live on shard i, b the
  per-device batch (the order of `data_sharding`).
  """
  return jax.lax.axis_index(DATA_AXES)


def row_keys(key: jax.Array, rows: int) -> jax.Array:
  """Inside `jax.shard_map`: one key per row of this device's `rows` rows.

  Row r of the global batch gets `fold_in(key, r)`, so what a row draws
  depends on its place in the global batch, never on how many devices
  share the batch.
  """
  first = shard_index() * rows
  return jax.vmap(jax.random.fold_in, (None, 0))(key, first + jnp.arange(rows))


def shard_count() -> int:
  """Number of batch shards (devices), inside `jax.shard_map`."""
  return jax.lax.axis_size(DATA_AXES)


def param_specs(shardings: Any) -> Any:
  """The PartitionSpecs of a pytree of NamedShardings (shard_map in_specs)."""
  return jax.tree.map(lambda s: s.spec, shardings)


def gather_params(params: Any, specs: Any) -> Any:
  """Inside `jax.shard_map`: the full parameters from their FSDP shards.

  Each leaf split over "fsdp" is all-gathered along its split dim; the
  transpose of the gather (in the backward pass) is a reduce-scatter of its
  gradient. Replicated leaves are returned as they are.
  """
  def gather(x, spec):
    for dim, name in enumerate(spec):
      if name == "fsdp":
        return jax.lax.all_gather(x, "fsdp", axis=dim, tiled=True)
    return x
  return jax.tree.map(gather, params, specs)


def process_local_mesh(mesh: Mesh) -> Mesh:
  """This process's devices of `mesh`, as a data-only mesh.

  Fine-tuning's validation: each process predicts its own volumes, their
  sliding windows split over its devices (so `seg.sw_batch_size` must divide
  their number; `config_lib.validate` checks it).
  """
  local = [d for d in mesh.devices.flat
           if d.process_index == jax.process_index()]
  return create_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}),
                     devices=local)


def gather_to_process(mesh: Mesh, local_mesh: Mesh):
  """A function: a (maybe FSDP-sharded) tree on `mesh` -> whole on `local_mesh`.

  Every process must call it together (an FSDP tree is all-gathered over
  `mesh`). The result's arrays are made of the gathered copies already on
  this process's devices (`jax.make_array_from_single_device_arrays`): no
  second transfer.
  """
  gather = jax.jit(lambda tree: tree, out_shardings=replicated(mesh))
  target = replicated(local_mesh)

  def local(x: jax.Array) -> jax.Array:
    on = {shard.device: shard.data for shard in x.addressable_shards}
    return jax.make_array_from_single_device_arrays(
        x.shape, target, [on[d] for d in local_mesh.devices.flat])

  return lambda tree: jax.tree.map(local, gather(tree))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch: leading dim split over all devices."""
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of a fully replicated array (scalars, metrics, DP params)."""
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int,
              min_size: int = FSDP_MIN_SIZE) -> P:
  """PartitionSpec splitting one dim of `shape` over "fsdp".

  The largest dim divisible by the axis size is chosen (ties: the last one,
  usually the output features of a kernel). Small arrays, and arrays with no
  divisible dim, stay replicated.

  Args:
    shape: array shape.
    fsdp_size: size of the "fsdp" mesh axis.
    min_size: arrays with fewer elements stay replicated.

  Returns:
    The PartitionSpec.
  """
  if fsdp_size <= 1 or math.prod(shape) < min_size:
    return P()
  best = None
  for i, d in enumerate(shape):
    if d % fsdp_size == 0 and (best is None or d >= shape[best]):
      best = i
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = "fsdp"
  return P(*spec)


def state_shardings(abstract_state: Any, mesh: Mesh,
                    fsdp: bool | None = None) -> Any:
  """NamedShardings for every leaf of a (train) state.

  Args:
    abstract_state: pytree of arrays or `jax.ShapeDtypeStruct`s, e.g. from
      `jax.eval_shape`.
    mesh: mesh from `create_mesh`.
    fsdp: shard large arrays over "fsdp"; None = when that axis is > 1. With
      True the mesh must have an "fsdp" axis larger than 1.

  Returns:
    A pytree of NamedShardings with the structure of `abstract_state`.
  """
  fsdp_size = mesh.shape["fsdp"]
  if fsdp is None:
    fsdp = fsdp_size > 1
  if fsdp and fsdp_size <= 1:
    raise ValueError(f"FSDP requested but the mesh {dict(mesh.shape)} has no "
                     "fsdp axis > 1; set config.mesh.fsdp")
  size = fsdp_size if fsdp else 1
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), size)),
      abstract_state)
