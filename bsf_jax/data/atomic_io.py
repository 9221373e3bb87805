"""Output files that are either complete or absent: write, fsync, rename.

Every file that `export`, `predict` and `evaluate` write goes through here.
The data is written to a hidden temporary file in the target's own folder
(so the final rename never crosses file systems), flushed to disk, and only
then renamed onto the target name (`os.replace`, atomic on POSIX). A writer
that is interrupted or runs out of disk leaves the earlier file at the
target name untouched, and no file at all where there was none. Missing
parent folders are created.

The temporary name ends with the target's own name, because some writers
pick the format from the suffix (nibabel's `.nii.gz`, matplotlib's `.png`).
A process killed mid-write can leave such a hidden `.partial-*` file behind;
it is never mistaken for an output.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from typing import IO, Iterator


class OutputError(RuntimeError):
  """An output file could not be written (disk full, permissions, ...)."""


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _explain(error: OSError, target: str, existed: bool) -> OutputError:
  folder = os.path.dirname(target)
  kept = (f"the earlier {target} is unchanged" if existed
          else f"nothing was written to {target}")
  if error.errno in (errno.ENOSPC, errno.EDQUOT):
    try:
      free = f", {shutil.disk_usage(folder).free / 2**20:.0f} MiB free"
    except OSError:
      free = ""
    return OutputError(f"No space left on the device of {folder} (or quota "
                       f"exceeded{free}) while writing {target}; {kept}")
  return OutputError(f"Cannot write {target}: {error.strerror or error} "
                     f"({type(error).__name__}); {kept}")


@contextlib.contextmanager
def atomic_path(target: str) -> Iterator[str]:
  """Yields a temporary path to write; renamed onto `target` on success.

  Raises:
    OutputError: an OSError while creating, writing or renaming (one line
      naming the target; says the earlier output was kept).
  """
  target = os.path.abspath(target)
  folder = os.path.dirname(target)
  existed = os.path.exists(target)
  tmp = None
  try:
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-",
                               suffix="-" + os.path.basename(target),
                               dir=folder)
    os.close(fd)
    yield tmp
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())
    # mkstemp makes the file private (0600); outputs get the usual mode.
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, target)
    tmp = None
    with contextlib.suppress(OSError):  # Make the rename itself durable.
      dir_fd = os.open(folder, os.O_RDONLY)
      try:
        os.fsync(dir_fd)
      finally:
        os.close(dir_fd)
  except OSError as e:
    raise _explain(e, target, existed) from e
  finally:
    if tmp is not None:
      with contextlib.suppress(OSError):
        os.remove(tmp)


@contextlib.contextmanager
def open_atomic(target: str, mode: str = "w", **kwargs) -> Iterator[IO]:
  """`open(target, mode)` whose file appears only once fully written."""
  with atomic_path(target) as tmp:
    with open(tmp, mode, **kwargs) as f:
      yield f


def write_bytes(target: str, data: bytes) -> None:
  with open_atomic(target, "wb") as f:
    f.write(data)


def write_text(target: str, text: str) -> None:
  with open_atomic(target, "w") as f:
    f.write(text)
