"""Progress of long loops over a known number of items, as plain log lines that read well in a log file.

`Progress("embedding test images", total)` with `update(n)` after each batch logs at most one line every `interval`
seconds, e.g. `embedding test images: 1,200/5,000 (24%), 58.1/s, ETA 1m05s`, and `done()` a last one with the
total time. No carriage returns or terminal codes (a tqdm bar is both, in a file). Work shorter than one interval
logs nothing, so the evaluations of a training run add no lines; its caller's own summary says it is done.
"""
import time

from rsalign_jax.runtime import metric_writer

INTERVAL_S = 15.0  # seconds between lines; tests set 0 to log every update


def format_duration(seconds):
  """`1m05s`, or `2h03m` from an hour on."""
  minutes, seconds = divmod(int(seconds), 60)
  return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"


def format_rate(per_second):
  """Three significant digits below 100 items/s (`58.1/s`, `0.25/s`), whole items above (`1,234/s`)."""
  return f"{per_second:.3g}/s" if per_second < 100 else f"{per_second:,.0f}/s"


class Progress:
  """Counts `update(n)` items of `total` and logs progress lines (see the module docstring).

  The rate (and so the ETA) leaves out the first update, which in a jitted loop carries the compilation; the last
  line's rate is items over the whole time. As a context manager, leaving the block calls `done()` (not after an
  error: the traceback says where it stopped). `clock` and `log` are injectable for tests.
  """

  def __init__(self, name, total, *, interval=None, clock=time.monotonic, log=metric_writer.log):
    self.name, self.total, self.count = name, int(total), 0
    self._interval = INTERVAL_S if interval is None else interval
    self._clock, self._log = clock, log
    self._start = self._last_line = clock()
    self._first = None  # (time, count) at the first update
    self._done = False

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc_value, traceback):
    if exc_type is None:
      self.done()

  def update(self, n=1):
    """Adds `n` items done; logs a line if `interval` seconds have passed since the last one (or the start), unless
    all are done (that is `done()`'s line)."""
    self.count += n
    now = self._clock()
    if self._first is None:
      self._first = (now, self.count)
    if now - self._last_line >= self._interval and self.count < self.total:
      self._last_line = now
      rate = self._steady_rate(now)
      eta = f", ETA {format_duration((self.total - self.count) / rate)}" if rate > 0 else ""
      self._log("%s: %s, %s%s", self.name, self._counts(), format_rate(rate), eta)

  def done(self):
    """Logs the last line (count, total time, average rate) if the work took at least one interval; once."""
    if self._done:
      return
    self._done = True
    elapsed = self._clock() - self._start
    if elapsed >= self._interval:
      rate = self.count / elapsed if elapsed > 0 else 0.0
      self._log("%s: %s in %s, %s", self.name, self._counts(), format_duration(elapsed), format_rate(rate))

  def _counts(self):
    percent = 100 * self.count // self.total if self.total else 100
    return f"{self.count:,}/{self.total:,} ({percent}%)"

  def _steady_rate(self, now):
    """Items per second since the first update, or since the start while there is only one."""
    first_time, first_count = self._first
    if self.count > first_count and now > first_time:
      return (self.count - first_count) / (now - first_time)
    return self.count / (now - self._start) if now > self._start else 0.0
