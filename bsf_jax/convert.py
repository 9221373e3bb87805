r"""Convert weights between PyTorch/MONAI/BrainSegFounder files and bsf_jax.

  python -m bsf_jax.convert --inspect model.pt
  python -m bsf_jax.convert --from model.pt [--kind swin_unetr] [--patch_merging ORDER] --to ckpt_dir
  python -m bsf_jax.convert --from ckpt_dir --to model.safetensors [--bsf]

--inspect prints what a .pt/.pth/.safetensors file holds: its layout, kind,
sizes and the patch-merging order it would be imported with, and why.
--from FILE imports it into a bsf_jax params checkpoint (orbax + model_config.json):
the kind and the architecture are read from its keys and tensor shapes, every
missing key, unexpected key and shape mismatch is reported by name.
--from CKPT_DIR exports such a checkpoint as a .pt/.pth or .safetensors file
that MONAI's `load_state_dict(strict=True)` accepts (--bsf: BrainSegFounder's
`{"state_dict": {"module.*": ...}}` layout).

Patch merging: weights trained before MONAI 1.5 expect the
"duplicated_neighbours" order, later ones "all_neighbours". Files bsf_jax writes
record theirs; a `{"state_dict": ...}` checkpoint without a record
(BrainSegFounder's releases, `model_swinvit.pt`) is taken as
"duplicated_neighbours"; a bare state dict of unknown origin needs
--patch_merging.

The name table is `bsf_jax.weights.convert`, the files `bsf_jax.weights.weight_files`.
"""

import os

from absl import app, flags

from bsf_jax import models
from bsf_jax import tool_flags
from bsf_jax.models.swin_config import MONAI_VERSIONS, PATCH_MERGING_ORDERS
from bsf_jax.weights import convert
from bsf_jax.weights import weight_files

FLAGS = tool_flags.flag_values(__name__)
flags.DEFINE_string("inspect", None, "print what a torch/safetensors file holds; write nothing",
                    flag_values=FLAGS)
# `from` is a Python keyword (no FLAGS.from): read it through its holder.
_FROM = flags.DEFINE_string("from", None, "torch/safetensors file or bsf_jax checkpoint dir",
                            flag_values=FLAGS)
flags.DEFINE_string("to", None, "checkpoint dir, or .pt/.pth/.safetensors file", flag_values=FLAGS)
flags.DEFINE_enum("kind", None, models.KINDS,
                  "model kind to import as (default: what the file holds)", flag_values=FLAGS)
flags.DEFINE_enum("patch_merging", None, tuple(PATCH_MERGING_ORDERS),
                  "the order the weights were trained with (default: the file's record, "
                  "or duplicated_neighbours for a {'state_dict': ...} checkpoint)",
                  flag_values=FLAGS)
flags.DEFINE_integer("in_channels", None, "input channels (default: from the file)",
                     flag_values=FLAGS)
flags.DEFINE_integer("out_channels", None, "output channels (default: from the file)",
                     flag_values=FLAGS)
flags.DEFINE_integer("feature_size", None, "feature size (default: from the file)",
                     flag_values=FLAGS)
flags.DEFINE_string("depths", None, "tiny|small|big or e.g. 2,2,6,2", flag_values=FLAGS)
flags.DEFINE_string("num_heads", None, "e.g. 3,6,12,24", flag_values=FLAGS)
flags.DEFINE_bool("bsf", False, "export as a BSF checkpoint (module. prefix, wrapped)",
                  flag_values=FLAGS)
flags.DEFINE_bool("force", False, "overwrite an existing checkpoint dir", flag_values=FLAGS)


def _overrides() -> dict:
  """The architecture flags given, as `models.build` kwargs."""
  out = {}
  for name in ("in_channels", "out_channels", "feature_size"):
    if FLAGS[name].value is not None:
      out[name] = FLAGS[name].value
  if FLAGS.depths:
    out["depths"] = models.decode_size(FLAGS.depths)
  if FLAGS.num_heads:
    out["num_heads"] = tuple(int(h) for h in FLAGS.num_heads.split(","))
  return out


def choose_patch_merging(torch_file: weight_files.TorchFile,
                         stated: str | None) -> tuple[str, str]:
  """(order, report line) for importing `torch_file`, `stated` by the user or None.

  Raises:
    convert.ConversionError: the file does not say and nothing was stated.
  """
  if stated is None:
    if torch_file.patch_merging is None:
      raise convert.ConversionError(
          f"{torch_file.path}: {torch_file.merging_reason}: state it with --patch_merging "
          f"all_neighbours ({MONAI_VERSIONS['all_neighbours']}) or duplicated_neighbours "
          f"({MONAI_VERSIONS['duplicated_neighbours']}, BrainSegFounder's releases)")
    return torch_file.patch_merging, f"patch merging {torch_file.patch_merging} (from the file)"
  if torch_file.patch_merging not in (None, stated):
    return stated, (f"patch merging {stated} as stated, NOT the file's "
                    f"{torch_file.patch_merging} ({torch_file.merging_reason}): the model "
                    "computes a different function from the one these weights were trained as")
  return stated, f"patch merging {stated} (as stated)"


def main(argv=None) -> None:
  """The command line (module docstring); argv: the words after the program name."""
  tool_flags.parse(FLAGS, argv)
  src, dst = _FROM.value, FLAGS.to
  if FLAGS.inspect:
    print(weight_files.read_torch_file(FLAGS.inspect).describe(FLAGS.kind))
    return
  if not src or not dst:
    raise app.UsageError("--from and --to are required (or --inspect FILE)")
  if os.path.isdir(src):
    params, kind, kwargs = weight_files.load_params(src)
    if FLAGS.kind and FLAGS.kind != kind:
      raise SystemExit(f"--kind {FLAGS.kind} but {src} holds a {kind}")
    order = kwargs.get("patch_merging", "all_neighbours")
    weight_files.save_torch_file(convert.params_to_numpy(params, kind), dst, order, bsf=FLAGS.bsf)
    print(f"wrote {kind} {kwargs} -> {dst}\n  {weight_files.monai_export_note(order)}")
    return
  torch_file = weight_files.read_torch_file(src)
  kind = FLAGS.kind or torch_file.kind
  order, order_line = choose_patch_merging(torch_file, FLAGS.patch_merging)
  sd = torch_file.tensors_for(kind)
  kwargs = convert.model_kwargs_from_state_dict(sd, kind)
  kwargs.update(_overrides())
  kwargs["patch_merging"] = order
  model = models.build(kind, **kwargs)
  params = convert.params_from_torch(sd, kind, model)
  weight_files.save_params(dst, params, kind, kwargs, force=FLAGS.force)
  print(f"{torch_file.describe(kind)}\n  imported with {order_line}\nwrote {kind} -> {dst}")


if __name__ == "__main__":
  tool_flags.run(main)
