"""The trainer end to end on the tiny synthetic benchmark, on 8 virtual CPU devices: steps, results, resume."""
import collections
import json
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import (SHARED_DATA, disabled, load_config, runlocal_config, tensorboard_hparams, tensorboard_scalars,
                     write_wordpiece_vocab)
from rsalign_jax import experiment, optimizers, train
from rsalign_jax.data import sources, tokenizers
from rsalign_jax.evaluation import evaluators as evaluators_lib
from rsalign_jax.modes import evaluate

RSICD_AID150 = SHARED_DATA / "rsicd_aid150"


def saved_params(workdir, step):
  return ocp.StandardCheckpointer().restore(pathlib.Path(workdir) / "checkpoints" / str(step) / "state")["params"]


def test_trains_on_8_devices_and_writes_results(tmp_path_factory, monkeypatch):
  assert jax.device_count() == 8
  workdir = tmp_path_factory.mktemp("run")
  monkeypatch.chdir(workdir.parent)  # a relative --workdir, as in the README
  config = runlocal_config(tmp_path_factory, **{"loss.impl": "ring"})  # the sharded loss path, inside the trainer
  opened, encoded = collections.Counter(), collections.Counter()
  open_split, encode_batch = sources.open_split, tokenizers.WordVocab.encode_batch
  monkeypatch.setattr(sources, "open_split", lambda dataset, split: opened.update([split]) or open_split(dataset, split))
  monkeypatch.setattr(tokenizers.WordVocab, "encode_batch",
                      lambda self, captions, max_len: encoded.update([tuple(captions)]) or encode_batch(self, captions,
                                                                                                     max_len))
  results = train.train_and_evaluate(config, workdir.name)
  # Each split is read and tokenised once per run: by the trainer (train), the evaluators and the gallery (val, test).
  assert opened == {config.dataset.train_split: 1, config.dataset.val_split: 1, config.dataset.test_split: 1}
  split_sized = {captions: count for captions, count in encoded.items() if len(captions) > 5}  # not init's 5 rows
  assert len(split_sized) == 3 and set(split_sized.values()) == {1}
  written = json.loads((workdir / "results.json").read_text())
  assert written["test"] == results["test"]
  for key in ("i2t_R1", "i2t_R5", "i2t_R10", "t2i_R1", "t2i_R5", "t2i_R10", "mR", "rsum"):
    assert 0.0 <= written["test"][key] <= (600.0 if key == "rsum" else 100.0)
  assert written["random_init"].keys() == written["test"].keys() and written["total_steps"] == 4
  # What produced the run: its resolved config, seed, source commit and package versions.
  assert written["config"] == json.loads(json.dumps(config.to_dict())) and written["seed"] == config.seed
  in_checkout = (pathlib.Path(__file__).resolve().parents[1] / ".git").exists()
  assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", written["git_commit"]) if in_checkout else written["git_commit"] is None
  assert written["versions"]["jax"] == jax.__version__ and written["versions"]["python"].startswith("3.")
  assert (workdir / "vocab.json").exists()
  # One metrics.jsonl line per logged step, under the names TensorBoard shows; the config as TensorBoard hparams.
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [line["step"] for line in lines] == sorted({line["step"] for line in lines})
  assert {"train/loss", "perf/seconds_per_step", "val/i2t_R1", "test/i2t_R1"} <= lines[-1].keys()
  assert {tag for tag, _ in tensorboard_scalars(workdir)} == {name for line in lines for name in line} - {"step"}
  hparams, hparam_metrics = tensorboard_hparams(workdir)
  assert hparams["seed"] == config.seed and hparams["optimizer.lr"] == config.optimizer.lr
  assert hparam_metrics == [f"test/{name}" for name in written["test"]]


def test_stop_and_resume_follows_the_uninterrupted_run(tmp_path_factory, monkeypatch):
  straight = tmp_path_factory.mktemp("straight")
  straight_results = train.train_and_evaluate(runlocal_config(tmp_path_factory, total_steps=4), str(straight))
  interrupted = tmp_path_factory.mktemp("interrupted")
  train.train_and_evaluate(runlocal_config(tmp_path_factory, total_steps=2), str(interrupted))
  ran, run = [], evaluators_lib.run
  monkeypatch.setattr(evaluators_lib, "run", lambda evaluators, entries, *args: ran.extend(
      entry.name for entry in entries) or run(evaluators, entries, *args))
  resumed = train.train_and_evaluate(runlocal_config(tmp_path_factory, total_steps=4), str(interrupted))
  assert ran == ["val", "val_gallery", "test"]  # the random-init evaluation is not rerun on resume, but kept
  assert resumed["random_init"] == straight_results["random_init"] and resumed["best_step"] == 4
  for a, b in zip(jax.tree.leaves(saved_params(straight, 4)), jax.tree.leaves(saved_params(interrupted, 4))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  first_two = jax.tree.leaves(saved_params(interrupted, 2))
  assert any(not np.allclose(a, b) for a, b in zip(first_two, jax.tree.leaves(saved_params(straight, 4))))


def test_non_finite_loss_stops_the_run_with_a_clear_message(tmp_path_factory):
  config = runlocal_config(tmp_path_factory, **{"optimizer.lr": float("nan"), "checkpoint_every_steps": 1})
  workdir = tmp_path_factory.mktemp("nan")
  with pytest.raises(FloatingPointError, match="non-finite"):
    train.train_and_evaluate(config, str(workdir))
  assert not list((workdir / "checkpoints").iterdir())  # the NaN state of step 1 was never saved


def test_an_extra_end_entry_is_reported_and_without_select_best_the_last_state_is_tested(tmp_path_factory):
  overrides = {**disabled("random_init", "val_gallery"), "evals.val.select_best": False}
  config = runlocal_config(tmp_path_factory, **overrides)
  config.evals.train_fit = dict(type="retrieval", split=config.dataset.train_split, at="end")
  workdir = tmp_path_factory.mktemp("train_fit")
  results = train.train_and_evaluate(config, str(workdir))
  written = json.loads((workdir / "results.json").read_text())
  assert set(written) == {"test", "train_fit", *train.RESULTS_KEYS} and written["train_fit"] == results["train_fit"]
  assert written["tested_checkpoint"] == "last" and written["best_step"] is None and written["best_val"] is None
  assert not list((workdir / "best").glob("[0-9]*"))  # no entry selects: no best checkpoint
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  memory = {d["step"]: d["perf/step_memory_mib"] for d in lines if "perf/step_memory_mib" in d}
  assert list(memory) == [1] and memory[1] > 0  # the compiled step's per-device buffers, reported once
  last = lines[-1]
  assert last["step"] == 4 and "val/mR" in last  # validation still runs, periodically
  assert {k: last[f"train_fit/{k}"] for k in written["train_fit"]} == written["train_fit"]
  assert {k: last[f"test/{k}"] for k in written["test"]} == written["test"]
  _, hparam_metrics = tensorboard_hparams(workdir)
  assert hparam_metrics == [f"{name}/{k}" for name in ("test", "train_fit") for k in written[name]]
  assert evaluate.evaluate(config, str(workdir), split=config.dataset.train_split)["metrics"] == written["train_fit"]


def counted_device_gets(monkeypatch):
  """The steps at which the train loop (`train._train_and_evaluate` itself) calls `jax.device_get`."""
  fetched_at, device_get = [], jax.device_get

  def counting(tree):
    frame = sys._getframe(1)  # pylint: disable=protected-access
    if frame.f_code is train._train_and_evaluate.__code__:  # pylint: disable=protected-access
      fetched_at.append(frame.f_locals["step"])
    return device_get(tree)

  monkeypatch.setattr(jax, "device_get", counting)
  return fetched_at


def quiet_config(tmp_path_factory, **overrides):
  """runlocal without validation, its gallery and random-init evaluation: only the train loop's own host transfers
  remain."""
  return runlocal_config(tmp_path_factory, **{**disabled("val", "val_gallery", "random_init"), **overrides})


def test_train_loop_fetches_metrics_only_at_log_and_checkpoint_steps(tmp_path_factory, monkeypatch):
  """6 steps, logged every 3 and checkpointed every 4: the loop fetches at steps 3 and 6 (logs) and 4 (the NaN/Inf
  check before the save), once each, and never at steps 1, 2, 5; a per-step fetch would show all 6 steps."""
  fetched_at = counted_device_gets(monkeypatch)
  workdir = tmp_path_factory.mktemp("fetches")
  train.train_and_evaluate(
      quiet_config(tmp_path_factory, total_steps=6, log_every_steps=3, checkpoint_every_steps=4), str(workdir))
  assert fetched_at == [3, 4, 6]
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [line["step"] for line in lines if "train/loss" in line] == [3, 6]
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [4, 6]


def test_non_finite_step_between_checks_is_caught_before_the_next_checkpoint(tmp_path_factory, monkeypatch):
  """A learning rate that turns NaN at the second update spoils the parameters of step 2, which is neither logged nor
  checkpointed: the check before step 3's checkpoint stops the run and names step 2, the first non-finite one."""
  make_schedule = optimizers.make_schedule

  def nan_from_step_2(config, steps_per_epoch):
    lr = make_schedule(config, steps_per_epoch)
    return lambda count: jnp.where(count >= 1, jnp.nan, lr(count))  # count 1: the update of step 2

  monkeypatch.setattr(optimizers, "make_schedule", nan_from_step_2)
  fetched_at = counted_device_gets(monkeypatch)
  workdir = tmp_path_factory.mktemp("nan_between_checks")
  config = quiet_config(tmp_path_factory, total_steps=6, log_every_steps=4, checkpoint_every_steps=3)
  with pytest.raises(FloatingPointError, match=r"step 2: non-finite l2_params=nan; stopping before any checkpoint"):
    train.train_and_evaluate(config, str(workdir))
  assert fetched_at == [3]
  assert not list((workdir / "checkpoints").iterdir())


@pytest.mark.skipif(not RSICD_AID150.is_dir(), reason="real data ../shared/data/rsicd_aid150 is absent")
def test_hvsa_trains_on_real_rsicd(tmp_path_factory):
  config = runlocal_config(tmp_path_factory, arg=f"rsicd,runlocal,manual_dir={RSICD_AID150}", **disabled("random_init"))
  results = train.train_and_evaluate(config, str(tmp_path_factory.mktemp("rsicd")))
  assert results["dataset"] == "rsicd" and results["test_images"] == 1027
  assert np.isfinite(results["test"]["mR"])


def test_tokenizer_choice_errors_are_clear(tmp_path):
  config = runlocal_config_for_text(tokenizer="wordpiece")
  with pytest.raises(ValueError, match="needs text.vocab_file"):
    experiment.load_tokenizer(config, [], str(tmp_path))
  config = runlocal_config_for_text(tokenizer="sentencepiece")
  with pytest.raises(ValueError, match="text.tokenizer='sentencepiece'"):
    experiment.load_tokenizer(config, [], str(tmp_path))


def test_word_vocabulary_is_built_once_and_reused_from_the_workdir(tmp_path):
  config = runlocal_config_for_text(tokenizer="word", min_count=1)
  built = experiment.load_tokenizer(config, ["two planes", "one ship"], str(tmp_path))
  reloaded = experiment.load_tokenizer(config, ["completely different words"], str(tmp_path))
  assert reloaded.word2idx == built.word2idx and "planes" in reloaded.word2idx


def runlocal_config_for_text(**text):
  config = load_config("hvsa", "runlocal")
  config.text.update(text)
  return config


def test_the_workdir_keeps_the_tokenizer_and_refuses_another_vocab_file(tmp_path):
  vocab_file = write_wordpiece_vocab(tmp_path / "vocab.txt")
  workdir = tmp_path / "workdir"
  workdir.mkdir()
  config = runlocal_config_for_text(tokenizer="wordpiece", vocab_file=str(vocab_file))
  experiment.load_tokenizer(config, None, str(workdir))
  vocab_file.unlink()  # the workdir's copy serves from now on
  kept = experiment.load_tokenizer(config, None, str(workdir))
  assert (workdir / "vocab.txt").read_text().split() == kept.vocabulary()
  other = write_wordpiece_vocab(tmp_path / "other.txt")
  other.write_text(other.read_text() + "extra\n")
  config = runlocal_config_for_text(tokenizer="wordpiece", vocab_file=str(other))
  with pytest.raises(ValueError, match="differs from the vocabulary this workdir trained with"):
    experiment.load_tokenizer(config, None, str(workdir))
  with pytest.raises(FileNotFoundError, match="no vocabulary saved in the workdir"):
    experiment.load_tokenizer(runlocal_config_for_text(tokenizer="word"), None, str(tmp_path / "empty"))
