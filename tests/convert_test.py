"""bsf_jax.weights.convert and weight_files, python -m bsf_jax.convert: formats, strictness,
architecture inference, encoder transfer, CLI.

Numerical parity of converted weights is in models_test.py; these tests only
trace shapes (`jax.eval_shape`) or compare arrays, so they are fast.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsf_jax import convert as convert_tool
from bsf_jax import models
from bsf_jax.weights import convert
from bsf_jax.weights import weight_files

torch = pytest.importorskip("torch")
monai_nets = pytest.importorskip("monai.networks.nets")

F = 12


def _torch_swin_unetr(depths=(2, 2, 2, 2), heads=(3, 6, 12, 24), in_ch=2, out_ch=3, f=F):
  torch.manual_seed(0)
  return monai_nets.SwinUNETR(in_channels=in_ch, out_channels=out_ch, feature_size=f,
                              depths=depths, num_heads=heads)


def _ssl_state_dict():
  from bsf_jax.reference.ssl_head import TorchSSLHead  # pylint: disable=g-import-not-at-top
  torch.manual_seed(1)
  return TorchSSLHead(2, feature_size=F).state_dict()


def _assert_same_state_dict(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


@pytest.mark.parametrize("kind", ["swin_unetr", "ssl_head"])
def test_round_trip_is_exact(kind):
  sd = _torch_swin_unetr().state_dict() if kind == "swin_unetr" else _ssl_state_dict()
  model = models.build(kind, **convert.model_kwargs_from_state_dict(sd, kind))
  params = convert.params_from_torch(sd, kind, model)
  _assert_same_state_dict(convert.params_to_torch(params, kind), sd)


def test_inference_of_architecture():
  sd = _torch_swin_unetr(depths=(2, 2, 4, 2), heads=(2, 4, 6, 8), in_ch=4, out_ch=5, f=24).state_dict()
  kwargs = convert.model_kwargs_from_state_dict(sd, "swin_unetr")
  assert kwargs == dict(in_channels=4, feature_size=24, depths=(2, 2, 4, 2), num_heads=(2, 4, 6, 8),
                        window_size=7, patch_size=2, mlp_ratio=4.0, qkv_bias=True, out_channels=5)
  ssl = convert.model_kwargs_from_state_dict(_ssl_state_dict(), "ssl_head")
  assert (ssl["in_channels"], ssl["feature_size"], ssl["rotation_classes"], ssl["contrastive_dim"]) == (2, F, 4, 512)


def test_strict_errors_name_every_problem():
  sd = dict(_torch_swin_unetr().state_dict())
  model = models.build("swin_unetr", **convert.model_kwargs_from_state_dict(sd, "swin_unetr"))
  del sd["decoder1.transp_conv.conv.weight"]
  sd["extra.weight"] = torch.zeros(1)
  sd["out.conv.conv.bias"] = torch.zeros(7)
  idx_key = "swinViT.layers2.0.blocks.1.attn.relative_position_index"
  sd[idx_key] = torch.zeros_like(sd[idx_key])
  with pytest.raises(convert.ConversionError) as err:
    convert.params_from_torch(sd, "swin_unetr", model)
  msg = str(err.value)
  for expected in ["missing key: decoder1.transp_conv.conv.weight", "unexpected key: extra.weight",
                   "shape mismatch: out.conv.conv.bias: file (7,), model (3,)", idx_key]:
    assert expected in msg
  # Wrong kind is refused too.
  with pytest.raises(convert.ConversionError, match="rotation_head"):
    convert.params_from_torch(_ssl_state_dict(), "ssl_head", model)


def test_bsf_checkpoint_format_and_encoder_transfer(tmp_path):
  sd = _ssl_state_dict()
  path = str(tmp_path / "bsf.pt")
  weight_files.save_torch_file(sd, path, "all_neighbours", bsf=True, global_step=7, epoch=3)
  raw = torch.load(path, weights_only=True)
  assert raw["global_step"] == 7 and raw["epoch"] == 3
  assert raw[weight_files.MERGING_RECORD] == "all_neighbours"
  assert all(k.startswith("module.") for k in raw["state_dict"])
  assert weight_files.read_torch_file(path).patch_merging == "all_neighbours"  # the record wins
  loaded = weight_files.load_torch_file(path)
  kwargs = convert.model_kwargs_from_state_dict(loaded, "ssl_head")
  ssl = models.build("ssl_head", **kwargs)
  ssl_params = convert.params_from_torch(loaded, "ssl_head", ssl)

  # Fine-tuning start: the SSL encoder goes into a SwinUNETR with the same encoder.
  seg = models.SwinUNETR(in_channels=2, out_channels=3, feature_size=F)
  seg_params = convert.abstract_params(seg)
  seg_params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), seg_params)
  new = convert.load_encoder_into(seg_params, loaded, seg)
  for a, b in zip(jax.tree.leaves(new["swinViT"]), jax.tree.leaves(ssl_params["swinViT"])):
    np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(new["encoder1"]["layer"]["conv1"]["kernel"]).max()) == 0.0
  # A different encoder (3 input channels) is refused by name.
  with pytest.raises(convert.ConversionError, match="patch_embed.proj.weight"):
    convert.load_encoder_into(seg_params, loaded, models.SwinUNETR(in_channels=3, out_channels=3, feature_size=F))


def test_original_model_swinvit_format(tmp_path):
  # model_swinvit.pt: {"state_dict": {"module.patch_embed...", "module.layers1.0...mlp.fc1..."}}
  enc = _torch_swin_unetr().swinViT.state_dict()
  old = {"module." + k.replace("mlp.linear1", "mlp.fc1").replace("mlp.linear2", "mlp.fc2"): v
         for k, v in enc.items()}
  path = str(tmp_path / "model_swinvit.pt")
  torch.save({"state_dict": old}, path)
  sd = weight_files.load_torch_file(path)
  kwargs = convert.model_kwargs_from_state_dict(sd, "encoder")
  encoder = models.build("encoder", **kwargs)
  params = convert.params_from_torch(sd, "encoder", encoder)
  _assert_same_state_dict(convert.params_to_torch(params, "encoder"), enc)
  seg = models.SwinUNETR(in_channels=2, out_channels=3, feature_size=F)
  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), convert.abstract_params(seg))
  new = convert.load_encoder_into(zeros, sd, seg)
  for a, b in zip(jax.tree.leaves(new["swinViT"]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_cli_round_trip(tmp_path):
  sd = _torch_swin_unetr().state_dict()
  src = str(tmp_path / "model.pt")
  torch.save(sd, src)
  ckpt = str(tmp_path / "ckpt")
  # A bare state dict does not say which merging order it was trained with.
  with pytest.raises(convert.ConversionError, match="--patch_merging"):
    convert_tool.main(["--from", src, "--to", ckpt])
  assert not os.path.exists(ckpt)
  convert_tool.main(["--from", src, "--patch_merging", "all_neighbours", "--to", ckpt])
  with open(os.path.join(ckpt, weight_files.CONFIG_FILE)) as f:
    cfg = json.load(f)
  assert cfg["kind"] == "swin_unetr" and cfg["model_kwargs"]["out_channels"] == 3
  assert cfg["model_kwargs"]["patch_merging"] == "all_neighbours"
  params, kind, kwargs = weight_files.load_params(ckpt)
  assert kind == "swin_unetr" and kwargs["depths"] == (2, 2, 2, 2)
  for fmt in ("safetensors", "pt"):
    dst = str(tmp_path / f"back.{fmt}")
    convert_tool.main(["--from", ckpt, "--to", dst])
    _assert_same_state_dict(weight_files.load_torch_file(dst),
                            {k: v.numpy() for k, v in sd.items()})
    # What bsf_jax writes records its order: it round-trips without a flag.
    assert weight_files.read_torch_file(dst).patch_merging == "all_neighbours"
  # The exported file loads strictly into MONAI.
  tm = monai_nets.SwinUNETR(in_channels=2, out_channels=3, feature_size=F)
  tm.load_state_dict(torch.load(str(tmp_path / "back.pt"), weights_only=True), strict=True)
  # Safetensors in, with an explicit override that contradicts the file: refused by name.
  with pytest.raises(convert.ConversionError, match="shape mismatch: swinViT.patch_embed"):
    convert_tool.main(["--from", str(tmp_path / "back.safetensors"), "--kind", "swin_unetr",
                       "--to", str(tmp_path / "ckpt2"), "--in_channels", "4"])


def test_bad_file_is_reported(tmp_path):
  path = str(tmp_path / "weird.pt")
  torch.save({"model": {"a": 1}}, path)
  with pytest.raises(convert.ConversionError, match="weird.pt"):
    weight_files.load_torch_file(path)


def test_pickled_model_object_is_refused_with_the_way_out(tmp_path):
  """A whole model saved with torch.save(model), as one released fine-tuned file is."""
  path = str(tmp_path / "whole_model.pt")
  torch.save(torch.nn.Linear(2, 3), path)
  with pytest.raises(convert.ConversionError) as err:
    weight_files.read_torch_file(path)
  message = str(err.value)
  assert "\n" not in message and "whole_model.pt" in message
  assert "weights_only=False" in message and "state_dict()" in message


def _release_files(tmp_path):
  """Weight files in each layout users have: (name, path, kind, order)."""
  from bsf_jax.reference.ssl_head import TorchSSLHead  # pylint: disable=g-import-not-at-top
  torch.manual_seed(3)
  ssl = TorchSSLHead(2, feature_size=F).state_dict()
  encoder = {k[len("swinViT."):]: v for k, v in ssl.items() if k.startswith("swinViT.")}
  old_mlp = lambda k: k.replace("mlp.linear1", "mlp.fc1").replace("mlp.linear2", "mlp.fc2")
  optimizer = {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}
  layouts = {
      # BrainSegFounder's releases: saved from DistributedDataParallel.
      "bsf_release": ({"state_dict": {"module." + k: v for k, v in ssl.items()}, "epoch": 5,
                       "global_step": 1000, "optimizer": optimizer}, "ssl_head"),
      "bsf_no_module": ({"state_dict": dict(ssl), "epoch": 1, "global_step": 10}, "ssl_head"),
      # Older research code: `swin_vit.` and fc1/fc2.
      "swin_vit_fc": ({"state_dict": {"swin_vit." + old_mlp(k): v for k, v in encoder.items()}},
                      "encoder"),
      # MONAI's model_swinvit.pt.
      "model_swinvit": ({"state_dict": {"module." + old_mlp(k): v for k, v in encoder.items()}},
                        "encoder"),
  }
  files = []
  for name, (blob, kind) in layouts.items():
    path = str(tmp_path / f"{name}.pt")
    torch.save(blob, path)
    files.append((name, path, kind))
  return files, ssl, encoder


def test_released_layouts_import_with_the_pre_2025_order(tmp_path, capsys):
  files, ssl, encoder = _release_files(tmp_path)
  for name, path, kind in files:
    read = weight_files.read_torch_file(path)
    assert read.kind == kind, name
    assert read.patch_merging == "duplicated_neighbours", name
    arch = read.architecture()
    assert (arch["in_channels"], arch["feature_size"], arch["depths"]) == (2, F, (2, 2, 2, 2)), name
    # As the encoder of a fine-tuning run: the SSL heads are dropped and said so.
    enc = read.tensors_for("encoder")
    _assert_same_state_dict(enc, {k: v.numpy() for k, v in encoder.items()})
    if kind == "ssl_head":
      assert "dropped contrastive_head, conv, rotation_head" in read.describe("encoder")
    # The CLI imports it without a flag and says which order it picked and why.
    ckpt = str(tmp_path / f"{name}_ckpt")
    convert_tool.main(["--from", path, "--to", ckpt])
    report = capsys.readouterr().out
    assert "duplicated_neighbours" in report and "MONAI 0.9 to 1.4.x" in report, report
    params, got_kind, kwargs = weight_files.load_params(ckpt)
    assert got_kind == kind and kwargs["patch_merging"] == "duplicated_neighbours"
    want = ssl if kind == "ssl_head" else encoder
    _assert_same_state_dict(convert.params_to_torch(params, kind), want)
  # Stating the other order is allowed, and the report says it is not the file's.
  convert_tool.main(["--from", files[0][1], "--to", str(tmp_path / "stated"),
                     "--patch_merging", "all_neighbours"])
  assert "NOT the file's duplicated_neighbours" in capsys.readouterr().out


def test_inspect_prints_and_writes_nothing(tmp_path, capsys):
  files, _, _ = _release_files(tmp_path)
  before = sorted(os.listdir(tmp_path))
  convert_tool.main(["--inspect", files[0][1]])
  out = capsys.readouterr().out
  for expected in ("epoch 5, global_step 1000", "'module.' keys", "ssl_head: in_channels=2",
                   "feature_size=12", "depths=[2, 2, 2, 2]", "duplicated_neighbours"):
    assert expected in out, (expected, out)
  assert sorted(os.listdir(tmp_path)) == before


def test_unmatched_key_of_a_release_is_named(tmp_path):
  files, _, _ = _release_files(tmp_path)
  blob = torch.load(files[0][1], weights_only=True)
  blob["state_dict"]["module.rotation_pre.weight"] = torch.zeros(3)
  torch.save(blob, files[0][1])
  with pytest.raises(convert.ConversionError, match="unexpected key: rotation_pre.weight"):
    convert_tool.main(["--from", files[0][1], "--to", str(tmp_path / "ckpt")])


@pytest.mark.parametrize("order", ["duplicated_neighbours", "all_neighbours"])
def test_released_ssl_checkpoint_imports_as_the_function_it_was_trained_as(tmp_path, order):
  """A BrainSegFounder-layout SSL checkpoint, read as `config.init_from` reads it,
  computes what the torch model it came from computes: the pre-2025 order
  (unrecorded, implied by the layout) and MONAI 1.5's (recorded by bsf_jax)."""
  import legacy_merging  # pylint: disable=g-import-not-at-top
  from bsf_jax.weights import transfer  # pylint: disable=g-import-not-at-top
  from bsf_jax.reference.ssl_head import TorchSSLHead  # pylint: disable=g-import-not-at-top
  torch.manual_seed(5)
  tm = TorchSSLHead(2, feature_size=F, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
  with torch.no_grad():
    for p in tm.parameters():
      p.add_(0.05 * torch.randn(p.shape))
  path = str(tmp_path / "release.pt")
  if order == "duplicated_neighbours":
    legacy_merging.with_duplicated_neighbours(tm)
    torch.save({"state_dict": {"module." + k: v for k, v in tm.state_dict().items()},
                "epoch": 1, "global_step": 2}, path)
  else:
    weight_files.save_torch_file(tm.state_dict(), path, order, bsf=True)
  params, _, report = transfer.load_source(path)
  assert f"patch merging: {order}" in report
  read = weight_files.read_torch_file(path)
  model = models.build("ssl_head", **read.architecture(), patch_merging=read.patch_merging)
  x = np.random.default_rng(6).standard_normal((1, 64, 32, 32, 2)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    ours = jax.jit(lambda p, x_: model.apply({"params": p}, x_))(params, jnp.asarray(x))
  with torch.no_grad():
    theirs = tm.eval()(torch.from_numpy(x).permute(0, 4, 1, 2, 3))
  theirs = [t.numpy() for t in theirs]
  theirs[2] = theirs[2].transpose(0, 2, 3, 4, 1)
  for a, b in zip(ours, theirs):
    assert float(np.abs(np.asarray(a) - b).max() / np.abs(b).max()) <= 1e-5
