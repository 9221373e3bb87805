"""TensorBoard and console metric writers, and a progress reporter.

clu's metric writers (and `clu.periodic_actions`) import TensorFlow at module
load, which would make TF a hard dependency of a JAX project. The `tensorboard`
package alone ships the event-file writer and protos, so this module writes
TensorBoard scalars and images with it: the same event files TensorBoard (and
clu) produce, with nothing else to install. The interface mirrors clu's
(`write_scalars(step, dict)`, `write_images`, `write_hparams`, `flush`).

Only process 0 writes event files; every process logs to the console.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any, Mapping

import numpy as np
import psutil


class MetricWriter:
  """Writes summaries to `logdir` (process 0) and to the log."""

  def __init__(self, logdir: str, *, write_files: bool = True):
    self._events = None
    if write_files:
      from tensorboard.summary.writer.event_file_writer import EventFileWriter
      self._events = EventFileWriter(logdir)

  def _add(self, step: int, values: list) -> None:
    if self._events is None:
      return
    from tensorboard.compat.proto import event_pb2, summary_pb2
    summary = summary_pb2.Summary(value=values)
    self._events.add_event(event_pb2.Event(
        wall_time=time.time(), step=int(step), summary=summary))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    from tensorboard.compat.proto import summary_pb2
    logging.info("[%d] %s", step, ", ".join(
        f"{k}={float(v):.6g}" for k, v in sorted(scalars.items())))
    self._add(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                     for k, v in scalars.items()])

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Images are [N, H, W, C] floats in [0, 1]; the first of each is written."""
    if self._events is None:
      return
    from PIL import Image
    from tensorboard.compat.proto import summary_pb2
    values = []
    for tag, batch in images.items():
      pixels = np.clip(np.asarray(batch[0], np.float32), 0, 1)
      pixels = (pixels[..., 0] if pixels.shape[-1] == 1 else pixels) * 255
      buffer = io.BytesIO()
      Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
      height, width = pixels.shape[:2]
      values.append(summary_pb2.Summary.Value(tag=tag, image=(
          summary_pb2.Summary.Image(
              height=height, width=width,
              colorspace=1 if pixels.ndim == 2 else 3,
              encoded_image_string=buffer.getvalue()))))
    self._add(step, values)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """The flattened config, as one text summary at step 0."""
    if self._events is None:
      return
    from tensorboard.compat.proto import summary_pb2, tensor_pb2
    from tensorboard.compat.proto import tensor_shape_pb2
    text = "\n".join(f"    {k} = {v}" for k, v in sorted(hparams.items()))
    tensor = tensor_pb2.TensorProto(
        dtype=7, string_val=[text.encode()],  # 7 = DT_STRING.
        tensor_shape=tensor_shape_pb2.TensorShapeProto())
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
    self._add(0, [summary_pb2.Summary.Value(tag="config", tensor=tensor,
                                            metadata=metadata)])

  def flush(self) -> None:
    if self._events is not None:
      self._events.flush()

  def close(self) -> None:
    if self._events is not None:
      self._events.close()


class Progress:
  """steps/s, ETA, host RSS and (when FLOPs per step and a peak are known) MFU.

  The host RSS is logged so a leak (a growing cache, a held batch) shows in
  TensorBoard long before the job is OOM-killed.
  """

  def __init__(self, num_steps: int, start_step: int,
               flops_per_step: float | None = None,
               peak_flops: float | None = None):
    self.num_steps = num_steps
    self.flops_per_step = flops_per_step
    self.peak_flops = peak_flops
    self._last = (start_step, time.perf_counter())

  def report(self, step: int) -> dict[str, float]:
    """Rates since the last report (call after a host sync)."""
    last_step, last_time = self._last
    now = time.perf_counter()
    self._last = (step, now)
    rate = (step - last_step) / max(now - last_time, 1e-9)
    out = {"steps_per_sec": rate,
           "host_rss_mib": psutil.Process().memory_info().rss / 2**20}
    eta = (self.num_steps - step) / max(rate, 1e-9)
    if self.flops_per_step:
      out["tflops_per_sec"] = rate * self.flops_per_step / 1e12
      if self.peak_flops:
        out["mfu"] = rate * self.flops_per_step / self.peak_flops
    logging.info("step %d/%d: %.3f steps/s, ETA %s, host RSS %.0f MiB%s",
                 step, self.num_steps, rate, _hms(eta), out["host_rss_mib"],
                 f", MFU {out['mfu']:.1%}" if "mfu" in out else "")
    return out


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
