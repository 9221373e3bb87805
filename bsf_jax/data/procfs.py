"""Facts about a process that only Linux's /proc tells: `stat_field`.

Used by the data-worker watchdog (a dead worker's exit status, `workers.py`)
and the workdir lock (a PID's start time, to tell a reused PID from its
holder, `run/workdir_lock.py`). The fields are numbered as proc(5) numbers
them: https://man7.org/linux/man-pages/man5/proc_pid_stat.5.html
"""

from __future__ import annotations

# proc(5)'s number of the first field after the command name (field 2).
_FIRST_AFTER_COMM = 3


def stat_field(pid: int, field: int) -> int | None:
  """Field `field` of /proc/PID/stat as an integer, or None if unknown.

  None when the process is gone, /proc is missing (not Linux) or the kernel
  is too old to write that field.
  """
  try:
    with open(f"/proc/{pid}/stat") as f:
      # The command name (field 2) may contain spaces and parentheses: split
      # after its last ")".
      fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[field - _FIRST_AFTER_COMM])
  except (OSError, IndexError, ValueError):
    return None
