"""`config.evals`: the default entries, the schedule (which evaluators run when, which one picks the best
checkpoint), the registry of evaluator modules and their one-line errors."""
import re

import pytest
from absl import flags
from ml_collections import config_flags

from helpers import CONFIGS, load_config
from rsalign_jax.evaluation import evaluators, schedule


def test_base_config_defaults_and_ccls2t_hash_entry():
  config = load_config("hvsa")
  assert config.evals.to_dict() == {
      "val": dict(type="retrieval", split="val", every_epochs=1.0, select_best=True, enabled=True),
      "val_gallery": dict(type="gallery", split="val", every_epochs=1.0, queries=4, enabled=True),
      "random_init": dict(type="retrieval", split="test", at="start", enabled=True),
      "test": dict(type="retrieval", split="test", at="end", enabled=True)}
  rsicd = load_config("hvsa", "rsicd").evals
  assert (rsicd.val.split, rsicd.val_gallery.split, rsicd.random_init.split, rsicd.test.split) == (
      "val_papers", "val_papers", "test", "test")
  ccls2t = load_config("ccls2t")
  assert ccls2t.evals.hash.to_dict() == dict(type="hash_retrieval", split="test", gallery_split="train", ks=(10, 50),
                                             at="end", enabled=True)
  assert ccls2t.evals.val.every_epochs == ccls2t.evals.val_gallery.every_epochs == 3.0
  assert load_config("ccls2t", "rsicd").evals.val.every_epochs == 1.0
  assert not load_config("ccls2t", "sydney").evals.hash.enabled  # no scene labels


def names(entries):
  return [entry.name for entry in entries]


EVALS = {
    "val": dict(type="retrieval", split="val", every_epochs=1.0, select_best=True),
    "picture": dict(type="gallery", split="val", every_epochs=0.5, queries=2),
    "random_init": dict(type="retrieval", split="test", at="start"),
    "test": dict(type="retrieval", split="test", at="end"),
    "off": dict(type="retrieval", split="train", at="end", enabled=False),
}


def test_periodic_entries_run_on_their_period_and_at_the_last_step():
  plan = schedule.Schedule(EVALS, steps_per_epoch=10, total_steps=35)
  assert names(plan.entries) == ["val", "picture", "random_init", "test"]  # disabled entries are dropped
  assert {step: names(plan.due(step)) for step in range(1, 36) if plan.due(step)} == {
      5: ["picture"], 10: ["val", "picture"], 15: ["picture"], 20: ["val", "picture"], 25: ["picture"],
      30: ["val", "picture"], 35: ["val", "picture"]}
  assert (names(plan.start), names(plan.end), plan.selecting) == (["random_init"], ["test"], "val")
  assert plan.entries[1].options == {"split": "val", "queries": 2}  # the evaluator's keywords only
  short = schedule.Schedule({"val": dict(type="retrieval", split="val", every_epochs=0.01)}, 10, 3)
  assert [names(short.due(step)) for step in (1, 2, 3)] == [["val"]] * 3  # at least every step


def test_the_selecting_entry_gives_the_best_checkpoints_score():
  plan = schedule.Schedule(EVALS, steps_per_epoch=10, total_steps=35)
  val = {"rsum": 42.0, "mR": 7.0}
  assert plan.selection(plan.due(10), {"val": val}) == (42.0, val)
  assert plan.selection(plan.due(5), {}) is None  # val did not run
  unselected = schedule.Schedule({**EVALS, "val": dict(EVALS["val"], select_best=False)}, 10, 35)
  assert unselected.selecting is None and unselected.selection(unselected.due(10), {"val": val}) is None
  bad = schedule.Schedule({"picture": dict(type="gallery", split="val", every_epochs=1.0, select_best=True)}, 10, 35)
  with pytest.raises(ValueError, match=r"^evals.picture.select_best=True: its evaluator reports no 'rsum'"):
    bad.selection(bad.due(10), {})


@pytest.mark.parametrize("evals, message", [
    ({"val": dict(type="retrieval", split="val")},
     "evals.val: expected exactly one schedule, every_epochs=<epochs> or at='start'|'end'; got keys ['split', 'type']"),
    ({"val": dict(type="retrieval", split="val", every_epochs=1.0, at="end")}, "evals.val: expected exactly one"),
    ({"val": dict(type="retrieval", split="val", at="middle")},
     "evals.val.at='middle': expected one of ('start', 'end')"),
    ({"val": dict(type="retrieval", split="val", every_epochs=0.0)}, "evals.val.every_epochs=0.0: expected > 0"),
    ({"test": dict(type="retrieval", split="test", at="end", select_best=True)},
     "evals.test.select_best=True: only a periodic entry"),
    ({"a": dict(EVALS["val"]), "b": dict(EVALS["val"])},
     "evals: select_best=True on ['a', 'b']; expected it on at most one periodic entry"),
    ({"val": dict(split="val", every_epochs=1.0)}, "evals.val.type: missing; expected an evaluator module"),
    ({"val": 1.0}, "evals.val=1.0: expected dict(type=..., split=..., every_epochs=... or at=...)"),
    ({"model": dict(type="retrieval", split="test", at="end")}, "evals.model: results.json keeps 'model' for itself"),
])
def test_bad_entries_are_one_line_errors_naming_the_field(evals, message):
  with pytest.raises(ValueError, match=f"^{re.escape(message)}") as raised:
    schedule.Schedule(evals, steps_per_epoch=10, total_steps=35, reserved=("model", "config"))
  assert "\n" not in str(raised.value)


def test_two_selecting_entries_are_fine_once_one_is_disabled():
  evals = {"a": dict(EVALS["val"]), "b": dict(EVALS["val"], enabled=False)}
  assert schedule.Schedule(evals, 10, 35).selecting == "a"


def test_unknown_types_and_options_name_the_module_and_the_field():
  with pytest.raises(ValueError, match=r"^evals.fit.type='retrival': no module "
                     r"rsalign_jax/evaluation/evaluators/retrival.py; known types: \['gallery', 'hash_retrieval', "
                     r"'querybank', 'retrieval'\]$"):
    evaluators.evaluator_class("fit", "retrival")
  [entry] = schedule.parse({"pictures": dict(type="gallery", split="val", every_epochs=1.0, querys=3)}, 10)
  with pytest.raises(TypeError, match=r"^evals.pictures: got an unexpected keyword argument 'querys'; the 'gallery' "
                     r"evaluator takes \['split', 'queries', 'k'\]$"):
    evaluators.build(None, [entry])  # checked before the evaluator (and its split) is built
  [entry] = schedule.parse({"hash": dict(type="hash_retrieval", at="end", split="test")}, 10)
  with pytest.raises(TypeError, match="^evals.hash: missing a required argument: 'gallery_split'"):
    evaluators.build(None, [entry])


def test_an_entry_is_turned_off_and_edited_on_the_command_line_of_a_locked_config():
  argv = ["prog", f"--config={CONFIGS / 'hvsa.py'}:runlocal", "--config.evals.random_init.enabled=False",
          "--config.evals.val.every_epochs=0.5", "--config.evals.test.split=val"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  plan = schedule.Schedule(flag_values.config.evals, steps_per_epoch=10, total_steps=20)
  assert names(plan.start) == [] and names(plan.due(5)) == ["val"] and plan.end[0].options == {"split": "val"}


def test_the_papers_table_keeps_the_retrieval_rows():
  row = {"i2t_R1": 1.0, "i2t_R5": 2.0, "i2t_R10": 3.0, "t2i_R1": 4.0, "t2i_R5": 5.0, "t2i_R10": 6.0, "mR": 3.5,
         "rsum": 21.0}
  table = evaluators.papers_table({"test: hvsa (last)": row, "hash: hvsa (last)": {"mAP10": 50.0}}, "tiny")
  assert table.splitlines()[-1] == "| test: hvsa (last) | 1.00 | 2.00 | 3.00 | 4.00 | 5.00 | 6.00 | 3.50 | 21.00 |"
  assert "hash" not in table and table.startswith("**tiny**")
  assert evaluators.papers_table({"hash: hvsa (last)": {"mAP10": 50.0}}, "tiny") is None
