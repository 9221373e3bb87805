"""Grain data workers whose death never hangs a run.

Grain's `mp_prefetch` (grain/_src/python/dataset/transformations/
process_prefetch.py) sends each element from its worker process through a
`multiprocessing.Queue`, i.e. a pipe. A message larger than 16 KiB is written
in several `write` calls (CPython multiprocessing/connection.py,
`_send_bytes`), and a pipe holds 64 KiB, so while the trainer is busy a
worker waits in the middle of writing a batch. A worker killed then (the
kernel's out-of-memory killer, a crash in a decoder) leaves half a message in
the pipe. Grain's reader thread looks at the worker's exit code only when the
queue seems empty; here it sees data, so it blocks in `Connection.recv_bytes`
for the rest, which never comes (the parent holds the pipe's write end too,
so there is no end-of-file either), and the trainer's `next()` waits forever.
When the parent is then killed, the other workers live on as orphans blocked
in a pipe write of their own. docs/reliability.md has the stack dumps.

Two remedies, both here:

- `WatchedIterator` runs Grain's `next()` in a helper thread and meanwhile
  checks every `POLL_S` seconds that each worker process is alive. A worker
  killed by a signal or exiting with a non-zero code raises `WorkerDiedError`
  (one line: which worker, its PID, how it died) at once. The helper is a
  daemon thread and the broken Grain iterator is set aside, never closed (its
  `close()` would join Grain's stuck thread), so neither the error nor the
  process's exit can hang. A worker that exits with code 0 has already sent
  Grain its error, which Grain then raises itself.
- Every worker exits when its parent process is gone (`_exit_with_parent`),
  so a killed trainer leaves no worker behind.

Workers learn nothing else from us: each writes its PID into a folder of its
iterator (`worker_init_fn`), which is all the watchdog needs to tell this
iterator's workers from any other process.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import tempfile
import threading
import time
import weakref
from typing import Any, Callable

import grain
import psutil

from bsf_jax.data import procfs

# How often a waiting `next()` checks the workers, and a worker its parent.
POLL_S = 0.5
# How long a worker found already reaped (exit status unknown) leaves Grain
# to raise its own error before ours.
GRACE_S = 10.0
# Grain iterators with a dead worker: kept, so that garbage collection never
# closes them (closing joins a thread that waits forever).
_SET_ASIDE: list[Any] = []


class WorkerDiedError(RuntimeError):
  """A data worker process died while the trainer waited for its data."""


def _register(pid_dir: str, index: int, count: int) -> None:
  """Grain `worker_init_fn`, in worker `index` of `count`."""
  del count
  path = os.path.join(pid_dir, str(index))
  with open(path + ".tmp", "w") as f:
    f.write(str(os.getpid()))
  os.replace(path + ".tmp", path)
  threading.Thread(target=_exit_with_parent, args=(os.getppid(),),
                   daemon=True, name="bsf-exit-with-parent").start()


def _exit_with_parent(parent: int) -> None:
  # Linux's PR_SET_PDEATHSIG would fire when the parent *thread* that started
  # the worker ends, and Grain starts workers from short-lived threads.
  while os.getppid() == parent:
    time.sleep(POLL_S)
  os._exit(1)


def _wait_status(pid: int) -> int | None:
  """A zombie's wait status (/proc/PID/stat field 52, Linux >= 3.5)."""
  return procfs.stat_field(pid, 52)


def _how_it_died(status: int | None) -> str | None:
  """Words for a wait status; None for a normal exit (code 0)."""
  if status is None:
    return "exited (status unknown)"
  if status & 0x7F:
    sig = status & 0x7F
    name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
    hint = " (the kernel's out-of-memory killer sends it)" if sig == signal.SIGKILL else ""
    return f"was killed by signal {sig} {name}{hint}"
  code = (status >> 8) & 0xFF
  return f"exited with code {code}" if code else None


class WatchedIterator(grain.DatasetIterator):
  """A Grain iterator with worker processes whose `next()` cannot hang.

  `get_state` / `set_state` are Grain's, so Orbax checkpoints it as any
  Grain iterator.
  """

  def __init__(self, make: Callable[[Callable[[int, int], None]], Any],
               workers: int):
    """`make(worker_init_fn)` -> the Grain iterator; `workers` its processes."""
    self._pid_dir = tempfile.mkdtemp(prefix="bsf_jax_data_workers_")
    weakref.finalize(self, shutil.rmtree, self._pid_dir, True)
    super().__init__(make(functools.partial(_register, self._pid_dir)))
    self._workers = workers
    self._known: dict[int, tuple[int, float]] = {}  # index -> (pid, start)
    self._error: WorkerDiedError | None = None

  def __next__(self):
    if self._error is not None:
      raise self._error
    result: dict[str, Any] = {}

    def call():
      try:
        result["value"] = next(self._parent)
      except BaseException as e:  # pylint: disable=broad-exception-caught
        result["error"] = e

    thread = threading.Thread(target=call, daemon=True, name="bsf-data-next")
    thread.start()
    thread.join(POLL_S)
    unknown_since = None
    while thread.is_alive():
      death, known = self._dead_worker()
      if death is not None and not known:
        # Reaped already, so Grain saw it: its own error, which may say
        # more, is probably on its way.
        unknown_since = unknown_since or time.monotonic()
      if death is not None and (
          known or time.monotonic() - unknown_since > GRACE_S):
        self._error = WorkerDiedError(death)
        _SET_ASIDE.append(self._parent)
        raise self._error
      thread.join(POLL_S)
    if "error" in result:
      raise result["error"]
    return result["value"]

  def _dead_worker(self) -> tuple[str | None, bool]:
    """(a one-line account of a dead worker of this iterator or None, whether
    its wait status was read)."""
    for index in range(self._workers):
      if index not in self._known:
        try:
          with open(os.path.join(self._pid_dir, str(index))) as f:
            pid = int(f.read())
          self._known[index] = (pid, psutil.Process(pid).create_time())
        except (OSError, ValueError, psutil.Error):
          continue  # Not started yet (or already gone: Grain reports that).
      pid, start = self._known[index]
      status = None
      try:
        process = psutil.Process(pid)
        if process.create_time() == start:
          if process.status() != psutil.STATUS_ZOMBIE:
            continue
          status = _wait_status(pid)
      except psutil.NoSuchProcess:
        pass  # Reaped (by Grain), or the PID now belongs to another process.
      how = _how_it_died(status)
      if how is not None:
        return (f"data worker {index} of {self._workers} (PID {pid}) {how}; "
                "the run stops here and resumes from its last checkpoint when "
                "restarted (if memory ran out: fewer data.workers or "
                "data.read_threads, or a smaller data.prefetch)"), status is not None
    return None, False

  def get_state(self) -> dict[str, Any]:
    if self._error is not None:
      raise self._error
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    if self._error is not None:
      raise self._error
    self._parent.set_state(state)

  def close(self) -> None:
    if self._closed:
      return
    self._closed = True
    if self._error is None:
      self._parent.close()


class WatchedDataset:
  """An iterable whose every `iter()` is a fresh `WatchedIterator`."""

  def __init__(self, ds: grain.IterDataset, options: grain.MultiprocessingOptions):
    self._ds, self._options = ds, options

  def __iter__(self) -> WatchedIterator:
    return WatchedIterator(
        lambda init: iter(self._ds.mp_prefetch(self._options, worker_init_fn=init)),
        self._options.num_workers)
