r"""One-shot GPU check: parity on the GPU, the stage-1 step matrix, whole-volume inference.

  python3 launch/gpu_check.py --out DIR [--budget-s 470]

Run from the repository root on a machine with one NVIDIA GPU (H100/H200).
Python packages the repo needs that the GPU image may lack are installed
first from `.whl/` when it exists (`launch/gpu_wheels.sh` fills it). Writes
DIR/gpu_check.json (everything measured) and DIR/gpu_check.md (the tables), and
DIR/gpu_check.log (each sub-command's output). Within the time budget it runs,
most important first:

  (b) the stage-1 SSL train step at its per-device shape (Tiny, 96^3, 4 crops
      = 8 views) for impl x dtype x attention kernel x remat: step time, MFU
      (against a matmul peak measured in the same process) and peak device
      memory, beside the PyTorch reference step with AMP (bf16 autocast) on
      the same GPU, measured in this run;
  (c) sliding-window inference of one 4x240x240x155 volume against MONAI's
      `sliding_window_inference` with AMP; then, at roi 128, the ensembles
      challenge teams run: 1 model, 5 models and 5 models x 8 flips, against
      the same loop over MONAI's sliding window (`bench infer --ensemble 5`),
      with the 5 models vmapped together and one at a time;
  (a) tests/models_test.py (every model parity test, per impl, forward and
      backward) on the GPU at "highest" and at default matmul precision;
  (d) `bench scale --native`: the real stage-1 and stage-3 train steps
      compiled for this GPU, XLA:GPU's per-device memory against the
      device's capacity (what the run's memory pre-flight checks), with and
      without remat.

Work that would not fit the budget is recorded as skipped, never silently
dropped. Each sub-command runs in its own process, so peak memory is its own.
`--only ensemble` (or any comma list of ssl, infer, ensemble, tests, scale)
runs those parts alone, for a session with little device time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # Run as a script, from launch/: the package is the repository's.
  sys.path.insert(0, ROOT)
from bsf_jax import tool_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

# (name, bench ssl flags, with the reference, seconds it is expected to need).
SSL_CASES = [
    ("xla-bf16-einsum-none", "--impl xla --dtype bf16 --attention einsum --remat none", True, 90),
    ("xla-fp32-einsum-none", "--impl xla --dtype fp32 --attention einsum --remat none", False, 60),
    ("xla-bf16-cudnn-none", "--impl xla --dtype bf16 --attention cudnn --remat none", False, 60),
    ("xla-bf16-xla_dpa-none", "--impl xla --dtype bf16 --attention xla_dpa --remat none", False, 60),
    ("xla-bf16-einsum-block", "--impl xla --dtype bf16 --attention einsum --remat block", False, 60),
    ("xla-bf16-einsum-dots", "--impl xla --dtype bf16 --attention einsum --remat dots_saveable",
     False, 60),
    ("xla-fp32-einsum-block", "--impl xla --dtype fp32 --attention einsum --remat block", False, 60),
    ("xla-fp32-xla_dpa-none", "--impl xla --dtype fp32 --attention xla_dpa --remat none", False, 60),
    ("xla-bf16-cudnn-block", "--impl xla --dtype bf16 --attention cudnn --remat block", False, 60),
    ("cpu-bf16-einsum-none", "--impl cpu --dtype bf16 --attention einsum --remat none", False, 90),
    ("cpu-fp32-einsum-none", "--impl cpu --dtype fp32 --attention einsum --remat none", False, 90),
]
INFER_CASES = [
    ("infer-xla-bf16", "--impl xla --dtype bf16", 90),
    ("infer-xla-fp32", "--impl xla --dtype fp32", 60),
]
# The 5 x 8 ensemble at roi 128 (BraTS fine-tuning's), 46 passes per side:
# all 5 models vmapped together (the accelerator default), then one at a time.
ENSEMBLE_CASES = [
    ("ensemble5x8-xla-bf16", "--impl xla --dtype bf16 --ensemble 5", 240),
    ("ensemble5x8-xla-bf16-step1", "--impl xla --dtype bf16 --ensemble 5 --models-per-step 1",
     240),
]
PARTS = ("ssl", "infer", "ensemble", "tests", "scale")
TEST_CASES = [("models_test-highest", "highest", 150), ("models_test-default", "default", 120)]
# bench scale on the GPU itself: per-device shapes of stage 1 (4 crops) and stage 3 (1 crop).
SCALE_CASE = ("scale-native", "--native --devices 1 --sizes tiny --meshes dp --dtypes bf16 "
              "--remat none,block --stages 1,3", 150)

FLAGS = tool_flags.flag_values(__name__)
flags.DEFINE_string("out", None, "folder of gpu_check.json, gpu_check.md and gpu_check.log",
                    flag_values=FLAGS)
flags.mark_flag_as_required("out", flag_values=FLAGS)
flags.DEFINE_float("budget-s", 470.0, "start no new work past this many seconds",
                   flag_values=FLAGS)
flags.DEFINE_string("only", ",".join(PARTS),
                    f"comma list of the parts to run, of {','.join(PARTS)} (default: all)",
                    flag_values=FLAGS)
flags.register_validator("only", lambda only: not set(only.split(",")) - set(PARTS),
                         f"expected a comma list of {', '.join(PARTS)}", flag_values=FLAGS)
flags.DEFINE_bool("smoke", False, "tiny shapes, two cases of each kind, the reference on the CPU: "
                  "checks this script itself on a machine without a GPU", flag_values=FLAGS)


def _install_wheels(log) -> None:
  wheels = os.path.join(ROOT, ".whl")
  if not os.path.isdir(wheels):
    return
  target = "/tmp/bsf_site"
  cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
         "--no-compile", "--no-cache-dir", "--upgrade", "--target", target]
  cmd += [os.path.join(wheels, w) for w in sorted(os.listdir(wheels)) if w.endswith(".whl")]
  out = subprocess.run(cmd, capture_output=True, text=True)
  log.write(f"$ pip install .whl/* -> {out.returncode}\n{out.stdout}{out.stderr}\n")
  os.environ["PYTHONPATH"] = os.pathsep.join(
      [ROOT, target] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def _run(cmd: list[str], timeout: float, log, env=None) -> tuple[int, float]:
  t0 = time.perf_counter()
  log.write(f"\n$ {' '.join(cmd)}\n")
  log.flush()
  try:
    rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT,
                        env=env).returncode
  except subprocess.TimeoutExpired:
    rc = 124
  return rc, time.perf_counter() - t0


def _environment() -> dict:
  info = {"python": sys.version.split()[0]}
  try:
    info["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
         "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
  except (OSError, subprocess.TimeoutExpired) as e:
    info["nvidia_smi"] = f"unavailable: {e}"
  probe = ("import jax, flax, torch; print(jax.__version__, flax.__version__, torch.__version__,"
           " jax.devices(), torch.cuda.is_available())")
  out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
  info["versions_and_devices"] = (out.stdout + out.stderr).strip()[-2000:]
  return info


def _pytest_summary(xml_path: str) -> dict:
  if not os.path.exists(xml_path):
    return {"error": "no junit report"}
  suite = ET.parse(xml_path).getroot()
  suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
  failed = [c.get("name") for c in suite.iter("testcase")
            if c.find("failure") is not None or c.find("error") is not None]
  return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {
      "failed": failed, "time_s": float(suite.get("time", 0))}


def main(argv: list[str]) -> int:
  tool_flags.parse(FLAGS, argv)
  out_dir, budget_s, smoke = FLAGS.out, FLAGS["budget-s"].value, FLAGS.smoke
  only = set(FLAGS.only.split(","))
  os.makedirs(out_dir, exist_ok=True)
  start = time.perf_counter()
  left = lambda: budget_s - (time.perf_counter() - start)
  results = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": budget_s,
             "ssl": {}, "infer": {}, "ensemble": {}, "tests": {}, "scale": {}}
  tmp = tempfile.mkdtemp(prefix="gpu_check_")
  log_path = os.path.join(out_dir, "gpu_check.log")
  with open(log_path, "w") as log:
    _install_wheels(log)
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    if not smoke:
      env.pop("JAX_PLATFORMS", None)
    results["environment"] = _environment()
    log.write(json.dumps(results["environment"], indent=2) + "\n")

    def bench(kind, name, case_flags, estimate, extra, part=None):
      part = part or kind
      if part not in only:
        return
      if left() < estimate:
        results[part][name] = {"skipped": f"time budget ({left():.0f} s left, needs ~{estimate} s)"}
        return
      out_json = os.path.join(tmp, name + ".json")
      # The case's own flags last: they override the shared ones.
      cmd = [sys.executable, "-m", "bsf_jax.bench", kind, *extra, *case_flags.split(),
             "--json", out_json]
      rc, wall = _run(cmd, min(left() + 30, max(240, 1.5 * estimate)), log, env)
      entry = {"rc": rc, "wall_s": wall, "command": " ".join(cmd[1:])}
      if os.path.exists(out_json):
        with open(out_json) as f:
          data = json.load(f)
        entry.update(data if isinstance(data, dict) else {"rows": data})
      results[part][name] = entry
      _write(out_dir, results)

    torch_device = "cpu" if smoke else "cuda"
    ssl_common = ["--no-reexec", "--size", "tiny", "--roi", "96", "--batch", "4", "--steps", "5",
                  "--in-channels", "2"]
    infer_common = ["--volume", "240,240,155", "--in-channels", "4", "--roi", "96",
                    "--sw-batch", "4", "--overlap", "0.5", "--mode", "gaussian",
                    "--torch-device", torch_device, "--amp"]
    ssl_cases, test_filter = SSL_CASES, []
    ensemble_cases = ENSEMBLE_CASES
    if smoke:
      ssl_common = ["--no-reexec", "--size", "1,1,1,1", "--roi", "64", "--batch", "1",
                    "--steps", "5", "--in-channels", "2", "--feature-size", "12"]
      # roi 64: MONAI's instance norm refuses the 1^3 bottleneck of roi 32.
      infer_common[1], infer_common[5], infer_common[7] = "64,64,48", "64", "2"
      infer_common += ["--feature", "12", "--size", "1,1,1,1"]
      ssl_cases, test_filter = [SSL_CASES[0], SSL_CASES[2]], ["-k", "impl_choice"]
      # 2 models x 2 flips with the CPU kernels: the orchestration, in minutes.
      ensemble_cases = [(name, case_flags.replace("--ensemble 5", "--ensemble 2 --mirror-axes x")
                         .replace("--impl xla --dtype bf16", "--impl cpu --dtype fp32"), estimate)
                        for name, case_flags, estimate in ENSEMBLE_CASES]
    # BraTS fine-tuning's window (roi 128) for the ensembles.
    ensemble_common = [*infer_common, "--roi", "128" if not smoke else "64"]
    for name, case_flags, reference, estimate in ssl_cases[:6]:
      ref = ["--reference", "--torch-device", torch_device, "--amp"] if reference else []
      bench("ssl", name, case_flags, estimate, ssl_common + ref)
    bench("infer", *INFER_CASES[0][:2], INFER_CASES[0][2], infer_common)
    for name, case_flags, estimate in ensemble_cases:
      bench("infer", name, case_flags, estimate, ensemble_common, part="ensemble")
    for name, precision, estimate in TEST_CASES:
      if "tests" not in only:
        break
      if left() < estimate:
        results["tests"][name] = {"skipped": f"time budget ({left():.0f} s left)"}
        continue
      xml_path = os.path.join(tmp, name + ".xml")
      cmd = [sys.executable, "-m", "pytest", "tests/models_test.py", "-q", "-n", "4",
             "-p", "no:cacheprovider", f"--junitxml={xml_path}", *test_filter]
      rc, wall = _run(cmd, min(left(), estimate * 1.5), log,
                      dict(env, BSF_TEST_MATMUL_PRECISION=precision,
                           XLA_PYTHON_CLIENT_MEM_FRACTION="0.2"))
      results["tests"][name] = {"rc": rc, "wall_s": wall} | _pytest_summary(xml_path)
      _write(out_dir, results)
    for name, case_flags, _, estimate in ssl_cases[6:]:
      bench("ssl", name, case_flags, estimate, ssl_common)
    if not smoke:
      bench("infer", *INFER_CASES[1][:2], INFER_CASES[1][2], infer_common)
    scale_name, scale_flags, scale_estimate = SCALE_CASE
    bench("scale", scale_name, scale_flags, scale_estimate,
          ["--feature-size", "12", "--roi", "64"] if smoke else [])
  results["total_s"] = time.perf_counter() - start
  _write(out_dir, results)
  print(open(os.path.join(out_dir, "gpu_check.md")).read())
  return 0


def _gib(b):
  return "-" if b is None else f"{b / 2**30:.2f}"


def _write(out: str, results: dict) -> None:
  with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(results, f, indent=2, default=str)
  lines = [f"# GPU check ({results['started']})", "",
           f"Environment: `{results.get('environment', {})}`", "",
           "## Stage-1 SSL step (Tiny, 96^3, 4 crops = 8 views, per device)", "",
           "| case | rc | median step s | MFU | peak mem GiB | compile s | loss@0 |",
           "|---|---|---|---|---|---|---|"]
  reference = None
  for name, r in results["ssl"].items():
    if "skipped" in r:
      lines.append(f"| {name} | skipped: {r['skipped']} | | | | | |")
      continue
    if "reference_median_step_s" in r:
      reference = r
    lines.append(f"| {name} | {r.get('rc')} | {r.get('median_step_s', float('nan')):.4f} | "
                 f"{r.get('mfu', float('nan')):.3f} | {_gib(r.get('peak_memory_bytes'))} | "
                 f"{r.get('compile_s', float('nan')):.1f} | {r.get('loss_step0', float('nan')):.5f} |")
  if reference:
    lines += ["", f"PyTorch reference (TorchSSLHead + SSLLoss + AdamW, CUDA, bf16 autocast), same run: "
              f"median step {reference['reference_median_step_s']:.4f} s, peak memory "
              f"{_gib(reference.get('reference_peak_memory_bytes'))} GiB, loss@0 "
              f"{reference.get('reference_loss_step0', float('nan')):.5f}.", "",
              "| case | step time / PyTorch AMP |", "|---|---|"]
    for name, r in results["ssl"].items():
      if "median_step_s" in r:
        lines.append(f"| {name} | {r['median_step_s'] / reference['reference_median_step_s']:.3f} |")
  lines += ["", "## Sliding-window inference, 4x240x240x155, roi 96, sw_batch 4, overlap 0.5, gaussian",
            "", "| case | rc | bsf_jax s | MONAI AMP s | MONAI / bsf_jax | max prob diff | peak GiB |",
            "|---|---|---|---|---|---|---|"]
  for name, r in results["infer"].items():
    if "skipped" in r:
      lines.append(f"| {name} | skipped: {r['skipped']} | | | | | |")
    else:
      lines.append(f"| {name} | {r.get('rc')} | {r.get('jax_s', float('nan')):.3f} | "
                   f"{r.get('monai_s', float('nan')):.3f} | {r.get('speedup', float('nan')):.2f} | "
                   f"{r.get('max_prob_diff', float('nan')):.2e} | {_gib(r.get('peak_memory_bytes'))} |")
  lines += ["", "## Ensembles, 4x240x240x155, roi 128, sw_batch 4, overlap 0.5, gaussian "
            "(`bench infer --ensemble 5`)", "",
            "| run | models per step | case | passes | bsf_jax s | MONAI AMP loop s | MONAI / bsf_jax "
            "| bsf_jax / one pass | max prob diff | compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
  for name, r in results.get("ensemble", {}).items():
    if "skipped" in r or not r.get("cases"):
      lines.append(f"| {name} | {r.get('skipped') or 'rc ' + str(r.get('rc')) + ', no result'} "
                   "| | | | | | | | |")
      continue
    for c in r["cases"]:
      lines.append(f"| {name} | {r.get('models_per_step') or 'all'} | {c['case']} | {c['passes']} | "
                   f"{c['jax_s']:.2f} | {c['monai_s']:.2f} | {c['speedup']:.2f} | "
                   f"{c['single_passes']:.1f} | {c['max_prob_diff']:.2e} | {c['compile_s']:.1f} |")
  lines += ["", "## Model parity tests on the GPU (tests/models_test.py)", "",
            "| precision | rc | tests | failures | errors | failed |", "|---|---|---|---|---|---|"]
  for name, r in results["tests"].items():
    if "skipped" in r:
      lines.append(f"| {name} | skipped: {r['skipped']} | | | | |")
    else:
      lines.append(f"| {name} | {r.get('rc')} | {r.get('tests')} | {r.get('failures')} | "
                   f"{r.get('errors')} | {', '.join(r.get('failed', []))} |")
  lines += ["", "## Train-step memory on this device (bench scale --native, per-device shapes)", "",
            "| case | stage | remat | arg GiB | out GiB | temp GiB | capacity GiB | compile s |",
            "|---|---|---|---|---|---|---|---|"]
  for name, r in results.get("scale", {}).items():
    if "skipped" in r:
      lines.append(f"| {name} | skipped: {r['skipped']} | | | | | | |")
      continue
    if not r.get("rows"):
      lines.append(f"| {name} | rc {r.get('rc')}, no rows | | | | | | |")
    for row in r.get("rows", []):
      lines.append(f"| {name} | {row['stage']} | {row['remat']} | {_gib(row.get('argument_bytes'))} | "
                   f"{_gib(row.get('output_bytes'))} | {_gib(row.get('temp_bytes'))} | "
                   f"{_gib(row.get('capacity_bytes'))} | {row.get('compile_s')} |")
  with open(os.path.join(out, "gpu_check.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  tool_flags.run(main)
