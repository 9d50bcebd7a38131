"""Test session setup: 8 virtual CPU devices, so multi-device code is exercised everywhere, and one persistent XLA
compilation cache per test run, shared by the xdist workers and the processes the multi-process tests start: many
tests train the same runlocal configs, and compiling them is most of the suite's time. For the same reason the
backend compiles without LLVM's optimisation passes (`--xla_backend_optimization_level=0`): the same HLO and the same
floating-point semantics (no fast-math at any level), slower loops, and the tests' arrays are small."""
import os
import shutil
import tempfile

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_configure(config):
  workerinput = getattr(config, "workerinput", None)
  if workerinput is None:  # the controlling process (or a run without xdist) owns the cache directory
    config.xla_cache_dir = tempfile.mkdtemp(prefix="rsalign_jax_xla_cache_")
    cache_dir = config.xla_cache_dir
  else:
    cache_dir = workerinput["xla_cache_dir"]
  os.environ["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
  """xdist hook (controller): hands each worker the run's cache directory."""
  node.workerinput["xla_cache_dir"] = node.config.xla_cache_dir


def pytest_unconfigure(config):
  if getattr(config, "workerinput", None) is None and hasattr(config, "xla_cache_dir"):
    shutil.rmtree(config.xla_cache_dir, ignore_errors=True)


TRAINED_WORKDIRS = ("hvsa_run", "trained_dual_encoder")


@pytest.hookimpl(tryfirst=True)  # before xdist's hook reads the groups
def pytest_collection_modifyitems(items):
  """Tests reading a session's trained workdirs run in one xdist group (`--dist loadgroup`): one worker trains each
  workdir instead of every worker its own."""
  for item in items:
    if set(TRAINED_WORKDIRS) & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.xdist_group("trained_workdirs"))


@pytest.fixture(autouse=True)
def _absl_logger_level():
  """Parsing the command-line flags (tests that run `main`) sets absl's logger to `--verbosity`'s level (WARNING);
  every test starts from the session's, so the ones that read INFO lines through caplog see them."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  logger = absl_logging.get_absl_logger()
  level = logger.level
  yield
  logger.setLevel(level)


@pytest.fixture(scope="session")
def trained_dual_encoder(tmp_path_factory):
  """(config, workdir, results) of the runlocal dual encoder trained 200 steps (batch 32, lr 2e-3 without warm-up,
  only the test evaluation) on synthetic_rs/small at 32 px: a model that has learned, for the tests that check it
  retrieves and classifies far above chance."""
  from helpers import disabled, runlocal_config  # pylint: disable=g-import-not-at-top  (after the device flags)
  from rsalign_jax import train  # pylint: disable=g-import-not-at-top
  config = runlocal_config(tmp_path_factory, "clip", "runlocal", total_steps=200, checkpoint_every_steps=200,
                           **{"dataset.name": "synthetic_rs/small", "input.batch_size": 32, "optimizer.lr": 2e-3,
                              "schedule.warmup_epochs": 0, **disabled("random_init", "val", "val_gallery")})
  workdir = tmp_path_factory.mktemp("trained_dual_encoder")
  return config, workdir, train.train_and_evaluate(config, str(workdir))


@pytest.fixture(scope="session")
def hvsa_run(tmp_path_factory):
  """(config, workdir, results) of one finished runlocal HVSA run (4 steps, val at step 4), trained once and shared
  by the tests that only read a trained workdir."""
  from helpers import disabled, runlocal_config  # pylint: disable=g-import-not-at-top  (after the device flags above)
  from rsalign_jax import train  # pylint: disable=g-import-not-at-top
  config = runlocal_config(tmp_path_factory, **disabled("random_init"))
  workdir = tmp_path_factory.mktemp("hvsa")
  return config, workdir, train.train_and_evaluate(config, str(workdir))
