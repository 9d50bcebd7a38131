"""Config parsing (`configs/<method>.py:arg`), overrides and locking."""
import sys

import ml_collections
import pytest
from ml_collections import config_flags
from absl import flags

from helpers import CONFIGS, load_config
from rsalign_jax import configlib


def test_parse_arg_types_bare_booleans_and_positional():
  arg = configlib.parse_arg("rsicd,runlocal,batch_size=64,lr=0.5", positional="dataset", dataset="synthetic",
                            runlocal=False, batch_size=128, lr=1.0)
  assert (arg.dataset, arg.runlocal, arg.batch_size, arg.lr) == ("rsicd", True, 64, 0.5)
  assert isinstance(arg.batch_size, int)


@pytest.mark.parametrize("text, message", [
    ("batch_sise=3", "unknown option 'batch_sise'"),
    ("runlocal=maybe", "expected a boolean"),
    ("batch_size=big", "expected int"),
    ("rsicd", "not a boolean option"),
])
def test_parse_arg_errors(text, message):
  with pytest.raises(ValueError, match=message):
    configlib.parse_arg(text, runlocal=False, batch_size=128)


def test_hvsa_default_paper_and_runlocal_configs():
  default = load_config("hvsa")
  assert default.dataset.name == "synthetic_rs/small" and default.model_name == "hvsa"
  paper = load_config("hvsa", "rsitmd")
  assert (paper.dataset.name, paper.optimizer.lr, paper.input.batch_size, paper.total_epochs) == ("rsitmd", 5e-4,
                                                                                               256, 50)
  assert (paper.model.word_dim, paper.model.hidden_dim, paper.model.resnet_width) == (620, 2400, 64)
  assert paper.input.pp_train == "decode|resize(278)|random_rotate(0, 90)|random_crop(256)|normalize"
  assert paper.schedule.to_dict() == dict(name="warmup_step_decay", warmup_epochs=10, decay_every_epochs=20,
                                          decay_factor=0.1)
  rsicd = load_config("hvsa", "rsicd,manual_dir=/data/RSICD")
  assert rsicd.optimizer.lr == 1e-3 and rsicd.dataset.manual_dir == "/data/RSICD"
  assert (rsicd.dataset.train_split, rsicd.dataset.val_split, rsicd.dataset.test_split) == ("train_papers",
                                                                                          "val_papers", "test")
  assert load_config("hvsa", "ucm").dataset.name == "ucm_captions"
  with pytest.raises(ValueError, match="dataset 'coco': expected 'synthetic' or one of"):
    load_config("hvsa", "coco")
  local = load_config("hvsa", "runlocal")
  assert local.dataset.name == "synthetic_rs/tiny" and local.total_steps > 0


def test_command_line_overrides_are_typed_and_locked():
  def parse(*overrides):
    argv = ["prog", f"--config={CONFIGS / 'hvsa.py'}:runlocal", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    return flag_values.config

  config = parse("--config.optimizer.lr=0.25", "--config.input.batch_size=32")
  assert config.optimizer.lr == 0.25 and config.input.batch_size == 32
  assert config.dataset.name == "synthetic_rs/tiny"
  with pytest.raises(AttributeError, match="learning_rate"):
    parse("--config.optimizer.learning_rate=0.1")
  with pytest.raises(flags.IllegalFlagValueError):
    parse("--config.input.batch_size=big")


def test_locked_config_rejects_new_fields():
  config = load_config("hvsa")
  config.lock()
  with pytest.raises(AttributeError):
    config.optimizer.learning_rate = 0.1
  assert isinstance(config, ml_collections.ConfigDict)


@pytest.mark.parametrize("name, arg", [("hvsa", "runlocal"), ("ccls2t", None), ("amfmn", "rsitmd,dynamic"),
                                       ("rsicd_aid150", None)])
def test_a_saved_config_loads_back_equal_and_locked(tmp_path, name, arg):
  config = load_config(name, arg)
  configlib.save_resolved(config, str(tmp_path))
  loaded = configlib.load_resolved(str(tmp_path))
  assert loaded.to_dict() == config.to_dict()  # tuples stay tuples through the JSON file
  with pytest.raises(AttributeError):
    loaded.optimizer.learning_rate = 1e-3


def test_a_workdir_without_a_saved_config_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=rf"--workdir={tmp_path} has no config.json .* pass the run's --config"):
    configlib.load_resolved(str(tmp_path))


@pytest.mark.parametrize("arg, override, message", [
    ("runlocal", "--config.optimizer.learning_rate=1e-3", "error: --config.optimizer.learning_rate: config.optimizer "
     "has no field 'learning_rate'; its fields: b1, b2, eps, frozen, grad_clip_norm, lr, name, weight_decay"),
    ("runlocal", "--config.optimzer.lr=1", "error: --config.optimzer.lr: config has no field 'optimzer' (did you "
     "mean optimizer?); its fields: checkpoint_every_steps, "),
    ("runlocal", "--config.seed=abc", "error: flag --config.seed=abc: invalid literal for int() with base 10: 'abc' "
     "(expected an integer)"),
    ("runlocl", "--config.seed=1", "error: flag --config=CONFIG:runlocl: dataset 'runlocl': expected 'synthetic' "
     "or one of ['rsicd', 'rsitmd', 'sydney', 'ucm']"),
])
def test_command_line_config_mistakes_are_one_line_errors(arg, override, message, monkeypatch):
  from rsalign_jax import main as main_lib  # pylint: disable=g-import-not-at-top  (defines the command-line flags)
  argv = ["main", f"--config={CONFIGS / 'hvsa.py'}:{arg}", "--workdir=/tmp/unused", override]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads its overrides from sys.argv
  flags.FLAGS.unparse_flags()
  try:
    with pytest.raises(SystemExit) as exit_info:
      main_lib.parse_flags(argv)
  finally:
    flags.FLAGS.unparse_flags()
  assert str(exit_info.value.code).replace(str(CONFIGS / "hvsa.py"), "CONFIG").startswith(message)
  assert "\n" not in str(exit_info.value.code)
