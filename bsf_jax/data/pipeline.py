"""Grain input pipelines for SSL pretraining and segmentation fine-tuning.

Train (infinite, resumable):
  records -> MapDataset.seed(seed) -> shard [process_index::process_count]
  -> shuffle -> repeat -> random_map(load + crops [+ augment]) -> iter
  -> filter(skipped) -> batch(volumes, drop_remainder) -> mp_prefetch(workers)
Each element is one volume turned into `num_samples` crops; a batch of
`batch_size / num_samples / process_count` volumes is one process-local batch
of crops. Segmentation crops are augmented here only under
`data.augment_on="host"`; by default the training step augments them on the
device (`bsf_jax.step.seg_augment.seg_augment`). Random crops/augmentations get
Grain's per-element rng (derived from the seed and the element index), so a
run is reproducible and `get_state()/set_state()` resumes at exactly the same
element. Memory is bounded by (workers x prefetch) batches plus one volume per
worker/thread, never by the dataset size.

Eval (finite, deterministic): no shuffle, no augmentation; the record list
is padded with masked copies so every process yields the same number of full
batches (`mask` marks the real ones).

Arrays are channels-last: images (H, W, D, C), batches (B, H, W, D, C).
"""

import grain
import ml_collections
import numpy as np

from bsf_jax.data import DataError
from bsf_jax.data import crops
from bsf_jax.data import datalists
from bsf_jax.data import labels as L
from bsf_jax.data import store as store_lib
from bsf_jax.data import transforms as T
from bsf_jax.data import workers

def default_config() -> ml_collections.ConfigDict:
  """The `config.data` block."""
  c = ml_collections.ConfigDict()
  # "ukb" | "brats" | "atlas" (paper: stage 1 UKB, stages 2/3 BraTS or ATLAS).
  c.dataset = "ukb"
  # Datalist json (BrainSegFounder/MONAI format); "" scans `root` instead.
  c.datalist = ""
  # Base folder: relative datalist paths and directory scans start here.
  c.root = ""
  # Modality names, in channel order (ukb: t1, flair; brats: flair, t1ce, t1, t2).
  c.modalities = ("t1", "flair")
  # Crop size (paper/reference: 96^3 for SSL, 128^3 for BraTS fine-tuning).
  c.roi = (96, 96, 96)
  # Random crops per volume (reference sw_batch_size = 2; seg reference: 1).
  c.num_samples = 2
  # GLOBAL crops per step; volumes per step = batch_size / num_samples.
  c.batch_size = 4
  # "ct_window" (reference: ScaleIntensityRange -1000..1000 -> 0..1, clip),
  # "zscore_nonzero" (our MRI default, BraTS reference), or "percentile".
  c.intensity = "zscore_nonzero"
  # Window for "ct_window" (reference defaults a_min -1000, a_max 1000).
  c.a_min = -1000.0
  c.a_max = 1000.0
  # Grain worker processes (reference: 4 DataLoader workers); 0 = in process.
  c.workers = 4
  # Batches buffered per worker (memory bound: workers x prefetch batches).
  c.prefetch = 2
  # Reader threads per process/worker (each holds one decoded volume).
  c.read_threads = 1
  # "raise": stop naming file + problem; "skip": log, count, continue (ours).
  c.on_error = "raise"
  # BraTS folds json: this fold is validation (paper: 5-fold CV); -1 = none.
  c.fold = 0
  # Few-shot: fraction of the training records (paper Table 9: .05-.4) ...
  c.fraction = 1.0
  # ... drawn with this seed (paper: 5 repeats).
  c.repeat_seed = 0
  # Optional folder for decoded .npy copies of the volumes (ours; speed).
  c.cache_dir = ""
  # A prepared store (python -m bsf_jax.data.prepare; docs/data.md): records
  # and crop-ready voxels come from it; no scan, no NIfTI read (ours; speed).
  c.store = ""
  # Held-out fraction when no split is given (UKB scan, ATLAS) (ours).
  c.val_fraction = 0.2
  # Seed of that split and of scanned BraTS folds (ours).
  c.split_seed = 0
  # UKB scan rule: at least this many slices (paper: 100).
  c.min_slices = 100
  # Label convention (`labels.CONVENTIONS`): "brats2021" (ET 4; "brats" is
  # an alias), "brats2023" (ET 3), "brats2024" (+ resection cavity 4) ->
  # TC/WT/ET channels; "atlas" -> binary lesion; "none" (SSL).
  c.label_format = "none"
  # Seg-training augmentation: flips p 0.5/axis, scale 0.1, shift 0.1 (reference).
  c.augment = True
  # Where it runs: "device" (in the jitted step, keyed per crop; the host only
  # reads crops) or "host" (in the data workers, as the reference does) (ours).
  c.augment_on = "device"
  # Seed of the fixed crops of the SSL eval pipeline.
  c.eval_seed = 0
  return c


AUGMENT_ON = ("device", "host")


def seg_augmentation(cfg) -> str:
  """Where segmentation training crops are augmented: "device", "host", or
  "" when `data.augment` is off. `bsf_jax.step.seg_augment.seg_augment` is the
  device version, `crops.make_crops` the host one; both draw the same distribution.
  """
  if cfg.augment_on not in AUGMENT_ON:
    raise ValueError(f"data.augment_on={cfg.augment_on!r}; expected one of {AUGMENT_ON}")
  return cfg.augment_on if cfg.augment else ""


def crop_spec(cfg, task: str) -> crops.CropSpec:
  """The `CropSpec` of a run's `config.data` for `task` ("ssl" or "seg")."""
  if cfg.on_error not in ("raise", "skip"):
    raise ValueError(f"data.on_error={cfg.on_error!r}; expected 'raise' or 'skip'")
  if task not in ("ssl", "seg"):
    raise ValueError(f"task={task!r}; expected 'ssl' or 'seg'")
  conv = L.get(cfg.label_format) if task == "seg" else None
  if task == "seg" and conv is None:
    raise ValueError(f"task='seg' needs a data.label_format among "
                     f"{list(L.CONVENTIONS)} (dataset={cfg.dataset})")
  return crops.CropSpec(tuple(int(r) for r in cfg.roi), int(cfg.num_samples),
                        T.Intensity(cfg.intensity, float(cfg.a_min), float(cfg.a_max)),
                        conv, seg_augmentation(cfg) == "host",
                        cfg.on_error, cfg.cache_dir)


class TrainTransform(grain.transforms.RandomMap):
  """record -> {"image": (S, *roi, C)[, "label": (S, *roi, K)]} or None (skipped).

  Under on_error="skip", more consecutive failures than `max_skips` means
  (nearly) every record is broken: raise instead of filtering forever.
  """

  def __init__(self, spec: crops.CropSpec, augment: bool, max_skips: int = 1 << 30):
    self.spec, self.augment, self.max_skips = spec, augment, max_skips
    self._skips = 0

  def random_map(self, record, rng):
    def run():
      if "store" in record or "store_error" in record:
        return crops.store_crops(record, rng, self.spec, self.augment)
      loaded = crops.load_record(record, self.spec, full_check=False)
      try:
        return crops.make_crops(loaded, rng, self.spec, self.augment)
      except DataError as e:  # e.g. no foreground: name the record's files
        raise DataError(f"{', '.join(record['image'])}: {e}") from e
    out = crops.guard(self.spec, record, run)
    self._skips = self._skips + 1 if out is None else 0
    if self._skips > self.max_skips:
      raise DataError(f"on_error='skip': {self._skips} records in a row failed, "
                      f"the last {record['image']}; is the whole dataset broken? "
                      f"(python -m bsf_jax.data.check lists every problem)")
    return out


class _NotSkipped(grain.transforms.Filter):

  def filter(self, element):
    return element is not None


def _concat_crops(elements):
  """Batches volumes' crop stacks into one (volumes * S, ...) batch."""
  if len(elements) == 1:  # one volume per batch: its crops are the batch
    return elements[0]
  return {k: np.concatenate([e[k] for e in elements]) for k in elements[0]}


def _load_datalist(cfg):
  """(train, val) records: from the store's index when `data.store` is set."""
  return (store_lib.load_datalist if cfg.store else datalists.load_datalist)(cfg)


def _process(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # Only needed to discover the process topology.
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return process_index, process_count


def _volumes_per_step(cfg, process_count):
  crops = cfg.batch_size
  if crops % process_count or (crops // process_count) % cfg.num_samples:
    raise ValueError(f"data.batch_size={crops} must be divisible by process_count "
                     f"({process_count}) x num_samples ({cfg.num_samples})")
  return crops // process_count // cfg.num_samples


def _finish(ds, cfg, volumes):
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, cfg.read_threads),
                                            prefetch_buffer_size=max(2, volumes)))
  ds = ds.filter(_NotSkipped()).batch(volumes, drop_remainder=True, batch_fn=_concat_crops)
  return _mp_prefetch(ds, cfg)


def _mp_prefetch(ds, cfg):
  if cfg.workers <= 0:
    return ds
  from absl import flags
  # Grain workers read absl flags; outside an absl app (tests, notebooks,
  # benchmarks) nothing parsed them, so accept their defaults.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  # A dead worker raises instead of hanging the run (workers.py says why).
  return workers.WatchedDataset(ds, grain.MultiprocessingOptions(
      num_workers=cfg.workers, per_worker_buffer_size=cfg.prefetch))


def make_train_iter(cfg, *, task: str, seed: int, process_index=None,
                    process_count=None, records=None):
  """Infinite, resumable iterator of process-local training batches.

  Args:
    cfg: the `config.data` block.
    task: "ssl" -> {"image": float32 [b, *roi, C]}; "seg" -> additionally
      {"label": float32 [b, *roi, K]} (K = 3 TC/WT/ET for BraTS, 1 for ATLAS).
    seed: data seed (shuffle order, crops, augmentation).
    process_index, process_count: JAX process topology (default: from jax).
    records: optional explicit training records (default: `load_datalist`).

  Returns:
    A `grain.DatasetIterator` with `get_state()` / `set_state()`.
  """
  spec = crop_spec(cfg, task)
  pi, pc = _process(process_index, process_count)
  volumes = _volumes_per_step(cfg, pc)
  if records is None:
    records = _load_datalist(cfg)[0]
  if not records:
    raise DataError(f"{cfg.datalist or cfg.root}: empty training datalist")
  if len(records) < pc:
    raise DataError(f"{cfg.datalist or cfg.root}: {len(records)} training records "
                    f"for {pc} processes")
  ds = grain.MapDataset.source(records).seed(seed)[pi::pc]
  ds = ds.shuffle().repeat()
  # Twice the shard in a row all failing cannot be bad luck in the shuffle.
  ds = ds.random_map(TrainTransform(spec, augment=task == "seg" and spec.augment,
                                    max_skips=2 * len(records) // pc + 16))
  return iter(_finish(ds, cfg, volumes))


class EvalTransform(grain.transforms.RandomMap):
  """Deterministic eval elements; skipped/padding records get mask False."""

  def __init__(self, spec: crops.CropSpec, task: str):
    self.spec, self.task = spec, task

  def _placeholder(self, c):
    roi = self.spec.roi
    if self.task == "ssl":
      return {"image": np.zeros((self.spec.num_samples, *roi, c), np.float32),
              "mask": np.zeros(self.spec.num_samples, bool)}
    k = len(self.spec.labels.regions)
    return {"image": np.zeros((*roi, c), np.float32), "label": np.zeros((*roi, k), np.float32),
            "raw_label": np.zeros(roi, np.int16), "affine": np.eye(4), "path": "",
            "label_path": "", "mask": np.asarray(False)}

  def random_map(self, record, rng):
    c = len(record["image"])
    if not record.get("valid", True):
      return self._placeholder(c)

    def run():
      if "store" in record or "store_error" in record:
        return self._from_store(record, rng)
      loaded = crops.load_record(record, self.spec)
      chans, label, affine = loaded.chans, loaded.label, loaded.affine
      if self.task == "ssl":
        try:
          out = crops.make_crops(loaded, rng, self.spec, augment=False)
        except DataError as e:
          raise DataError(f"{record['image'][0]}: {e}") from e
        return {**out, "mask": np.ones(self.spec.num_samples, bool)}
      image = np.stack(chans, axis=-1)
      return {"image": self.spec.intensity.apply(image, self.spec.intensity.fit(chans)),
              "label": L.to_channels(label, self.spec.labels),
              "raw_label": label.astype(np.int16), "affine": affine,
              "path": record["image"][0], "label_path": record["label"],
              "mask": np.asarray(True)}
    out = crops.guard(self.spec, record, run)
    return self._placeholder(c) if out is None else out

  def _from_store(self, record, rng):
    if self.task == "ssl":
      out = crops.store_crops(record, rng, self.spec, augment=False)
      return {**out, "mask": np.ones(self.spec.num_samples, bool)}
    subject = store_lib.Subject(record)
    image, label = subject.volume()
    return {"image": image, "label": L.to_channels(label, self.spec.labels),
            "raw_label": label.astype(np.int16), "affine": subject.affine,
            "path": record["image"][0], "label_path": record["label"],
            "mask": np.asarray(True)}


def make_eval_iter(cfg, *, task: str, process_index=None, process_count=None,
                   records=None, batch_size=None):
  """Finite, deterministic eval iterator (same batches on every call).

  Args:
    cfg: the `config.data` block.
    task: "ssl" -> batches {"image": [b, *roi, C], "mask": bool [b]} of crops
      at fixed (eval_seed) positions, b = local batch size, last batch padded;
      "seg" -> one whole volume per element: {"image": [H, W, D, C], "label":
      [H, W, D, K], "raw_label": [H, W, D] original labels, "affine": [4, 4],
      "path", "label_path", "mask": bool scalar}.
    process_index, process_count: JAX process topology (default: from jax).
    records: optional explicit records (default: validation part of the datalist).
    batch_size: global crops per eval batch (ssl; default cfg.batch_size).

  Returns:
    An iterable (each `iter()` starts over; a Grain `IterDataset`, or with
    workers a `workers.WatchedDataset`); every process yields the same number
    of items.
  """
  spec = crop_spec(cfg, task)
  pi, pc = _process(process_index, process_count)
  if records is None:
    records = _load_datalist(cfg)[1]
  if not records:
    raise DataError(f"{cfg.datalist or cfg.root}: empty validation datalist")
  if task == "ssl":
    per_call = cfg.copy_and_resolve_references()
    if batch_size is not None:
      per_call.batch_size = batch_size
    volumes = _volumes_per_step(per_call, pc)
  else:
    volumes = 1
  # Pad with masked copies so all processes see the same number of batches.
  unit = volumes * pc
  n = -(-len(records) // unit) * unit
  padded = list(records) + [{**records[0], "valid": False}] * (n - len(records))
  ds = grain.MapDataset.source(padded[pi::pc]).seed(cfg.eval_seed)
  ds = ds.random_map(EvalTransform(spec, task))
  if task == "ssl":
    ds = ds.batch(volumes, batch_fn=_concat_crops)
  # Prefetch reads ahead but keeps order; each iter() starts from the top.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, cfg.read_threads),
                                            prefetch_buffer_size=2))
  return _mp_prefetch(ds, cfg)


def to_global_batch(batch: dict, sharding) -> dict:
  """Process-local numpy batch -> global `jax.Array`s (batch axis sharded).

  Args:
    batch: dict of arrays whose leading axis is the process-local batch;
      non-array entries (paths) are dropped.
    sharding: a `jax.sharding.Sharding` for the global batch (e.g.
      NamedSharding(mesh, P("data"))).

  Returns:
    dict of global jax.Arrays.
  """
  import jax
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()
          if isinstance(v, np.ndarray) and v.dtype.kind in "biuf"}
