"""How every `python -m bsf_jax...` tool reads its command line (absl flags).

A tool defines its flags at module level on `FLAGS = tool_flags.flag_values(__name__)`:
absl's global `flags.FLAGS` when the module runs as the program, so that `app.run`
parses the command line as in any absl program (`--help`, `--flagfile`, the
logging flags, `--config.*` overrides), and a `FlagValues` of the module's own
when it is imported. absl keeps one registry in which a name is defined once, and
tools share names (`--out`, `--workers`, `--workdir`, `--step`), so tools imported
into one process (a test session) must not define theirs there.

A tool's `main(argv)` takes the words after the program name and starts with
`parse(FLAGS, argv)`. Run as the program (`run`), app.run has parsed them already;
called in process (`check.main(["--datalist", path])`, as tests do), `parse` reads
them with the tool's own flags, every call from the defaults.
"""

import sys
from typing import Callable, Sequence

from absl import app, flags


def flag_values(module_name: str) -> flags.FlagValues:
  """Where the module named `module_name` (its `__name__`) defines its flags."""
  return flags.FLAGS if module_name == "__main__" else flags.FlagValues()


def parse(flag_values: flags.FlagValues, argv: Sequence[str] | None,
          positional: bool = False) -> list[str]:
  """The words of a tool's command line that are not flags, its flags parsed.

  Args:
    flag_values: the tool's `FLAGS`.
    argv: the words after the program name (None: sys.argv's).
    positional: whether the tool takes words that are not flags.

  Raises:
    app.UsageError: words the tool does not take.
    flags.Error: in process, a flag that is unknown, malformed or missing
      (run as the program, app.run reports these itself).
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  if flag_values is not flags.FLAGS:  # In process: app.run has not parsed them.
    flag_values.unparse_flags()  # This call's values, not the last call's.
    # config_flags looks for `--config.*` overrides in sys.argv, not in the
    # words it is given.
    saved, sys.argv = sys.argv, [sys.argv[0], *argv]
    try:
      argv = flag_values(sys.argv)[1:]
    finally:
      sys.argv = saved
  if argv and not positional:
    raise app.UsageError(f"Unexpected arguments: {argv}")
  return argv


def run(main: Callable[[list[str]], int | None]) -> None:
  """Runs a tool as the program: app.run parses sys.argv, `main` gets the rest."""
  app.run(lambda argv: main(argv[1:]))
