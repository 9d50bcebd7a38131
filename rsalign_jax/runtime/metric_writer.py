"""Scalars and tables to TensorBoard event files (tensorboardX, no TensorFlow), `metrics.jsonl` and the console,
from process 0 only."""
import json
import logging as python_logging
import os

import jax
from absl import logging


class MetricWriter:
  """Each `scalars` call is one TensorBoard event per value and one `{"step": ..., name: value}` line of
  `logdir/metrics.jsonl` (easy to read back without TensorBoard)."""

  def __init__(self, logdir):
    self._active = jax.process_index() == 0
    self._writer = None
    self._jsonl_path = os.path.join(logdir, "metrics.jsonl")
    if self._active:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._writer = tensorboardX.SummaryWriter(logdir)

  def truncate_after(self, step):
    """Drops the jsonl lines of steps after `step` (and a line cut short by a kill): a run resumed at `step` rewrites
    them, so the file keeps exactly one trajectory even after a crash."""
    if not self._active or not os.path.exists(self._jsonl_path):
      return
    with open(self._jsonl_path) as f:
      kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]
    with open(self._jsonl_path, "w") as f:
      f.writelines(kept)

  def scalars(self, step, values, *, prefix=""):
    if not self._active:
      return
    for name, value in values.items():
      self._writer.add_scalar(f"{prefix}{name}".replace("@", ""), float(value), step)  # TensorBoard tags: no '@'
    self._writer.flush()
    with open(self._jsonl_path, "a") as f:
      f.write(json.dumps({"step": int(step), **{f"{prefix}{k}": float(v) for k, v in values.items()}}) + "\n")

  def text(self, step, name, text):
    if self._active:
      self._writer.add_text(name, text, step)
      self._writer.flush()

  def image(self, step, name, image):
    """An (H, W, 3) uint8 image (TensorBoard's images tab)."""
    if self._active:
      self._writer.add_image(name, image, step, dataformats="HWC")
      self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()


def quiet_library_info_logs(prefixes=("/orbax/", "/grain/")):
  """Keeps libraries' per-save/per-read INFO lines out of the console; their warnings and errors still show."""
  logging.get_absl_logger().addFilter(
      lambda record: record.levelno >= python_logging.WARNING or not any(p in record.pathname for p in prefixes))


def log(message, *args):
  """Console log from process 0 only."""
  if jax.process_index() == 0:
    logging.info(message, *args)
