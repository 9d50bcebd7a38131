"""Shared test helpers: load a `configs/<name>.py:arg` config, point it at the session's tfds dir, override fields."""
import pathlib
import struct
import sys

from rsalign_jax import configlib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def config_module(name):
  """The `configs/<name>.py` module itself (for its constants, or several `get_config` calls)."""
  return configlib.load_module(CONFIGS / f"{name}.py")


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


def disabled(*evals):
  """`runlocal_config` overrides turning off the `config.evals` entries named `evals`."""
  return {f"evals.{name}.enabled": False for name in evals}


def write_wordpiece_vocab(path):
  """A 10-entry BERT vocab.txt ([PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, ...) at `path`; returns the path."""
  path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "plane", "##s", "the", "air", "##port"])
                  + "\n")
  return path


def tensorboard_events(logdir):
  """The Event protos of the TensorBoard event files in `logdir`, read back without TensorFlow. TFRecord framing:
  an 8-byte length, its 4-byte CRC, the record, its 4-byte CRC (the CRCs are not checked)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  events = []
  for path in sorted(pathlib.Path(logdir).glob("events.out.tfevents.*")):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      (length,) = struct.unpack_from("<Q", data, offset)
      events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
      offset += length + 16
  return events


def tensorboard_scalars(logdir):
  """{(tag, step): value} of the scalars in `logdir`'s event files."""
  return {(value.tag, event.step): value.simple_value for event in tensorboard_events(logdir)
          for value in event.summary.value if value.WhichOneof("value") == "simple_value"}


def tensorboard_hparams(logdir):
  """({name: value}, [metric tag]): what `logdir`'s event files give TensorBoard's hparams dashboard."""
  from tensorboardX.proto import plugin_hparams_pb2  # pylint: disable=g-import-not-at-top
  plugin_data = {value.tag: plugin_hparams_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                 for event in tensorboard_events(logdir) for value in event.summary.value
                 if value.metadata.plugin_data.plugin_name == "hparams"}
  start = plugin_data["_hparams_/session_start_info"].session_start_info
  hparams = {name: getattr(value, value.WhichOneof("kind")) for name, value in start.hparams.items()}
  return hparams, [metric.name.tag for metric in plugin_data["_hparams_/experiment"].experiment.metric_infos]


def run_main(monkeypatch, argv):
  """`python -m rsalign_jax.main ARGV...` in this process: parses `argv` (config_flags reads its overrides from
  sys.argv too) and runs `main`, leaving the flags unparsed afterwards."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from rsalign_jax import main as main_lib  # pylint: disable=g-import-not-at-top  (defines the command-line flags)
  argv = ["main", *argv]
  monkeypatch.setattr(sys, "argv", argv)
  flags.FLAGS.unparse_flags()
  try:
    flags.FLAGS(argv)
    main_lib.main(argv[:1])
  finally:
    flags.FLAGS.unparse_flags()


RECALLS = ("i2t_R1", "i2t_R5", "i2t_R10", "t2i_R1", "t2i_R5", "t2i_R10")


def assert_consistent_results(results):
  """A finished run's results.json: recalls in [0, 100] and rising with K in each direction, mR their mean, rsum
  their sum; and, when the run evaluated its random init, a test table that differs from it (training moved the
  model)."""
  test = results["test"]
  recalls = [test[name] for name in RECALLS]
  assert all(0.0 <= r <= 100.0 for r in recalls), test
  assert recalls[0] <= recalls[1] <= recalls[2] and recalls[3] <= recalls[4] <= recalls[5], test
  assert abs(test["mR"] - sum(recalls) / 6) < 1e-6 and abs(test["rsum"] - sum(recalls)) < 1e-6, test
  if results.get("random_init") is not None:
    assert results["random_init"] != test


def with_querybank(config):
  """`config` with a querybank entry on the test split (`evaluation/evaluators/querybank.py`)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.evals.test_qbnorm = dict(type="querybank", split=config.dataset.test_split, at="end", beta=10.0)
  return config
