"""Dispatch `python -m bsf_jax.bench NAME [flags]` to the benchmark `bsf_jax.bench.NAME`.

The benchmark's module is imported, not run as the program, so its flags are
its own (`tool_flags.flag_values`): `tool_flags.run_command` parses them in
process and gives each benchmark its `--help`.
"""

import importlib
import sys

from bsf_jax import bench
from bsf_jax import tool_flags

BENCHMARKS = ("data", "ssl", "infer", "scale")
_USAGE = (f"usage: python -m bsf_jax.bench {{{','.join(BENCHMARKS)}}} [flags]"
          "  (python -m bsf_jax.bench NAME --help: its flags)")


def main(argv: list[str]) -> int:
  """Runs the benchmark `argv` names (the words after the program name)."""
  if argv[:1] in (["-h"], ["--help"]):
    print(f"{bench.__doc__.strip()}\n\n{_USAGE}")
    return 0
  if not argv or argv[0] not in BENCHMARKS:
    print(f"{_USAGE}\n(got {argv[:1] or 'nothing'})", file=sys.stderr)
    return 2
  return tool_flags.run_command(importlib.import_module(f"bsf_jax.bench.{argv[0]}"), argv[1:])


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
