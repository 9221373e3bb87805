"""Bad-input catalogue (issue 7, item 4): every case fails loudly and names it.

Each test feeds one broken input to the real code path and checks three
things: the exception type (or, for the CLI, a non-zero exit), that the
message names the culprit (file, key, shape or value), and, where a workdir
exists, that nothing in it was destroyed. docs/reliability.md lists the cases.

Data cases go through `pipeline.make_train_iter` (the path training takes) on
tiny hand-written NIfTI files, so they cost milliseconds. Config cases call
`config_lib` / `loop` directly; CLI cases run `python -m bsf_jax.main` in
subprocesses, started together so their JAX imports overlap. Checkpoint cases
share one 2-step stage-1 workdir.
"""

import gzip
import hashlib
import json
import os
import re

import numpy as np
import pytest

from bsf_jax.run import config_lib
from bsf_jax.data import DataError
from bsf_jax.data import io
from bsf_jax.data import pipeline

SHAPE = (40, 40, 40)


def _volume(seed, shape=SHAPE):
  """A positive blob inside a zero border: has foreground, like a brain."""
  rng = np.random.default_rng(seed)
  data = np.zeros(shape, np.float32)
  inner = tuple(slice(4, max(5, s - 4)) for s in shape)
  data[inner] = rng.uniform(100, 1000, size=data[inner].shape)
  return data


def _write(path, data):
  return io.write_volume(str(path), data, np.eye(4))


def _ukb(tmp_path, subjects=2, t1=None, flair=None):
  """A UKB-style datalist of `subjects`; subject 0's files may be replaced."""
  items = []
  for i in range(subjects):
    paths = []
    for m, override in (("t1", t1), ("flair", flair)):
      p = tmp_path / f"s{i}_{m}.nii.gz"
      if i == 0 and override is not None:
        override(p)
      else:
        _write(p, _volume(10 * i + len(m)))
      paths.append(str(p))
    items.append({"image": paths})
  return _datalist(tmp_path, {"training": items, "validation": items[:1]})


def _datalist(tmp_path, content):
  path = tmp_path / "datalist.json"
  path.write_text(json.dumps(content) if not isinstance(content, str)
                  else content)
  return str(path)


def _cfg(datalist, dataset="ukb", **kw):
  cfg = pipeline.default_config()
  cfg.update(dict(dataset=dataset, datalist=datalist, root="", roi=(32, 32, 32),
                  batch_size=2, num_samples=2, workers=0, val_fraction=0.0))
  if dataset == "ukb":
    cfg.modalities = ("t1", "flair")
  elif dataset == "brats":
    cfg.update(dict(modalities=("flair", "t1ce", "t1", "t2"),
                    label_format="brats", fold=1))
  cfg.update(kw)
  return cfg


def _first_batch(cfg, task="ssl"):
  it = pipeline.make_train_iter(cfg, task=task, seed=0, process_index=0,
                                process_count=1)
  # Two volumes per subject list: subject 0 is in the first two batches.
  return [next(it) for _ in range(2)]


def _expect(cfg, *needles, exc=DataError, task="ssl"):
  with pytest.raises(exc) as info:
    _first_batch(cfg, task)
  for needle in needles:
    assert str(needle) in str(info.value), str(info.value)
  return info.value


# --- Data -------------------------------------------------------------------


def test_good_data_gives_batches(tmp_path):
  """Control case: the fixtures themselves are valid input."""
  batches = _first_batch(_cfg(_ukb(tmp_path)))
  assert batches[0]["image"].shape == (2, 32, 32, 32, 2)


def test_data_truncated_gzip(tmp_path):
  def truncated(p):
    _write(p, _volume(0))
    raw = p.read_bytes()
    p.write_bytes(raw[:len(raw) // 2])
  dl = _ukb(tmp_path, t1=truncated)
  _expect(_cfg(dl), tmp_path / "s0_t1.nii.gz", "truncated or corrupt gzip")


def test_data_not_nifti(tmp_path):
  def garbage(p):
    p.write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
  dl = _ukb(tmp_path, t1=garbage)
  _expect(_cfg(dl), tmp_path / "s0_t1.nii.gz", "not a readable NIfTI")


def test_data_wrong_ndim(tmp_path):
  dl = _ukb(tmp_path, flair=lambda p: _write(p, np.ones((40, 40, 40, 2))))
  _expect(_cfg(dl), tmp_path / "s0_flair.nii.gz", "expected a 3D volume",
          "(40, 40, 40, 2)")


def test_data_nan_voxels(tmp_path):
  def nan(p):
    data = _volume(0)
    data[20, 20, 20:23] = np.nan
    _write(p, data)
  dl = _ukb(tmp_path, t1=nan)
  _expect(_cfg(dl), tmp_path / "s0_t1.nii.gz", "3 NaN/Inf voxels")


def test_data_mismatched_modality_shapes(tmp_path):
  dl = _ukb(tmp_path, flair=lambda p: _write(p, _volume(0, (40, 40, 36))))
  _expect(_cfg(dl), tmp_path / "s0_flair.nii.gz", "(40, 40, 36)",
          "differs from", tmp_path / "s0_t1.nii.gz")


def test_data_missing_file(tmp_path):
  dl = _ukb(tmp_path, t1=lambda p: None)  # Listed, never written.
  _expect(_cfg(dl), tmp_path / "s0_t1.nii.gz", "file not found")


def test_data_no_foreground(tmp_path):
  def zeros(p):
    _write(p, np.zeros(SHAPE))
  dl = _ukb(tmp_path, t1=zeros, flair=zeros)
  _expect(_cfg(dl), tmp_path / "s0_t1.nii.gz", "no foreground")


def _brats(tmp_path, seg):
  items = []
  for i in range(2):
    images = [str(_write(tmp_path / f"b{i}_{m}.nii.gz", _volume(i)))
              for m in ("flair", "t1ce", "t1", "t2")]
    label = np.zeros(SHAPE, np.float32)
    label[10:20, 10:20, 10:20] = 2
    label[12:16, 12:16, 12:16] = 4
    if i == 0:
      label = seg(label)
    _write(tmp_path / f"b{i}_seg.nii.gz", label)
    items.append({"fold": i, "image": images,
                  "label": str(tmp_path / f"b{i}_seg.nii.gz")})
  # fold=1 validates on subject 1: subject 0 is the only training record.
  return _datalist(tmp_path, {"training": items})


def test_data_wrong_label_values(tmp_path):
  def label3(label):
    label[30, 30, 30] = 3  # A BraTS 2023 ET label in a BraTS 2021 setup.
    return label
  cfg = _cfg(_brats(tmp_path, label3), dataset="brats")
  error = _expect(cfg, tmp_path / "b0_seg.nii.gz", "outside the expected set",
                  task="seg")
  # The value itself is named (data/transforms.py currently prints it as
  # `np.int64(3)`, reported to the data owner; both spellings name it).
  assert re.search(r"label values \[(np\.int64\()?3\)?\]", str(error)), error


def test_data_label_shape_differs_from_image(tmp_path):
  cfg = _cfg(_brats(tmp_path, lambda label: label[:, :, :30]), dataset="brats")
  _expect(cfg, tmp_path / "b0_seg.nii.gz", "label shape (40, 40, 30)",
          task="seg")


def test_data_empty_datalist(tmp_path):
  cfg = _cfg(_datalist(tmp_path, {"training": [], "validation": []}))
  _expect(cfg, tmp_path / "datalist.json", "empty training datalist")


def test_data_datalist_missing(tmp_path):
  _expect(_cfg(str(tmp_path / "nope.json")), tmp_path / "nope.json",
          "datalist file not found")


def test_data_datalist_not_json(tmp_path):
  _expect(_cfg(_datalist(tmp_path, '{"training": [')),
          tmp_path / "datalist.json", "not valid json")


def test_data_record_without_image(tmp_path):
  dl = _datalist(tmp_path, {"training": [{"label": "x.nii.gz"}]})
  _expect(_cfg(dl), "training[0] has no 'image' entry")


def test_data_record_with_wrong_image_count(tmp_path):
  dl = _datalist(tmp_path, {"training": [{"image": ["only_t1.nii.gz"]}]})
  _expect(_cfg(dl), "training[0]", "expected 2 images", "got 1")


def test_data_unknown_modality(tmp_path):
  cfg = _cfg(_ukb(tmp_path), modalities=("t1", "dwi"))
  _expect(cfg, "modality 'dwi' unknown for ukb", exc=ValueError)


def test_data_volume_smaller_than_roi_is_padded(tmp_path):
  """Not an error: as MONAI's SpatialPad, a small volume is zero-padded.

  Catalogued because users expect either behaviour; the crop must still have
  the roi shape and contain the whole (small) foreground.
  """
  small = lambda p: _write(p, _volume(0, (20, 24, 28)))
  batches = _first_batch(_cfg(_ukb(tmp_path, t1=small, flair=small)))
  shapes = {b["image"].shape for b in batches}
  assert shapes == {(2, 32, 32, 32, 2)}
  assert all(np.isfinite(b["image"]).all() for b in batches)


def _digest(root):
  """sha256 of every file under `root`: proof that nothing was destroyed."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


# --- Configs ------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_config(name, arg="runlocal"):
  return config_lib.load_file(os.path.join(ROOT, "configs", name + ".py"), arg)


@pytest.mark.parametrize("key, value, needle", [
    ("data.roi", (48, 48, 48), "config.data.roi=(48, 48, 48)"),
    ("model.num_heads", (1, 5, 1, 1), "config.model.num_heads[1]=5"),
    ("model.num_heads", (1, 1, 1), "one entry per stage"),
    ("data.batch_size", 3, "config.data.batch_size=3"),
    ("train.nonfinite", "ignore", "config.train.nonfinite='ignore'"),
    ("train.num_steps", 0, "config.train.num_steps=0"),
    ("data.augment_on", "gpu", "config.data.augment_on='gpu'"),
])
def test_config_invalid_value(key, value, needle):
  from bsf_jax.run import config_lib
  config = _load_config("stage1")
  block, field = key.split(".")
  config[block][field] = value
  with pytest.raises(ValueError, match=re.escape(needle)):
    config_lib.validate(config)


def test_config_unknown_argument():
  with pytest.raises(ValueError, match="Unknown config argument 'sise'"):
    _load_config("stage1", "sise=small")


def test_config_batch_not_divisible_by_devices(tmp_path):
  """8 fake devices (conftest) and a global batch of 2: named, before any
  file is written."""
  from bsf_jax.trainers import pretrain
  config = _load_config("stage1")
  config.data.datalist = _ukb(tmp_path)
  workdir = tmp_path / "w"
  with pytest.raises(ValueError, match=r"batch_size=2 is not divisible by the "
                     r"8 devices"):
    pretrain.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


# --- Checkpoints --------------------------------------------------------------


def _stage1(datalist, **overrides):
  """The runlocal stage-1 config on 8 fake devices (global batch 8)."""
  config = _load_config("stage1")
  config.data.datalist = datalist
  config.data.batch_size = 8
  for key, value in overrides.items():
    block, field = key.split(".")
    config[block][field] = value
  return config


def _zero_state(config):
  """The loop's TrainState for `config`, as zeros on the host.

  Built through the loop's own model/optimizer/state functions, traced with
  eval_shape: the structure is the real one and nothing is compiled.
  """
  import jax
  from bsf_jax import models
  from bsf_jax.step import optim, sharding, train_state
  mesh = sharding.create_mesh(config.mesh)
  model = models.from_config(config)
  optimizer = optim.make_optimizer(config.optim, config.train.num_steps)
  shape = (config.data.batch_size, *config.data.roi,
           len(config.data.modalities))
  abstract = jax.eval_shape(lambda key: train_state.create_train_state(
      model, optimizer, key, shape, mesh, fsdp=False)[0], jax.random.key(0))
  return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A workdir with a checkpoint at step 1, saved as the loop saves it."""
  from bsf_jax.run import checkpointing, config_lib
  from bsf_jax.infer import contract as contract_lib
  tmp = tmp_path_factory.mktemp("ckpt")
  config = _stage1(_ukb(tmp))
  it = pipeline.make_train_iter(config.data, task="ssl", seed=config.seed)
  next(it)
  workdir = str(tmp / "run")
  manager = checkpointing.make_manager(workdir)
  checkpointing.save(manager, 1, _zero_state(config), it,
                     dict(contract=contract_lib.input_contract(config)), force=True)
  manager.wait_until_finished()
  manager.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config_lib.to_json(config))
  return dict(workdir=workdir, datalist=config.data.datalist)


def _resume_fails(run, exc, *needles, **overrides):
  """Reruns `run`'s workdir with a changed config: it fails, and the
  workdir (checkpoints, config.json) is byte-identical afterwards."""
  from bsf_jax.trainers import pretrain
  before = _digest(run["workdir"])
  with pytest.raises(exc) as info:
    pretrain.train_and_evaluate(_stage1(run["datalist"], **overrides),
                                run["workdir"])
  for needle in needles:
    assert needle in str(info.value), str(info.value)
  assert _digest(run["workdir"]) == before
  return info.value


def test_ckpt_resume_with_wrong_model_size(run):
  from bsf_jax.run import checkpointing
  _resume_fails(run, checkpointing.ContractError, "checkpoints/1",
                "model", "'feature_size': 12", "'feature_size': 24",
                **{"model.feature_size": 24})


def test_ckpt_resume_with_wrong_channels(run):
  from bsf_jax.run import checkpointing
  _resume_fails(run, checkpointing.ContractError, "modalities",
                "['t1', 'flair']", "['t1']", **{"data.modalities": ("t1",)})


def test_ckpt_resume_with_different_input_contract(run):
  from bsf_jax.run import checkpointing
  _resume_fails(run, checkpointing.ContractError, "intensity",
                "ct_window", **{"data.intensity": "zscore_nonzero"})


def _copy_run(run, tmp_path):
  import shutil
  workdir = str(tmp_path / "copy")
  shutil.copytree(run["workdir"], workdir)
  return dict(run, workdir=workdir)


def test_ckpt_corrupt_metadata(run, tmp_path):
  run = _copy_run(run, tmp_path)
  meta = os.path.join(run["workdir"], "checkpoints", "1", "meta", "metadata")
  with open(meta, "w") as f:
    f.write('{"contract": ')
  _resume_fails(run, ValueError, meta, "corrupt")


def test_ckpt_truncated_array_file(run, tmp_path):
  """Restore (as the loop calls it) of a checkpoint with a cut array file."""
  import jax
  from bsf_jax.run import checkpointing
  run = _copy_run(run, tmp_path)
  state_dir = os.path.join(run["workdir"], "checkpoints", "1", "state")
  files = [os.path.join(d, f) for d, _, fs in os.walk(state_dir) for f in fs]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  before = _digest(run["workdir"])
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
      _zero_state(_stage1(run["datalist"])))
  manager = checkpointing.make_manager(run["workdir"], read_only=True)
  with pytest.raises(ValueError) as info:
    checkpointing.restore(manager, 1, abstract, None)
  assert "checkpoints/1 cannot be restored" in str(info.value), str(info.value)
  assert "truncated/corrupt" in str(info.value)
  assert _digest(run["workdir"]) == before


def _load_into_fails(run, exc, source, *needles, **overrides):
  """`transfer.load_into` (what the loop calls for config.init_from) into a
  model built from the changed config; `run` stays intact."""
  from bsf_jax import models
  from bsf_jax.weights import transfer
  before = _digest(run["workdir"])
  config = _stage1(run["datalist"], **overrides)
  config.init_from = source
  config.model.patch_merging = "all_neighbours"  # what a run resolves "auto" to first
  params = _zero_state(config).params
  with pytest.raises(exc) as info:
    transfer.load_into(config, models.from_config(config), params)
  for needle in needles:
    assert needle in str(info.value), str(info.value)
  assert _digest(run["workdir"]) == before


def test_ckpt_init_from_missing(run, tmp_path):
  missing = str(tmp_path / "no_such_run")
  _load_into_fails(run, FileNotFoundError, missing,
                   f"config.init_from={missing!r} does not exist")


def test_ckpt_init_from_wrong_model_size(run):
  from bsf_jax.weights import transfer
  _load_into_fails(run, transfer.TransferError, run["workdir"],
                   "shape mismatches", "patch_embed",
                   **{"model.feature_size": 24})


def test_ckpt_init_from_wrong_channels(run):
  from bsf_jax.weights import transfer
  _load_into_fails(run, transfer.TransferError, run["workdir"],
                   "patch_embed", "init_adapt_channels",
                   **{"data.modalities": ("t1",)})


def test_ckpt_init_from_unknown_file_type(run, tmp_path):
  from bsf_jax.weights import transfer
  path = tmp_path / "weights.npz"
  path.write_bytes(b"not weights")
  _load_into_fails(run, transfer.TransferError, str(path), str(path),
                   "not a PyTorch/safetensors file")


def test_ckpt_init_from_truncated_torch_file(run, tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "weights.pt"
  torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
  raw = path.read_bytes()
  path.write_bytes(raw[:len(raw) // 2])
  _load_into_fails(run, Exception, str(path), str(path))


def test_ckpt_export_from_empty_workdir(tmp_path):
  from bsf_jax.run import checkpoint_reads
  os.makedirs(tmp_path / "empty" / "checkpoints")
  with pytest.raises(FileNotFoundError, match="No complete checkpoint in"):
    checkpoint_reads.restore_params(str(tmp_path / "empty"))


# --- Command line -------------------------------------------------------------

_CLI_CASES = {
    # name: (arguments after `python -m bsf_jax.main`, text naming the culprit)
    "missing_workdir": (["--config=configs/stage1.py:runlocal"],
                        "--workdir"),
    "unexpected_argument": (["--config=configs/stage1.py:runlocal",
                             "{workdir}", "extra"], "Unexpected arguments"),
    "missing_config_file": (["--config=configs/nope.py", "{workdir}"],
                            "configs/nope.py"),
    "unknown_config_argument": (["--config=configs/stage1.py:sise=small",
                                 "{workdir}"], "'sise'"),
    "unknown_override_key": (["--config=configs/stage1.py:runlocal",
                              "{workdir}", "--config.train.bogus=1"],
                             "bogus"),
    "override_wrong_type": (["--config=configs/stage1.py:runlocal",
                             "{workdir}", "--config.train.num_steps=many"],
                            "many"),
    "unknown_trainer": (["--config=configs/stage1.py:runlocal", "{workdir}",
                         "--config.trainer=distill"], "'distill'"),
    "roi_not_multiple_of_32": (["--config=configs/stage1.py:runlocal",
                                "{workdir}", "--config.data.roi=(40,40,40)"],
                               "config.data.roi=(40, 40, 40)"),
    "contract_mismatch": (["--config=configs/stage1.py:runlocal",
                           "{workdir}", "--config.data.intensity=percentile",
                           "--config.data.datalist={datalist}"],
                          "intensity"),
}


def test_cli_bad_arguments_fail_and_leave_workdir_intact(run):
  """Each case runs the real CLI against an existing run's workdir."""
  import subprocess
  import sys
  before = _digest(run["workdir"])
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  procs = {}
  for name, (args, _) in _CLI_CASES.items():
    args = [a.format(workdir=f"--workdir={run['workdir']}",
                     datalist=run["datalist"]) for a in args]
    # The runs share 2 cores: start them together so the imports overlap.
    procs[name] = subprocess.Popen(
        [sys.executable, "-m", "bsf_jax.main", *args,
         "--config.data.batch_size=8"],  # 8 devices, as the fixture's run.
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
  failures = []
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=300)
    needle = _CLI_CASES[name][1]
    if proc.returncode == 0 or needle not in out + err:
      failures.append(f"{name}: exit {proc.returncode}, {needle!r} not in "
                      f"output:\n{(out + err)[-1500:]}")
  assert not failures, "\n\n".join(failures)
  assert _digest(run["workdir"]) == before
