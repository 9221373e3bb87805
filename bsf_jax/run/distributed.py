"""Multi-host (multi-controller) JAX initialisation.

`initialize(config.distributed)` is called once at program start, before any
other JAX call. Where the settings come from, first match wins:

1. Explicit: `coordinator_address` (or env `JAX_COORDINATOR_ADDRESS`) with
   `num_processes`/`process_id` (config, or env `JAX_NUM_PROCESSES` /
   `JAX_PROCESS_ID`). JAX's own cluster auto-detection is switched off, so a
   stray SLURM environment cannot override what was asked for.
2. SLURM, when launched by `srun`: coordinator = first node of the step,
   port derived from the job id (as JAX does), process count/id from
   SLURM_NTASKS / SLURM_PROCID.
3. Nothing: a single process; `initialize` does nothing.

Devices per process under SLURM (`local_device_ids`, "" = auto):
- one task per node (process-per-node): the process drives every GPU it can
  see. JAX's own auto-detection would instead pin it to GPU SLURM_LOCALID
  (i.e. GPU 0) and silently use 1 of 8 GPUs (jax#16788).
- several tasks per node, each already restricted to one GPU by SLURM
  (`--gpus-per-task=1`, CUDA_VISIBLE_DEVICES holds one id): use that device.
  Pinning to SLURM_LOCALID here would ask for a GPU index that is not visible
  (jax#28194).
- several tasks per node that all see every GPU (process-per-GPU, the usual
  `--ntasks-per-node=8 --gpus-per-node=8`): GPU SLURM_LOCALID, as JAX does.
`local_device_ids="all"` or "0,1,..." overrides the rule.

Half-set SLURM variables (e.g. running `python` inside `salloc` without
`srun`, so SLURM_JOB_ID is set but the step variables are not) make JAX's
auto-detection crash with a KeyError (jax#23452); here they give an error
naming the missing variables, or, with SLURM_NTASKS=1, a single process.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping

from absl import logging
import ml_collections

_SLURM_STEP_VARS = ("SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                    "SLURM_LOCALID")


def default_config() -> ml_collections.ConfigDict:
  """Returns the `config.distributed` block (all unset = auto-detect)."""
  c = ml_collections.ConfigDict()
  # "host:port" of process 0's coordinator; "" = env JAX_COORDINATOR_ADDRESS,
  # else SLURM, else single process.
  c.coordinator_address = ""
  # Total number of processes; -1 = env JAX_NUM_PROCESSES or SLURM_NTASKS.
  c.num_processes = -1
  # This process's index; -1 = env JAX_PROCESS_ID or SLURM_PROCID.
  c.process_id = -1
  # Local device ids this process drives: "" = auto (module docstring),
  # "all" = every visible device, "0,1" = explicit ids.
  c.local_device_ids = ""
  # Seconds to wait for all processes to connect.
  c.initialization_timeout = 300
  return c


@dataclasses.dataclass(frozen=True)
class Plan:
  """Resolved arguments for `jax.distributed.initialize`."""
  coordinator_address: str
  num_processes: int
  process_id: int
  local_device_ids: tuple[int, ...] | None  # None = all visible devices
  source: str  # "config", "env" or "slurm"


def _parse_ids(text: str, where: str) -> tuple[int, ...] | None:
  text = text.strip()
  if text == "all":
    return None
  try:
    return tuple(int(t) for t in text.split(","))
  except ValueError:
    raise ValueError(f"{where}={text!r}: expected 'all' or comma-separated "
                     "device ids like '0,1'") from None


def _env_int(env: Mapping[str, str], name: str) -> int:
  try:
    return int(env[name])
  except ValueError:
    raise ValueError(f"environment variable {name}={env[name]!r} is not an "
                     "integer") from None


def _first_node(nodelist: str) -> str:
  """First host of a SLURM nodelist: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
  m = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist)
  if m is None:
    raise ValueError(f"SLURM_STEP_NODELIST={nodelist!r} is not a node list")
  return m.group(1) + (m.group(2) or "")


def _slurm_plan(cfg, env: Mapping[str, str]) -> Plan | None:
  present = [v for v in _SLURM_STEP_VARS if v in env]
  if not present:
    logging.info("SLURM_JOB_ID is set but no srun step variables: running "
                 "as a single process (launch with srun for multi-host)")
    return None
  if "SLURM_NTASKS" in env and _env_int(env, "SLURM_NTASKS") == 1:
    return None
  missing = [v for v in _SLURM_STEP_VARS if v not in env]
  if missing:
    raise ValueError(
        f"SLURM environment is half set: {', '.join(missing)} missing while "
        f"{', '.join(present)} are set. Launch every process with `srun`, or "
        "set config.distributed.coordinator_address/num_processes/process_id "
        "explicitly.")
  ntasks = _env_int(env, "SLURM_NTASKS")
  nnodes = _env_int(env, "SLURM_STEP_NUM_NODES") if (
      "SLURM_STEP_NUM_NODES" in env) else None
  port = env.get("JAX_COORDINATOR_PORT") or str(
      _env_int(env, "SLURM_JOB_ID") % 2**12 + (65535 - 2**12 + 1))
  if cfg.local_device_ids:
    ids = _parse_ids(cfg.local_device_ids, "config.distributed.local_device_ids")
  elif nnodes is not None and ntasks == nnodes:
    ids = None  # process-per-node: drive all visible GPUs
  elif len([d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",")
            if d.strip()]) == 1:
    ids = None  # SLURM already bound one GPU to this task
  else:
    ids = (_env_int(env, "SLURM_LOCALID"),)  # process-per-GPU
  return Plan(coordinator_address=(
      f"{_first_node(env['SLURM_STEP_NODELIST'])}:{port}"),
              num_processes=ntasks,
              process_id=_env_int(env, "SLURM_PROCID"),
              local_device_ids=ids, source="slurm")


def resolve(cfg: ml_collections.ConfigDict,
            env: Mapping[str, str] | None = None) -> Plan | None:
  """Decides how to initialise, without touching JAX.

  Args:
    cfg: the `config.distributed` block.
    env: environment variables; defaults to `os.environ`.

  Returns:
    A Plan, or None for a single process.
  """
  env = os.environ if env is None else env
  address = cfg.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS", "")
  if address:
    source = "config" if cfg.coordinator_address else "env"
    n = cfg.num_processes if cfg.num_processes >= 0 else (
        _env_int(env, "JAX_NUM_PROCESSES") if "JAX_NUM_PROCESSES" in env
        else -1)
    pid = cfg.process_id if cfg.process_id >= 0 else (
        _env_int(env, "JAX_PROCESS_ID") if "JAX_PROCESS_ID" in env else -1)
    if n < 1 or not 0 <= pid < n:
      raise ValueError(
          f"coordinator_address={address!r} (from {source}) needs "
          f"num_processes >= 1 and 0 <= process_id < num_processes; got "
          f"num_processes={n}, process_id={pid} (config.distributed or env "
          "JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
    ids = (_parse_ids(cfg.local_device_ids,
                      "config.distributed.local_device_ids")
           if cfg.local_device_ids else None)
    return Plan(address, n, pid, ids, source)
  if cfg.num_processes > 1 or cfg.process_id >= 0:
    raise ValueError(
        f"config.distributed.num_processes={cfg.num_processes}, process_id="
        f"{cfg.process_id} set without coordinator_address")
  if "SLURM_JOB_ID" in env:
    return _slurm_plan(cfg, env)
  return None


def initialize(cfg: ml_collections.ConfigDict) -> Plan | None:
  """Initialises multi-host JAX as `resolve` decides; no-op on one process.

  Must run before any other JAX call (device queries included).

  Args:
    cfg: the `config.distributed` block.

  Returns:
    The Plan used, or None for a single process.
  """
  import jax  # pylint: disable=g-import-not-at-top

  plan = resolve(cfg)
  if plan is not None:
    logging.info("jax.distributed.initialize from %s: coordinator=%s "
                 "process %d/%d local_device_ids=%s", plan.source,
                 plan.coordinator_address, plan.process_id,
                 plan.num_processes, plan.local_device_ids or "all")
    jax.distributed.initialize(
        coordinator_address=plan.coordinator_address,
        num_processes=plan.num_processes, process_id=plan.process_id,
        local_device_ids=(list(plan.local_device_ids)
                          if plan.local_device_ids is not None else None),
        cluster_detection_method="deactivate",
        initialization_timeout=cfg.initialization_timeout)
  logging.info("JAX process %d/%d, local devices %s, %d global devices",
               jax.process_index(), jax.process_count(), jax.local_devices(),
               jax.device_count())
  return plan
