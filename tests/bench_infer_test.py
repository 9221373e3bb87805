"""`python -m bsf_jax.bench infer --ensemble`: the benchmark runs end to end.

The smallest setting with MONAI's reference loop beside it (at roi 32, MONAI's
InstanceNorm refuses the 1^3 bottleneck). Timings are not asserted: they are
the benchmark's output, not a test's. What must hold is that both sides ran
every case and computed the same probabilities.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("monai")


def test_ensemble_cases_run_and_agree_with_monai(tmp_path):
  out = str(tmp_path / "infer.json")
  result = subprocess.run(
      [sys.executable, "-m", "bsf_jax.bench", "infer", "--feature", "12", "--roi", "64",
       "--volume", "64,64,64", "--size", "1,1,1,1", "--ensemble", "2", "--mirror-axes", "x",
       "--json", out], capture_output=True, text=True, timeout=1200,
      env=dict(os.environ, XLA_FLAGS=""))  # one CPU device, as a user runs it
  assert result.returncode == 0, result.stderr[-3000:]
  cases = json.load(open(out))["cases"]
  assert [(c["models"], c["flips"], c["passes"]) for c in cases] == [(1, 1, 1), (2, 1, 2), (2, 2, 4)]
  for case in cases:
    assert case["jax_s"] > 0 and case["monai_s"] > 0 and case["single_passes"] > 0, case
    assert case["max_prob_diff"] <= 1e-4, case
