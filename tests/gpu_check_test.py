"""`launch/gpu_check.py` builds bench command lines that the benchmarks accept.

The GPU check runs only on a lent GPU, where a command line a benchmark
refuses would cost device time; here every command it would run is recorded
instead of run, and parsed with that benchmark's own flags.
"""

import importlib
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def gpu_check(monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(ROOT, "launch"))
  module = importlib.import_module("gpu_check")
  commands = []

  def record(cmd, timeout, log, env=None):
    del timeout, log, env
    commands.append(cmd)
    return 0, 0.0

  monkeypatch.setattr(module, "_run", record)
  monkeypatch.setattr(module, "_environment", dict)
  monkeypatch.setattr(module, "_install_wheels", lambda log: None)
  return module, commands


@pytest.mark.parametrize("extra", [[], ["--smoke"]], ids=["full", "smoke"])
def test_every_bench_command_line_parses(gpu_check, extra, tmp_path):
  from bsf_jax.bench import common  # pylint: disable=g-import-not-at-top
  module, commands = gpu_check
  assert module.main(["--out", str(tmp_path), "--budget-s", "1e9", *extra]) == 0
  benches = [c for c in commands if c[1:3] == ["-m", "bsf_jax.bench"]]
  kinds = {c[3] for c in benches}
  assert kinds == {"ssl", "infer", "scale"}, kinds
  for cmd in benches:
    assert cmd[0] == sys.executable
    bench = importlib.import_module(f"bsf_jax.bench.{cmd[3]}")
    args = common.parse(bench.FLAGS, cmd[4:])  # Raises on a flag it does not take.
    assert args.json, cmd  # Every measurement lands in the check's results.
