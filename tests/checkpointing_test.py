"""Checkpoint retention, restore, contract checks and partial-save safety."""

import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsf_jax.run import checkpoint_reads, checkpointing


def _iterator():
  ds = (grain.MapDataset.range(1000).seed(3).shuffle().repeat()
        .map(lambda i: {"i": np.int64(i)}).to_iter_dataset())
  return iter(ds)


def _save_steps(workdir, losses, **kwargs):
  manager = checkpointing.make_manager(workdir, keep_last=2, keep_best=1,
                                       best_metric="val_rec", **kwargs)
  it = _iterator()
  for step, loss in enumerate(losses, start=1):
    next(it)
    metrics = None if loss is None else {"val_rec": loss}
    checkpointing.save(manager, step, {"w": jnp.full(3, float(step))}, it,
                       {"contract": {"modalities": ["t1", "flair"]}},
                       metrics=metrics)
  manager.wait_until_finished()
  return manager


def test_keeps_latest_and_best_never_evicting_newest(tmp_path):
  # Step 2 is the best; steps without metrics are kept only while newest.
  manager = _save_steps(tmp_path, [0.9, 0.1, None, 0.5, None, 0.7])
  assert sorted(manager.all_steps()) == [2, 5, 6]
  assert checkpoint_reads.resolve_step(manager, "best") == 2
  assert checkpoint_reads.resolve_step(manager, "latest") == 6
  with pytest.raises(FileNotFoundError, match="kept steps: \\[2, 5, 6\\]"):
    checkpoint_reads.resolve_step(manager, 3)


def test_restore_state_and_iterator_position(tmp_path):
  manager = _save_steps(tmp_path, [None, None, None])
  reference = _iterator()
  for _ in range(3):
    next(reference)
  expected_next = next(reference)
  it = _iterator()
  abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
  state, meta = checkpointing.restore(manager, 3, abstract, it)
  np.testing.assert_array_equal(state["w"], [3.0, 3.0, 3.0])
  assert meta["contract"] == {"modalities": ["t1", "flair"]}
  assert next(it) == expected_next


def test_restore_params_reads_host_arrays(tmp_path):
  _save_steps(tmp_path, [0.3, 0.2, None]).close()
  state = {"params": {"a": np.ones(2, np.float32)}, "step": np.int32(0)}
  manager = checkpointing.make_manager(tmp_path / "w2")
  checkpointing.save(manager, 7, state, None, {"contract": {"x": 1}})
  manager.wait_until_finished()
  params, meta, step = checkpoint_reads.restore_params(str(tmp_path / "w2"))
  assert step == 7 and meta["contract"] == {"x": 1}
  np.testing.assert_array_equal(params["a"], [1.0, 1.0])


def test_contract_mismatch_is_loud():
  with pytest.raises(checkpointing.ContractError) as e:
    checkpointing.check_contract(
        {"modalities": ["flair", "t1ce", "t1", "t2"], "roi": [96, 96, 96]},
        {"modalities": ["t1ce", "flair", "t1", "t2"], "roi": [96, 96, 96]},
        "ckpt/5")
  assert "modalities" in str(e.value) and "roi" not in str(e.value)


def test_missing_checkpoint_dir_is_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    checkpoint_reads.restore_params(str(tmp_path / "nope"))


def test_interrupted_save_leaves_last_complete_step(tmp_path):
  manager = _save_steps(tmp_path, [None, None])
  manager.close()
  # What a kill during a save leaves: a temporary step directory that Orbax
  # never renamed into place.
  ckpt = checkpointing.checkpoint_dir(str(tmp_path))
  partial = os.path.join(ckpt, "3.orbax-checkpoint-tmp-1234")
  os.makedirs(os.path.join(partial, "state"))
  manager = checkpointing.make_manager(tmp_path)
  assert manager.latest_step() == 2
  state, _ = checkpointing.restore(
      manager, 2, {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}, None)
  np.testing.assert_array_equal(state["w"], [2.0, 2.0, 2.0])
