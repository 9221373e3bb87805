"""One writer per workdir: a lock file held for the whole training run.

Two runs writing checkpoints into one workdir corrupt each other's resume
state (and a starting run's Orbax manager removes the other's in-flight
temporary save). That happens on clusters: a requeued SLURM job can start
while its previous incarnation is still dying, and a user can submit twice.

`hold(workdir)` creates `workdir/run.lock` atomically (written under a
temporary name, then hard-linked into place, which is atomic on local file
systems and NFS alike) with the holder's host, PID, process start time and
SLURM job id and restart count. A second run refuses with a message naming
the holder. A lock is stale, and taken over with a warning, when

- its holder ran on this host and that process is gone (or the PID now
  belongs to a process started later), or
- it was written by an earlier incarnation of this very SLURM job
  (`scontrol requeue` keeps the job id and raises SLURM_RESTART_COUNT).

A lock from another host and another job cannot be checked from here; the
message says which file to delete once that run is known to be gone.

With several processes, process 0 takes the lock and the others wait for
its outcome (a broadcast, i.e. a barrier), so all of them start or all
refuse. The lock is removed when the run ends, also on errors; a killed run
leaves it behind, and the rules above let the next start take it over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import sys
import time
from typing import Any, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from bsf_jax.data import procfs

LOCK_NAME = "run.lock"


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir."""


def lock_path(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), LOCK_NAME)


def _start_ticks(pid: int) -> int | None:
  """The process's start time in clock ticks since boot (Linux), or None."""
  return procfs.stat_field(pid, 22)


def _alive(pid: int, start_ticks: int | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # Exists, owned by someone else.
  now = _start_ticks(pid)
  # A different start time: the PID was reused by a later process (in a
  # container a restarted job often gets the same small PID).
  return start_ticks is None or now is None or now == start_ticks


def holder_record() -> dict[str, Any]:
  """What the lock says about this process."""
  env = os.environ
  return dict(
      host=socket.gethostname(), pid=os.getpid(),
      pid_start_ticks=_start_ticks(os.getpid()),
      slurm_job_id=env.get("SLURM_JOB_ID") or None,
      slurm_restart_count=int(env.get("SLURM_RESTART_COUNT") or 0),
      started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
      command=" ".join(sys.argv)[:500], token=secrets.token_hex(8))


def describe(record: dict[str, Any]) -> str:
  job = record.get("slurm_job_id")
  return (f"host {record.get('host')}, PID {record.get('pid')}"
          + (f", SLURM job {job}" if job else "")
          + (f" (restart {record['slurm_restart_count']})"
             if job and record.get("slurm_restart_count") else "")
          + f", started {record.get('started')}")


def stale_reason(record: dict[str, Any], me: dict[str, Any]) -> str | None:
  """Why a lock with `record` may be taken over by `me`, or None."""
  if record.get("host") == me["host"] and isinstance(record.get("pid"), int):
    if not _alive(record["pid"], record.get("pid_start_ticks")):
      return f"its process {record['pid']} on {me['host']} is gone"
  job = record.get("slurm_job_id")
  if job and job == me["slurm_job_id"] and (
      int(record.get("slurm_restart_count") or 0) <
      me["slurm_restart_count"]):
    return (f"SLURM job {job} was requeued (restart "
            f"{me['slurm_restart_count']} now runs)")
  return None


def _read(path: str) -> dict[str, Any] | None:
  """The lock's record; None if it vanished; raises if it is unreadable."""
  try:
    with open(path) as f:
      text = f.read()
  except FileNotFoundError:
    return None
  try:
    record = json.loads(text)
    if not isinstance(record, dict):
      raise ValueError("not a JSON object")
    return record
  except ValueError as e:
    raise WorkdirLockedError(
        f"Lock file {path} is unreadable ({e}); if no run uses this workdir, "
        f"delete it") from None


def _create(path: str, record: dict[str, Any]) -> bool:
  """Creates the lock with `record` unless it exists; True on success."""
  tmp = f"{path}.{record['token']}.tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  try:
    os.link(tmp, path)  # Fails if the lock exists; never half-written.
    return True
  except FileExistsError:
    return False
  except OSError:
    # A file system without hard links: exclusive create, then write.
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      json.dump(record, f, indent=1)
    return True
  finally:
    os.remove(tmp)


class Lock:
  """A held workdir lock (see `acquire`)."""

  def __init__(self, path: str, record: dict[str, Any]):
    self.path, self.record = path, record

  def release(self) -> None:
    """Removes the lock if it is still this run's."""
    try:
      current = _read(self.path)
    except WorkdirLockedError:
      return
    if current is not None and current.get("token") == self.record["token"]:
      os.remove(self.path)


def acquire(workdir: str) -> Lock:
  """Takes `workdir`'s lock for this process (creating the workdir).

  Raises:
    WorkdirLockedError: a live run holds it (the message names it).
  """
  os.makedirs(workdir, exist_ok=True)
  path = lock_path(workdir)
  me = holder_record()
  for _ in range(5):  # Retries only when the lock changed under us.
    if _create(path, me):
      return Lock(path, me)
    record = _read(path)
    if record is None:
      continue  # Released in between: try again.
    reason = stale_reason(record, me)
    if reason is None:
      raise WorkdirLockedError(
          f"{os.path.abspath(workdir)} is in use by another run ("
          f"{describe(record)}; lock {path}). Wait for it to end or stop it; "
          f"if it is no longer running, delete {path}")
    # Take over: move the stale lock aside, and make sure it was the one we
    # judged (a third run may have replaced it meanwhile).
    aside = f"{path}.{me['token']}.stale"
    try:
      os.rename(path, aside)
    except FileNotFoundError:
      continue
    taken = _read(aside)
    if taken is not None and taken.get("token") != record.get("token"):
      with contextlib.suppress(FileExistsError):
        os.link(aside, path)  # Not the stale one: put it back.
      os.remove(aside)
      continue
    os.remove(aside)
    logging.warning("Took over the stale lock %s (%s): %s", path,
                    describe(record), reason)
  raise WorkdirLockedError(f"Could not take {path}: it keeps changing; "
                           "another run is starting on this workdir")


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[Lock | None]:
  """Holds `workdir`'s lock for the body; process 0 takes it for all.

  A workdir that this creates and that holds nothing when the body fails is
  removed again, so a run that fails its start-up checks leaves no trace.
  """
  created = not os.path.isdir(workdir)
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = acquire(workdir)
    except WorkdirLockedError as e:
      error = e
  if jax.process_count() > 1:
    ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not ok and error is None:
      error = WorkdirLockedError(
          f"Process 0 could not lock {os.path.abspath(workdir)}; its log "
          "names the run holding it")
  if error is not None:
    raise error
  failed = True
  try:
    yield lock
    failed = False
  finally:
    if lock is not None:
      lock.release()
      if failed and created:
        with contextlib.suppress(OSError):
          os.rmdir(workdir)  # Only if empty.
