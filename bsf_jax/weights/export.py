"""Writes a run's weights as a PyTorch, BrainSegFounder or safetensors file.

The library of `python -m bsf_jax.export` (the formats are described there).
"""

from __future__ import annotations

import json

from bsf_jax.run import checkpoint_reads
from bsf_jax.data import atomic_io
from bsf_jax.models.swin_config import MONAI_VERSIONS


def export(workdir: str, out: str, fmt: str, which: str | int = "latest",
           monai_before_1_5: bool = False) -> str:
  """Writes the weights of `workdir`'s checkpoint `which` to `out`.

  `out` appears only once complete (`atomic_io`): an interrupted export or a
  full disk leaves no file there, or the earlier one unchanged. Missing
  parent folders are created. The file records the run's patch-merging
  order (`weight_files.torch_blob`, `weight_files.safetensors_metadata`), so
  importing it needs no flag.

  Args:
    workdir: the run.
    out: the output file.
    fmt: "monai", "bsf" or "safetensors".
    which: "latest", "best" or a step.
    monai_before_1_5: the user loads a "monai" file of a run trained with
      the pre-2025 merging order into MONAI 0.9-1.4, which computes that
      order (MONAI >= 1.5 would compute another function: refused otherwise).

  Returns:
    A description of what was written, and which MONAI computes it.
  """
  from bsf_jax.weights import convert, weight_files  # torch is an optional extra: import lazily.
  # All steps of a run share the contract: any readable one names the model
  # (needed first, as "best" is ranked by a model-specific metric).
  model = checkpoint_reads.run_meta(workdir).get("contract", {}).get("model", {})
  kind = model.get("name")
  metric, mode = checkpoint_reads.best_metric_of({"contract": {"model": model}})
  order = model["patch_merging"]
  if fmt == "bsf" and kind != "ssl_head":
    raise ValueError("--format bsf is the SSL-head checkpoint format; this run "
                     f"trained a {kind}. Use --format monai.")
  if fmt == "monai" and order != "all_neighbours" and not monai_before_1_5:
    raise ValueError(
        f"{workdir} computes patch merging {order}, which only "
        f"{MONAI_VERSIONS[order]} computes: MONAI >= 1.5 would run these weights as another "
        "function. Pass --monai_before_1_5 if you load the file into such a MONAI "
        "(pip install 'monai<1.5'), or export --format safetensors or bsf for bsf_jax and "
        "BrainSegFounder's code")
  params, meta, step = checkpoint_reads.restore_params(workdir, which, metric,
                                                       mode)
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
        metadata=weight_files.safetensors_metadata(
            order, contract=json.dumps(meta.get("contract", {})), step=str(step),
            kind=kind)))
  else:
    import torch
    blob = weight_files.torch_blob(state_dict, order, bsf=fmt == "bsf", global_step=step)
    with atomic_io.open_atomic(out, "wb") as f:
      torch.save(blob, f)
  return (f"wrote {len(state_dict)} tensors ({kind}, step {step}, format "
          f"{fmt}) to {out}\n{weight_files.monai_export_note(order)}")
