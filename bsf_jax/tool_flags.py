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
them with the tool's own flags, every call from the defaults. A program that runs
tools as its commands (`python -m bsf_jax.bench data ...`) imports them, so their
flags are their own too: `run_command` calls `main` in process and gives each
command what app.run gives a program, its `--help` and its error messages.
"""

import sys
import types
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


_HELP_WORDS = ("-h", "--help", "-help", "--helpshort", "--helpfull")


def run_command(tool: types.ModuleType, argv: Sequence[str]) -> int:
  """Runs the tool `tool` (a module with `FLAGS` and `main`) as a program's command.

  Args:
    tool: the command's module.
    argv: the words after the command's name.

  Returns:
    The exit code: `main`'s, 0 for --help (which prints the module's
    docstring and flags), 1 for a flag or word the tool does not take (which
    prints why).
  """
  argv = list(argv)
  flag_words = argv[:argv.index("--")] if "--" in argv else argv
  if any(word in _HELP_WORDS for word in flag_words):
    print(f"{(tool.__doc__ or '').rstrip()}\n\nFlags:\n{tool.FLAGS.get_help(prefix='  ')}")
    return 0
  try:
    return tool.main(argv) or 0
  except (flags.Error, app.UsageError) as e:
    print(f"FATAL Flags parsing error: {e}\nPass --help to see the command's flags.",
          file=sys.stderr)
    return 1
