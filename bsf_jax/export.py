r"""Export a run's weights for PyTorch users.

  python -m bsf_jax.export --workdir runs/s3 --best --format monai --out swin_unetr.pt
  python -m bsf_jax.export --workdir runs/s1 --format bsf --out bsf_stage1.pt
  python -m bsf_jax.export --workdir runs/s1 --step 2000 --format safetensors --out s1.safetensors

Formats:
  monai        a `SwinUNETR` state_dict (fine-tuning runs) that
               `monai.networks.nets.SwinUNETR(...).load_state_dict(sd, strict=True)`
               accepts; from a pretraining run, the encoder under `swinViT.*`,
               which `SwinUNETR.swinViT.load_state_dict(..., strict=True)` accepts
               after stripping the prefix, as BSF's fine-tuning scripts do.
  bsf          BrainSegFounder's checkpoint: {"state_dict": {"module.<key>": ...},
               "global_step": step, "epoch": 0} with the reference SSL head's keys.
  safetensors  the run's own keys (monai or ssl_head naming), no pickle, with
               the input contract as metadata.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from bsf_jax import atomic_io, checkpointing

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory (or its checkpoints dir).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_bool("best", False, "Export the best checkpoint by validation.")
flags.DEFINE_enum("format", "monai", ["monai", "bsf", "safetensors"],
                  "Output format.")
flags.DEFINE_string("out", None, "Output file.")
flags.mark_flags_as_required(["workdir", "out"])

# How each trainer ranks its checkpoints (see trainers/*.py).
_BEST = {"ssl_head": ("val_rec", "min"), "swin_unetr": ("val_dice_mean", "max")}


def export(workdir: str, out: str, fmt: str, which: str | int = "latest") -> str:
  """Writes the weights of `workdir`'s checkpoint `which` to `out`.

  `out` appears only once complete (`atomic_io`): an interrupted export or a
  full disk leaves no file there, or the earlier one unchanged. Missing
  parent folders are created.

  Returns:
    A one-line description of what was written.
  """
  from bsf_jax import convert  # torch is an optional extra: import lazily.

  # All steps of a run share the contract: any readable one names the model
  # (needed first, as "best" is ranked by a model-specific metric).
  kind = checkpointing.run_meta(workdir).get("contract", {}).get(
      "model", {}).get("name")
  if kind not in _BEST:
    raise ValueError(f"{workdir}: checkpoint metadata has no model name "
                     f"(contract.model.name={kind!r})")
  metric, mode = _BEST[kind]
  params, meta, step = checkpointing.restore_params(workdir, which, metric,
                                                    mode)
  if fmt == "bsf" and kind != "ssl_head":
    raise ValueError("--format bsf is the SSL-head checkpoint format; this run "
                     f"trained a {kind}. Use --format monai.")
  if fmt == "monai" and kind == "ssl_head":
    state_dict = {f"swinViT.{k}": v for k, v in
                  convert.params_to_torch(params["swinViT"], "encoder").items()}
  else:
    state_dict = convert.params_to_torch(params, kind)
  if fmt == "safetensors":
    from safetensors.torch import save
    # Serialised in memory and written by Python, so that a full disk is an
    # OSError (not a library's own error) and the file is never partial.
    atomic_io.write_bytes(out, save(
        {k: v.contiguous() for k, v in state_dict.items()},
        metadata={"contract": json.dumps(meta.get("contract", {})),
                  "step": str(step), "kind": kind}))
  else:
    import torch
    if fmt == "bsf":
      blob = {"state_dict": {f"module.{k}": v for k, v in state_dict.items()},
              "global_step": step, "epoch": 0}
    else:
      blob = state_dict
    with atomic_io.open_atomic(out, "wb") as f:
      torch.save(blob, f)
  return (f"wrote {len(state_dict)} tensors ({kind}, step {step}, format "
          f"{fmt}) to {out}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  checkpointing.quiet_tool_logs()
  if FLAGS.best and FLAGS.step is not None:
    raise app.UsageError("--best and --step are exclusive")
  which = "best" if FLAGS.best else (FLAGS.step if FLAGS.step is not None
                                     else "latest")
  try:
    print(export(FLAGS.workdir, FLAGS.out, FLAGS.format, which))
  except (FileNotFoundError, ValueError, atomic_io.OutputError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
