"""Dispatch `python -m bsf_jax.bench NAME ...` to `bsf_jax.bench.NAME.main`."""

import importlib
import sys

_BENCHMARKS = ("data", "ssl", "infer", "scale")


def main(argv: list[str]) -> int:
  if len(argv) < 2 or argv[1] not in _BENCHMARKS:
    print(f"usage: python -m bsf_jax.bench {{{','.join(_BENCHMARKS)}}} [flags]"
          f"  (got {argv[1:2] or 'nothing'})", file=sys.stderr)
    return 2
  module = importlib.import_module(f"bsf_jax.bench.{argv[1]}")
  return module.main([f"bsf_jax.bench {argv[1]}"] + argv[2:]) or 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
