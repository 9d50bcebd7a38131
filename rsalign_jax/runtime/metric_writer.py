"""Scalars, tables, images and hparams to TensorBoard event files (tensorboardX, no TensorFlow), scalars also to
`metrics.jsonl`, and the console, from process 0 only.

A metric has one name everywhere: its jsonl key is its TensorBoard tag (`val/i2t_R1`). tensorboardX would rewrite
characters a tag may not hold, so such a name is an error here instead of a second spelling."""
import json
import logging as python_logging
import os
import re

import jax
from absl import logging

_TAG = re.compile(r"[-/\w.]+")  # the characters tensorboardX keeps in a tag


class MetricWriter:
  """TensorBoard events and `logdir/metrics.jsonl`, one `{"step": ..., name: value, ...}` line per logged step (easy
  to read back without TensorBoard).

  Each `scalars` call reaches the file at once, so a kill loses nothing; a call at the step of the file's last line
  rewrites that line with both calls' values, so the train, perf, val and test scalars of one step share one line.
  """

  def __init__(self, logdir):
    self._active = jax.process_index() == 0
    self._writer = None
    self._jsonl_path = os.path.join(logdir, "metrics.jsonl")
    self._last = None  # (byte offset, step, values) of the jsonl's last line, which a call at that step extends
    if self._active:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._writer = tensorboardX.SummaryWriter(logdir)

  def truncate_after(self, step):
    """Drops the jsonl lines of steps after `step` (and a line cut short by a kill): a run resumed at `step` rewrites
    them, so the file keeps exactly one trajectory even after a crash."""
    if not self._active or not os.path.exists(self._jsonl_path):
      return
    with open(self._jsonl_path, "rb") as f:
      kept = [line for line in f if line.endswith(b"\n") and json.loads(line)["step"] <= step]
    with open(self._jsonl_path, "wb") as f:
      f.writelines(kept)
      self._last = None
      if kept:
        last = json.loads(kept[-1])
        self._last = (f.tell() - len(kept[-1]), last.pop("step"), last)

  def scalars(self, step, values, *, prefix=""):
    if not self._active:
      return
    values = {f"{prefix}{name}": float(value) for name, value in values.items()}
    bad = [name for name in values if not _TAG.fullmatch(name)]
    if bad:
      raise ValueError(f"metric names {bad}: a name may hold only letters, digits and '_', '-', '.', '/' (the "
                       "characters of a TensorBoard tag), so that it reads the same in metrics.jsonl and TensorBoard")
    for name, value in values.items():
      self._writer.add_scalar(name, value, step)
    self._writer.flush()
    self._write_line(int(step), values)

  def _write_line(self, step, values):
    """Appends `step`'s jsonl line, or rewrites the last line in place with `values` added if it is `step`'s."""
    fd = os.open(self._jsonl_path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
      if self._last is not None and self._last[1] == step:
        offset, values = self._last[0], {**self._last[2], **values}
      else:
        offset = os.fstat(fd).st_size
      line = (json.dumps({"step": step, **values}) + "\n").encode()
      os.pwrite(fd, line, offset)
      os.ftruncate(fd, offset + len(line))
    finally:
      os.close(fd)
    self._last = (offset, step, values)

  def hparams(self, config, metrics):
    """The run's TensorBoard hparams: `config` (a nested dict) flattened to dotted names ('optimizer.lr'), with the
    scalar tags `metrics` (logged by `scalars`) as its metrics. Values other than numbers, strings and bools are
    written as strings, so every config field shows."""
    if not self._active:
      return
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    experiment, session_start, session_end = summary.hparams(_flatten(config), dict.fromkeys(metrics))
    for event in (experiment, session_start, session_end):
      self._writer.file_writer.add_summary(event)
    self._writer.flush()

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


def _flatten(tree, prefix=""):
  """{'a': {'b': 1}} -> {'a.b': 1}; leaves that are not bool, int, float or str become their str()."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
  return flat


def quiet_library_info_logs(prefixes=("/orbax/", "/grain/")):
  """Keeps libraries' per-save/per-read INFO lines out of the console; their warnings and errors still show.

  Also drops JAX's "Unable to initialize backend 'tpu'" (or 'cuda', 'rocm'), logged whenever it probes a plugin
  for hardware the machine lacks; where an NVIDIA GPU or a TPU is present but its backend failed, JAX still warns.
  """
  logging.get_absl_logger().addFilter(
      lambda record: record.levelno >= python_logging.WARNING or not any(p in record.pathname for p in prefixes))
  python_logging.getLogger("jax._src.xla_bridge").addFilter(
      lambda record: not record.getMessage().startswith("Unable to initialize backend"))


def log(message, *args):
  """Console log from process 0 only."""
  if jax.process_index() == 0:
    logging.info(message, *args)
