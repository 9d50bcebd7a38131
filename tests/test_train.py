"""The trainer end to end on the tiny synthetic benchmark, on 8 virtual CPU devices: steps, results, resume."""
import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import SHARED_DATA, load_config, runlocal_config
from rsalign_jax import train

RSICD_AID150 = SHARED_DATA / "rsicd_aid150"


def saved_params(workdir, step):
  return ocp.StandardCheckpointer().restore(pathlib.Path(workdir) / "checkpoints" / str(step) / "state")["params"]


def test_trains_on_8_devices_and_writes_results(tmp_path_factory, monkeypatch):
  assert jax.device_count() == 8
  workdir = tmp_path_factory.mktemp("run")
  monkeypatch.chdir(workdir.parent)  # a relative --workdir, as in the README
  config = runlocal_config(tmp_path_factory, **{"loss.impl": "ring"})  # the sharded loss path, inside the trainer
  results = train.train_and_evaluate(config, workdir.name)
  written = json.loads((workdir / "results.json").read_text())
  assert written["test"] == results["test"]
  for key in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mR", "rsum"):
    assert 0.0 <= written["test"][key] <= (600.0 if key == "rsum" else 100.0)
  assert written["random_init_test"] is not None and written["total_steps"] == 4
  assert (workdir / "vocab.json").exists()
  assert any(p.name.startswith("events.out.tfevents") for p in workdir.iterdir())


def test_stop_and_resume_follows_the_uninterrupted_run(tmp_path_factory):
  straight = tmp_path_factory.mktemp("straight")
  train.train_and_evaluate(runlocal_config(tmp_path_factory, total_steps=4), str(straight))
  interrupted = tmp_path_factory.mktemp("interrupted")
  train.train_and_evaluate(runlocal_config(tmp_path_factory, total_steps=2), str(interrupted))
  train.train_and_evaluate(runlocal_config(tmp_path_factory, total_steps=4), str(interrupted))
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


@pytest.mark.skipif(not RSICD_AID150.is_dir(), reason="real data ../shared/data/rsicd_aid150 is absent")
def test_hvsa_trains_on_real_rsicd(tmp_path_factory):
  config = runlocal_config(tmp_path_factory, arg=f"rsicd,runlocal,manual_dir={RSICD_AID150}", eval_random_init=False)
  results = train.train_and_evaluate(config, str(tmp_path_factory.mktemp("rsicd")))
  assert results["dataset"] == "rsicd" and results["test_images"] == 1027
  assert np.isfinite(results["test"]["mR"])


def test_tokenizer_choice_errors_are_clear(tmp_path):
  config = runlocal_config_for_text(tokenizer="wordpiece")
  with pytest.raises(ValueError, match="needs text.vocab_file"):
    train.load_tokenizer(config, [], str(tmp_path))
  config = runlocal_config_for_text(tokenizer="sentencepiece")
  with pytest.raises(ValueError, match="text.tokenizer='sentencepiece'"):
    train.load_tokenizer(config, [], str(tmp_path))


def test_word_vocabulary_is_built_once_and_reused_from_the_workdir(tmp_path):
  config = runlocal_config_for_text(tokenizer="word", min_count=1)
  built = train.load_tokenizer(config, ["two planes", "one ship"], str(tmp_path))
  reloaded = train.load_tokenizer(config, ["completely different words"], str(tmp_path))
  assert reloaded.word2idx == built.word2idx and "planes" in reloaded.word2idx


def runlocal_config_for_text(**text):
  config = load_config("hvsa", "runlocal")
  config.text.update(text)
  return config
