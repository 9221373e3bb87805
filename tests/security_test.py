"""No code path unpickles untrusted data (issue 7, item 5).

A malicious pickle whose `__reduce__` creates a file when unpickled is fed to
every entry point that reads PyTorch files: the `bsf_jax.weights.weight_files` library
function and CLI, and `config.init_from` (stage transfer, as the loop calls
it). Each must refuse it, and the file must never appear. At the end the same payload
is unpickled the unsafe way to prove that it is live, so the test cannot pass
because the payload was a dud.

Also covered: the decoded-volume cache refuses pickled `.npy` files, and a
source scan keeps pickle-based loading out of the package. Config files are
Python code by design (documented in config_lib.py and docs/reliability.md);
nothing reads a config back from a checkpoint: the workdir's config.json is
JSON data (evaluate.py and report.py read it as such), never code.
"""

import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Payload:
  """Unpickling this calls open(marker, "w"): it creates `marker`."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


@pytest.fixture()
def evil(tmp_path):
  """Malicious files in the formats we accept, and the marker they create."""
  torch = pytest.importorskip("torch")
  marker = str(tmp_path / "PWNED")
  state = {"state_dict": {"swinViT.patch_embed.proj.weight":
                          torch.zeros(12, 2, 2, 2, 2),
                          "evil": _Payload(marker)}}
  files = {}
  files["zip.pt"] = tmp_path / "model_zip.pt"
  torch.save(state, files["zip.pt"])  # The zip format torch writes today.
  files["legacy.pth"] = tmp_path / "model_legacy.pth"
  files["legacy.pth"].write_bytes(pickle.dumps(state, protocol=2))
  return {k: str(v) for k, v in files.items()}, marker


def test_convert_library_refuses_malicious_pickle(evil):
  from bsf_jax.weights import weight_files
  files, marker = evil
  for path in files.values():
    with pytest.raises(Exception, match="[Ww]eights.only|[Uu]npickl"):
      weight_files.load_torch_file(path)
    assert not os.path.exists(marker), path
  _assert_payload_is_live(files, marker)


def test_init_from_refuses_malicious_pickle(evil):
  from bsf_jax.weights import transfer
  files, marker = evil
  for path in files.values():
    with pytest.raises(transfer.TransferError) as info:
      transfer.load_source(path)
    assert path in str(info.value), str(info.value)
    assert not os.path.exists(marker), path
  _assert_payload_is_live(files, marker)


def test_convert_cli_refuses_malicious_pickle(evil, tmp_path):
  """`python -m bsf_jax.convert --from evil.pt` in a subprocess.

  (`main --config.init_from=evil.pt` reaches the same `transfer.load_source`
  tested above, after a model init that costs minutes of compile on 2 cores.)
  """
  files, marker = evil
  for path in files.values():
    result = subprocess.run(
        [sys.executable, "-m", "bsf_jax.convert", f"--from={path}",
         f"--to={tmp_path / 'converted'}", "--kind=swin_unetr"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, result.stdout
    # Refused by the loader, not failing for another reason.
    assert re.search(r"[Ww]eights.only|Unpickling", result.stderr), (
        result.stderr[-3000:])
    assert not os.path.exists(marker), result.stderr[-3000:]
    assert not os.path.exists(tmp_path / "converted")
  _assert_payload_is_live(files, marker)


def _assert_payload_is_live(files, marker):
  """Control: unpickling the same file unsafely does create the marker."""
  import torch
  assert not os.path.exists(marker)
  torch.load(files["zip.pt"], weights_only=False)  # The unsafe way, on purpose.
  assert os.path.exists(marker), "the malicious payload was a dud"
  os.remove(marker)


def test_volume_cache_refuses_pickled_npy(tmp_path):
  """A poisoned decoded-volume cache entry is refused, not unpickled."""
  from bsf_jax.data import io
  src = io.write_volume(str(tmp_path / "t1.nii.gz"),
                        np.ones((8, 8, 8), np.float32), np.eye(4))
  cache = str(tmp_path / "cache")
  io.read_volume(src, cache_dir=cache)  # Creates the entry.
  entry = io._cache_path(src, cache)  # pylint: disable=protected-access
  marker = str(tmp_path / "PWNED")
  np.save(entry + ".npy", np.array([_Payload(marker)], dtype=object),
          allow_pickle=True)
  # np.load(mmap_mode="r") refuses object arrays before unpickling anything.
  with pytest.raises(ValueError, match="pickle|Python objects"):
    io.read_volume(src, cache_dir=cache)
  assert not os.path.exists(marker)


# Patterns that would unpickle (or run) untrusted input if they appeared in
# the package. torch.load is allowed only with weights_only=True.
_FORBIDDEN = {
    r"^\s*(import|from)\s+(pickle|cPickle|dill|cloudpickle|joblib)\b":
        "pickle-family import",
    r"allow_pickle\s*=\s*True": "np.load(allow_pickle=True)",
    r"\byaml\.(unsafe_)?load\(": "yaml.load",
    r"(?<![\w.])(eval|exec)\(": "eval/exec",
    r"\.from_pretrained\(|torch\.hub": "remote model loading",
}


def test_package_has_no_unpickling_code_paths():
  offenders = []
  for folder in ("bsf_jax", "configs"):
    for dirpath, _, names in os.walk(os.path.join(ROOT, folder)):
      for name in names:
        if not name.endswith(".py"):
          continue
        path = os.path.join(dirpath, name)
        with open(path) as f:
          source = f.read()
        for pattern, what in _FORBIDDEN.items():
          for m in re.finditer(pattern, source, flags=re.M):
            line = source[:m.start()].count("\n") + 1
            offenders.append(f"{path}:{line}: {what}")
        # Every torch.load call must pass weights_only=True.
        for m in re.finditer(r"torch\.load\(", source):
          call = source[m.start():source.find(")", m.start()) + 1]
          if "weights_only=True" not in call:
            line = source[:m.start()].count("\n") + 1
            offenders.append(f"{path}:{line}: torch.load without "
                             "weights_only=True")
  assert not offenders, "\n".join(offenders)


def test_config_json_is_data_only():
  """The resolved config.json is JSON data, never code.

  Configs are code; the only code that loads one is absl's --config flag (a
  file the user names) and config_lib.load_file, which configs/demo.py uses for
  its sibling stage files. So no other package module loads Python from a path,
  no package module calls load_file (it is for config files and tests only),
  and the modules that read a workdir's config.json (evaluate.py, report.py:
  which model/protocol a run used) parse it with json.load, which cannot run
  code.
  """
  offenders = []
  config_loader = os.path.join(ROOT, "bsf_jax", "run", "config_lib.py")
  # `bench scale` compiles the real stage configs, and executes only the
  # repository's own configs/stage1.py and configs/stage3.py, by names it
  # fixes itself (never a path from a workdir or a flag).
  repo_config_users = {os.path.join(ROOT, "bsf_jax", "bench", "scale.py")}
  for dirpath, _, names in os.walk(os.path.join(ROOT, "bsf_jax")):
    for name in (n for n in names if n.endswith(".py")):
      path = os.path.join(dirpath, name)
      with open(path) as f:
        source = f.read()
      if path != config_loader and re.search(
          r"spec_from_file_location|runpy|config_flags\.DEFINE_config_"
          r"(dict|json)", source):
        offenders.append(f"{path}: loads Python code from a path")
      if path not in repo_config_users and re.search(
          r"config_lib\.load_file\(|\bload_file\(.*config", source):
        offenders.append(f"{path}: executes a config file")
      for m in re.finditer(r"with open\(([^)]*)\) as (\w+):\n(.*)", source):
        if "config" in m.group(1) and '"w"' not in m.group(1):
          if not re.search(rf"json\.load\({m.group(2)}\)", m.group(3)) and (
              "json.load" not in source[m.end():m.end() + 200]):
            offenders.append(f"{path}: reads {m.group(1)} without json.load")
  assert not offenders, offenders
