"""Data layer: NIfTI reading, MONAI-like transforms, datalists, Grain pipelines.

Array convention everywhere in this package: a loaded image is float32 with
shape (H, W, D, C) -- spatial axes first, in RAS orientation, channels last --
matching the channels-last (NDHWC) models. MONAI works channel-first; tests
that compare against MONAI transpose at the boundary.

Submodules are imported lazily so that `import bsf_jax.data` stays cheap (no
nibabel, no grain) for code that only needs `DataError`.
"""

import importlib

_LAZY = {
    "read_volume": "io",
    "write_volume": "io",
    "load_datalist": "datalists",
    "default_config": "pipeline",
    "make_train_iter": "pipeline",
    "make_eval_iter": "pipeline",
    "to_global_batch": "pipeline",
    "write_demo_cohort": "demo",
}


class DataError(ValueError):
  """A problem with one input file or datalist; the message names the file."""


def __getattr__(name):
  if name in _LAZY:
    module = importlib.import_module(f"bsf_jax.data.{_LAZY[name]}")
    return getattr(module, name)
  raise AttributeError(f"module 'bsf_jax.data' has no attribute {name!r}")
