"""Progress lines (`rsalign_jax.runtime.progress`): plain, rate-limited lines with rate and ETA on a fake clock, and
the lines the evaluator, export and a dataset build log; and JAX's backend probing kept out of the logs."""
import logging
import re

import jax
import jax.numpy as jnp
import pytest

from helpers import runlocal_config
from rsalign_jax import experiment
from rsalign_jax.data import sources
from rsalign_jax.modes import export
from rsalign_jax.modes import trained as trained_lib
from rsalign_jax.runtime import metric_writer
from rsalign_jax.runtime import progress as progress_lib
from rsalign_jax.runtime import sharding as sharding_lib

TERMINAL_CODES = re.compile(r"[\r\x1b\x08]")


class FakeClock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def make_progress(total, interval=10.0):
  clock, lines = FakeClock(), []
  progress = progress_lib.Progress("embedding test images", total, interval=interval, clock=clock,
                                   log=lambda message, *args: lines.append(message % args))
  return progress, clock, lines


def test_lines_at_most_once_per_interval_with_rate_eta_and_a_last_line():
  progress, clock, lines = make_progress(5000)
  clock.now += 20  # the first batch: compilation
  progress.update(100)
  assert lines == ["embedding test images: 100/5,000 (2%), 5/s, ETA 16m20s"]
  for _ in range(9):  # 4 s per batch of 100: 25/s from here on
    clock.now += 4
    progress.update(100)
  assert len(lines) == 4  # at 32, 44 and 56 s: 12 s apart, the first batch after each interval
  assert lines[-1] == "embedding test images: 1,000/5,000 (20%), 25/s, ETA 2m40s"
  clock.now += 164
  progress.update(4000)
  progress.done()
  progress.done()
  assert lines[-1] == "embedding test images: 5,000/5,000 (100%) in 3m40s, 22.7/s"
  assert len(lines) == 5  # the update that completes the work leaves its line to done()
  assert not any(TERMINAL_CODES.search(line) for line in lines)


def test_work_shorter_than_one_interval_logs_nothing():
  progress, clock, lines = make_progress(50)
  for _ in range(5):
    clock.now += 1
    progress.update(10)
  progress.done()
  assert lines == []


def test_an_error_leaves_out_the_last_line_and_hours_show_as_hours():
  progress, _, lines = make_progress(10, interval=0)
  with pytest.raises(KeyError):
    with progress:
      raise KeyError("stopped")
  assert lines == []
  assert progress_lib.format_duration(7500) == "2h05m"
  assert progress_lib.format_rate(0.25) == "0.25/s" and progress_lib.format_rate(12345.6) == "12,346/s"


def test_a_dataset_build_logs_its_start_and_duration_without_progress_bars(tmp_path_factory, tmp_path, caplog, capfd):
  config = runlocal_config(tmp_path_factory)
  config.dataset.data_dir = str(tmp_path / "tfds")
  with caplog.at_level("INFO"):
    sources.open_split(config.dataset, "test")
    sources.open_split(config.dataset, "val")
  mine = [m for m in caplog.messages if m.startswith(("building dataset", "built dataset"))]
  assert len(mine) == 2  # the second split reuses the build
  assert re.fullmatch(r"building dataset synthetic_rs/tiny in .*/tfds/synthetic_rs/tiny/1\.0\.0", mine[0])
  assert re.fullmatch(r"built dataset synthetic_rs/tiny in \dm\d\ds", mine[1])
  captured = capfd.readouterr()
  assert not TERMINAL_CODES.search(captured.out + captured.err)


def test_evaluation_and_export_log_progress(tmp_path_factory, tmp_path, caplog, monkeypatch):
  monkeypatch.setattr(progress_lib, "INTERVAL_S", 0.0)  # a line on every batch
  config = runlocal_config(tmp_path_factory, eval_batch_size=8)
  setup = experiment.build_setup(config, str(tmp_path), sharding_lib.make_mesh())
  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype, device=a.sharding), setup.abstract_state)
  trained = trained_lib.Trained(setup, zeros, "zeros", 0)  # no init to compile: only the lines matter here
  with caplog.at_level("INFO"), jax.set_mesh(setup.mesh):
    setup.retrieval.evaluate(setup.make_evaluator("test"), trained.variables)
    export.write(trained, setup.split("test"), str(tmp_path / "export"))
  count = r"\d+/\d+ \(\d+%\), [\d.,]+/s, ETA \dm\d\ds"
  last = r"(\d+)/\1 \(100%\) in \dm\d\ds, [\d.,]+/s"
  for name in ("embedding test images", "embedding test distinct captions", "embedding test captions"):
    assert any(re.fullmatch(f"{name}: {count}", line) for line in caplog.messages), name
  for name in ("embedding test images", "embedding test distinct captions", "scoring test images",
               "embedding test captions"):
    assert any(re.fullmatch(f"{name}: {last}", line) for line in caplog.messages), name
  assert not any(TERMINAL_CODES.search(line) for line in caplog.messages)


def test_backend_probing_is_quiet_and_real_warnings_show(caplog, monkeypatch):
  jax_logger = logging.getLogger("jax._src.xla_bridge")
  for logger in (jax_logger, logging.getLogger("absl")):
    monkeypatch.setattr(logger, "filters", list(logger.filters))  # the filters are undone after the test
  metric_writer.quiet_library_info_logs()
  with caplog.at_level("INFO"):
    jax_logger.info("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so")
    jax_logger.info("Unable to initialize backend 'rocm': module 'jax_plugins.xla_rocm' has no attribute")
    jax_logger.warning("An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib is not installed.")
  assert caplog.messages == ["An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib is not "
                             "installed."]
