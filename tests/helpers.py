"""Shared test helpers: load a `configs/<name>.py:arg` config, point it at the session's tfds dir, override fields."""
import importlib.util
import pathlib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def config_module(name):
  """The `configs/<name>.py` module itself (for its constants, or several `get_config` calls)."""
  spec = importlib.util.spec_from_file_location(f"{name}_config", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(name, arg=None):
  return config_module(name).get_config(arg)


def runlocal_config(tmp_path_factory, name="hvsa", arg="runlocal", **overrides):
  """`configs/<name>.py:<arg>` on the session's tfds data dir, with dotted-key overrides ('optimizer.lr': 0.1)."""
  config = load_config(name, arg)
  config.dataset.data_dir = str(tmp_path_factory.getbasetemp() / "tfds")
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def write_wordpiece_vocab(path):
  """A 10-entry BERT vocab.txt ([PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, ...) at `path`; returns the path."""
  path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "plane", "##s", "the", "air", "##port"])
                  + "\n")
  return path
