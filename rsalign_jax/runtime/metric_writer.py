"""Scalars and tables to TensorBoard event files (tensorboardX, no TensorFlow) and the console, from process 0."""
import logging as python_logging

import jax
from absl import logging


class MetricWriter:

  def __init__(self, logdir):
    self._active = jax.process_index() == 0
    self._writer = None
    if self._active:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._writer = tensorboardX.SummaryWriter(logdir)

  def scalars(self, step, values, *, prefix=""):
    if not self._active:
      return
    for name, value in values.items():
      self._writer.add_scalar(f"{prefix}{name}".replace("@", ""), float(value), step)  # TensorBoard tags: no '@'

    self._writer.flush()

  def text(self, step, name, text):
    if self._active:
      self._writer.add_text(name, text, step)
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
