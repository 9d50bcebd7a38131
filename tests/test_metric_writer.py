"""MetricWriter: one metrics.jsonl line per logged step, the same names in jsonl and TensorBoard, hparams."""
import json

import pytest

from helpers import tensorboard_hparams, tensorboard_scalars
from rsalign_jax.runtime import metric_writer


def jsonl(logdir):
  return [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]


def test_scalars_of_one_step_share_one_line_and_are_on_disk_at_once(tmp_path):
  writer = metric_writer.MetricWriter(str(tmp_path))
  writer.scalars(3, {"loss": 0.5, "lr": 0.125}, prefix="train/")
  writer.scalars(3, {"seconds_per_step": 2.0}, prefix="perf/")
  assert jsonl(tmp_path) == [{"step": 3, "train/loss": 0.5, "train/lr": 0.125, "perf/seconds_per_step": 2.0}]
  writer.scalars(6, {"loss": 0.25}, prefix="train/")
  writer.scalars(6, {"i2t_R1": 12.5, "mR": 20.0}, prefix="val/")
  writer.scalars(6, {"i2t_R1": 10.0, "mR": 18.0}, prefix="test/")
  writer.close()
  lines = jsonl(tmp_path)
  assert lines == [{"step": 3, "train/loss": 0.5, "train/lr": 0.125, "perf/seconds_per_step": 2.0},
                   {"step": 6, "train/loss": 0.25, "val/i2t_R1": 12.5, "val/mR": 20.0, "test/i2t_R1": 10.0,
                    "test/mR": 18.0}]
  # TensorBoard holds exactly the jsonl's names and values (float32: these are exact in it).
  assert tensorboard_scalars(tmp_path) == {(name, line["step"]): value for line in lines
                                           for name, value in line.items() if name != "step"}


def test_a_resumed_run_extends_the_line_of_its_restored_step(tmp_path):
  """A run preempted after its last step's checkpoint resumes at that step and logs only its test metrics: they join
  that step's line instead of starting a second one."""
  writer = metric_writer.MetricWriter(str(tmp_path))
  for step in (1, 2, 3):
    writer.scalars(step, {"loss": step / 10}, prefix="train/")
  writer.close()
  resumed = metric_writer.MetricWriter(str(tmp_path))
  resumed.truncate_after(2)
  resumed.scalars(2, {"mR": 30.0}, prefix="test/")
  resumed.close()
  assert jsonl(tmp_path) == [{"step": 1, "train/loss": 0.1}, {"step": 2, "train/loss": 0.2, "test/mR": 30.0}]


def test_a_name_tensorboard_would_rewrite_is_an_error(tmp_path):
  writer = metric_writer.MetricWriter(str(tmp_path))
  with pytest.raises(ValueError, match=r"\['val/i2t_R@1'\]"):
    writer.scalars(1, {"i2t_R@1": 50.0, "mR": 40.0}, prefix="val/")
  writer.close()
  assert not (tmp_path / "metrics.jsonl").exists() and not tensorboard_scalars(tmp_path)


def test_hparams_are_the_flattened_config_with_the_test_metrics(tmp_path):
  writer = metric_writer.MetricWriter(str(tmp_path))
  writer.scalars(4, {"mR": 18.0, "rsum": 108.0}, prefix="test/")
  config = {"seed": 3, "model_name": "hvsa", "test_on_best": True, "seeds": (), "total_steps": None,
            "optimizer": {"lr": 0.5, "schedule": {"warmup_steps": 2}}}
  writer.hparams(config, ["test/mR", "test/rsum"])
  writer.close()
  hparams, metrics = tensorboard_hparams(tmp_path)
  assert hparams == {"seed": 3.0, "model_name": "hvsa", "test_on_best": True, "seeds": "()", "total_steps": "None",
                     "optimizer.lr": 0.5, "optimizer.schedule.warmup_steps": 2.0}
  assert metrics == ["test/mR", "test/rsum"]
