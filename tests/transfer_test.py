"""Stage transfer: copy by path, adapt modality channels by name, report."""

import numpy as np
import pytest

from bsf_jax.weights import transfer


def _tree(in_ch, out_ch, seed=0):
  rng = np.random.default_rng(seed)
  return {
      "swinViT": {"patch_embed": {"proj": {
          "kernel": rng.normal(size=(2, 2, 2, in_ch, 6)).astype(np.float32),
          "bias": rng.normal(size=(6,)).astype(np.float32)}}},
      "conv": {"out": {
          "kernel": rng.normal(size=(1, 1, 1, 6, out_ch)).astype(np.float32),
          "bias": rng.normal(size=(out_ch,)).astype(np.float32)}},
      "rotation_head": {"kernel": rng.normal(size=(6, 4)).astype(np.float32)},
  }


def test_same_shapes_copy_everything():
  src, tgt = _tree(2, 2, seed=1), _tree(2, 2, seed=2)
  out, report = transfer.transfer_params(
      src, tgt, src_modalities=("t1", "flair"), tgt_modalities=("t1", "flair"),
      adapt_channels=False)
  np.testing.assert_array_equal(out["conv"]["out"]["kernel"],
                                src["conv"]["out"]["kernel"])
  assert "loaded 5, adapted 0, new 0, dropped 0" in report


def test_channel_expansion_maps_modalities_by_name():
  # UKB (t1, flair) -> BraTS (flair, t1ce, t1, t2).
  src, tgt = _tree(2, 2, seed=1), _tree(4, 4, seed=2)
  out, report = transfer.transfer_params(
      src, tgt, src_modalities=("t1", "flair"),
      tgt_modalities=("flair", "t1ce", "t1", "t2"), adapt_channels=True,
      seed=3)
  kernel = out["swinViT"]["patch_embed"]["proj"]["kernel"]
  src_kernel = src["swinViT"]["patch_embed"]["proj"]["kernel"]
  assert kernel.shape == (2, 2, 2, 4, 6)
  np.testing.assert_array_equal(kernel[..., 0, :], src_kernel[..., 1, :])  # flair
  np.testing.assert_array_equal(kernel[..., 2, :], src_kernel[..., 0, :])  # t1
  # New channels: Kaiming normal, fan_out = 6 * 2*2*2 -> std sqrt(2/48).
  new = np.concatenate([kernel[..., 1, :].ravel(), kernel[..., 3, :].ravel()])
  assert not np.allclose(new, 0)
  assert np.abs(new).max() < 6 * np.sqrt(2 / 48)
  # Output channels of the reconstruction head, and its bias (new = 0).
  bias = out["conv"]["out"]["bias"]
  np.testing.assert_array_equal(bias[[0, 2]], src["conv"]["out"]["bias"][[1, 0]])
  np.testing.assert_array_equal(bias[[1, 3]], 0)
  assert "adapted 3" in report and "new ['t1ce', 't2']" in report


def test_channel_reduction_keeps_matching_channel():
  # UKB (t1, flair) -> ATLAS (t1,): the flair channel is dropped.
  src, tgt = _tree(2, 2, seed=1), _tree(1, 1, seed=2)
  out, _ = transfer.transfer_params(
      src, tgt, src_modalities=("t1", "flair"), tgt_modalities=("t1",),
      adapt_channels=True)
  np.testing.assert_array_equal(
      out["swinViT"]["patch_embed"]["proj"]["kernel"][..., 0, :],
      src["swinViT"]["patch_embed"]["proj"]["kernel"][..., 0, :])


def test_mismatch_without_declared_adaptation_names_every_param():
  src, tgt = _tree(2, 2), _tree(4, 4)
  with pytest.raises(transfer.TransferError) as e:
    transfer.transfer_params(src, tgt, src_modalities=("t1", "flair"),
                             tgt_modalities=("flair", "t1ce", "t1", "t2"),
                             adapt_channels=False)
  message = str(e.value)
  for name in ("swinViT/patch_embed/proj/kernel", "conv/out/kernel",
               "conv/out/bias"):
    assert name in message
  assert "init_adapt_channels" in message


def test_non_channel_mismatch_is_an_error_even_with_adaptation():
  src, tgt = _tree(2, 2), _tree(2, 2)
  tgt["rotation_head"]["kernel"] = np.zeros((12, 4), np.float32)
  with pytest.raises(transfer.TransferError, match="rotation_head/kernel"):
    transfer.transfer_params(src, tgt, src_modalities=("t1", "flair"),
                             tgt_modalities=("t1", "flair"),
                             adapt_channels=True)


def test_encoder_only_source_lands_under_swinvit_and_reports_new_and_dropped():
  src = {"patch_embed": _tree(2, 2)["swinViT"]["patch_embed"],
         "extra": {"w": np.zeros(3, np.float32)}}
  tgt = _tree(2, 2)
  out, report = transfer.transfer_params(
      src, tgt, src_modalities=None, tgt_modalities=("t1", "flair"),
      adapt_channels=False)
  np.testing.assert_array_equal(out["swinViT"]["patch_embed"]["proj"]["bias"],
                                src["patch_embed"]["proj"]["bias"])
  assert "new conv/* (2 params)" in report
  assert "dropped extra/* (1 params)" not in report  # wrapped under swinViT
  assert "dropped swinViT/* (1 params)" in report


def test_nothing_matching_is_an_error():
  with pytest.raises(transfer.TransferError, match="No parameter"):
    transfer.transfer_params({"a": {"w": np.zeros(2)}}, _tree(2, 2),
                             src_modalities=None, tgt_modalities=("t1",),
                             adapt_channels=False)


def _source_run(workdir, val_rec_by_step, name="ssl_head", patch_merging=None):
  """A run's checkpoints whose params hold their step, ranked by val_rec."""
  from bsf_jax.run import checkpointing  # pylint: disable=g-import-not-at-top
  manager = checkpointing.make_manager(workdir, keep_last=10, keep_best=10)
  model = {"name": name} if patch_merging is None else {"name": name,
                                                       "patch_merging": patch_merging}
  for step, val_rec in val_rec_by_step.items():
    state = {"params": {"w": np.full(2, float(step), np.float32)}, "step": np.int32(step)}
    checkpointing.save(manager, step, state, None,
                       {"contract": {"modalities": ["t1"], "model": model}},
                       metrics={"val_rec": val_rec})
  manager.wait_until_finished()
  manager.close()


@pytest.mark.parametrize("init_from_step, expected", [
    ("best", 2), ("latest", 3), (1, 1), ("1", 1)])
def test_init_from_step_picks_best_latest_or_a_number(tmp_path, init_from_step, expected):
  _source_run(str(tmp_path), {1: 0.5, 2: 0.1, 3: 0.3})
  params, modalities, origin = transfer.load_source(str(tmp_path), init_from_step)
  assert float(params["w"][0]) == expected and modalities == ("t1",)
  assert f"step {expected} (" in origin
  if init_from_step == "best":
    assert "best by val_rec" in origin


def test_init_from_step_is_validated(tmp_path):
  _source_run(str(tmp_path), {1: 0.5})
  with pytest.raises(transfer.TransferError, match="init_from_step='newest'"):
    transfer.load_source(str(tmp_path), "newest")
  with pytest.raises(FileNotFoundError, match="kept steps: \\[1\\]"):
    transfer.load_source(str(tmp_path), 5)


def test_auto_patch_merging_follows_the_source(tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from bsf_jax.run import config_lib  # pylint: disable=g-import-not-at-top

  def config(init_from, order="auto"):
    c = ml_collections.ConfigDict({"init_from": init_from,
                                   "model": config_lib.model_config("swin_unetr")})
    c.model.patch_merging = order
    return c

  none = config("")
  assert transfer.resolve_patch_merging(none) == "patch merging all_neighbours"
  assert none.model.patch_merging == "all_neighbours"
  legacy = str(tmp_path / "legacy")
  _source_run(legacy, {1: 0.5}, patch_merging="duplicated_neighbours")
  c = config(legacy)
  assert "from config.init_from" in transfer.resolve_patch_merging(c)
  assert c.model.patch_merging == "duplicated_neighbours"
  # Metadata that records no order is refused, naming the source.
  bare = str(tmp_path / "bare")
  _source_run(bare, {1: 0.5})
  with pytest.raises(transfer.TransferError, match=f"init_from='{bare}'.*records no model contract"):
    transfer.resolve_patch_merging(config(bare))
  # Stated against the source: allowed, and said.
  c = config(legacy, "all_neighbours")
  assert "NOT config.init_from's duplicated_neighbours" in transfer.resolve_patch_merging(c)
  assert c.model.patch_merging == "all_neighbours"


def test_auto_patch_merging_needs_a_bare_state_dict_stated(tmp_path):
  torch = pytest.importorskip("torch")
  import ml_collections  # pylint: disable=g-import-not-at-top
  from bsf_jax.run import config_lib  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "bare.pt")
  torch.save({"swinViT.patch_embed.proj.weight": torch.zeros(12, 1, 2, 2, 2)}, path)
  c = ml_collections.ConfigDict({"init_from": path, "model": config_lib.model_config("swin_unetr")})
  with pytest.raises(transfer.TransferError, match="config.model.patch_merging"):
    transfer.resolve_patch_merging(c)
  c.model.patch_merging = "duplicated_neighbours"
  assert "as configured" in transfer.resolve_patch_merging(c)


def test_init_from_restores_straight_into_the_fsdp_shardings(tmp_path, monkeypatch):
  # 8 fake CPU devices (conftest): the target params are FSDP-sharded 8 ways.
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from bsf_jax.run import checkpoint_reads, checkpointing  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("fsdp",))
  rng = np.random.default_rng(0)
  source = {"swinViT": {"w": rng.normal(size=(64, 8)).astype(np.float32),
                        "b": rng.normal(size=(8,)).astype(np.float32)},
            "rotation_head": {"kernel": rng.normal(size=(8, 4)).astype(np.float32)}}
  manager = checkpointing.make_manager(str(tmp_path), keep_last=1)
  checkpointing.save(manager, 1, {"params": source, "opt": {"mu": source}, "step": np.int32(1)},
                     None, {"contract": {"modalities": ["t1"], "model": {"name": "ssl_head"}}})
  manager.wait_until_finished()
  manager.close()
  fsdp, repl = NamedSharding(mesh, P("fsdp", None)), NamedSharding(mesh, P())
  target = {"swinViT": {"w": jax.device_put(np.zeros((64, 8), np.float32), fsdp),
                        "b": jax.device_put(np.zeros(8, np.float32), repl)},
            "out": {"kernel": jax.device_put(np.ones((8, 2), np.float32), repl)}}

  def no_host_copy(state_dir):
    raise AssertionError(f"the whole state of {state_dir} was restored on the host")
  monkeypatch.setattr(checkpoint_reads, "_host_params", no_host_copy)
  read, _, _ = transfer.load_source(str(tmp_path), "latest", target=target)
  # What the target lacks is not read at all.
  assert isinstance(read["rotation_head"]["kernel"], jax.ShapeDtypeStruct)
  config = ml_collections.ConfigDict(dict(
      init_from=str(tmp_path), init_from_step="latest", init_adapt_channels=False,
      seed=0, data=dict(modalities=("t1",))))
  out = transfer.load_into(config, None, target)
  w = out["swinViT"]["w"]
  assert w.sharding == fsdp
  assert {s.data.shape for s in w.addressable_shards} == {(8, 8)}
  np.testing.assert_array_equal(np.asarray(w), source["swinViT"]["w"])
  assert out["swinViT"]["b"].sharding == repl
  np.testing.assert_array_equal(np.asarray(out["swinViT"]["b"]), source["swinViT"]["b"])
  # A param the source lacks keeps its initial value and sharding.
  assert out["out"]["kernel"] is target["out"]["kernel"]
