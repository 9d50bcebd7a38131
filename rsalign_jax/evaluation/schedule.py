"""When the trainer runs each evaluator of `config.evals` (big_vision style), and which one picks the best checkpoint.

An entry is `name = dict(type=..., split=..., <schedule>, enabled=True, select_best=False, **options)` with exactly
one schedule: `every_epochs=E` (every E epochs and at the last step), `at='start'` (the initial state of a fresh
run, not a resumed one) or `at='end'` (the tested state). `type` names the evaluator module
(`rsalign_jax/evaluation/evaluators/<type>.py`); the options are its keywords. At most one periodic entry has
`select_best=True`: its `rsum` picks the best checkpoint. Pure: no evaluator is built here.
"""
import dataclasses

AT = ("start", "end")
SCHEDULE_KEYS = ("type", "every_epochs", "at", "enabled", "select_best")
SELECTION_METRIC = "rsum"


@dataclasses.dataclass(frozen=True)
class Entry:
  """One enabled entry of `config.evals`: its evaluator and when it runs."""
  name: str
  type: str
  options: dict  # the evaluator's keywords: the entry without SCHEDULE_KEYS
  every_steps: int = 0  # periodic: every this many steps (and the last); 0: at `at` only
  at: str = ""
  select_best: bool = False


def parse(evals, steps_per_epoch, reserved=()):
  """The enabled entries of `evals` (a mapping name -> entry), checked; one-line errors name the field.

  reserved: names an entry may not take (results.json's own keys: start and end metrics go there under their name).
  """
  entries = []
  for name, entry in evals.items():
    if not hasattr(entry, "keys"):
      raise ValueError(f"evals.{name}={entry!r}: expected dict(type=..., split=..., every_epochs=... or at=...)")
    if name in reserved:
      raise ValueError(f"evals.{name}: results.json keeps {name!r} for itself (its keys {tuple(reserved)}); rename "
                       "the entry")
    if entry.get("enabled", True):
      entries.append(_entry(name, dict(entry), steps_per_epoch))
  selecting = [entry.name for entry in entries if entry.select_best]
  if len(selecting) > 1:
    raise ValueError(f"evals: select_best=True on {selecting}; expected it on at most one periodic entry")
  return entries


def _entry(name, entry, steps_per_epoch):
  if not entry.get("type"):
    raise ValueError(f"evals.{name}.type: missing; expected an evaluator module of rsalign_jax/evaluation/evaluators/ "
                     "(e.g. 'retrieval')")
  has_every, at = "every_epochs" in entry, entry.get("at", "")
  if has_every == bool(at):
    raise ValueError(f"evals.{name}: expected exactly one schedule, every_epochs=<epochs> or at='start'|'end'; got "
                     f"keys {sorted(entry)}")
  if at and at not in AT:
    raise ValueError(f"evals.{name}.at={at!r}: expected one of {AT}")
  if has_every and not entry["every_epochs"] > 0:
    raise ValueError(f"evals.{name}.every_epochs={entry['every_epochs']}: expected > 0")
  select_best = bool(entry.get("select_best", False))
  if select_best and not has_every:
    raise ValueError(f"evals.{name}.select_best=True: only a periodic entry (every_epochs) picks the best checkpoint")
  every_steps = max(1, int(entry["every_epochs"] * steps_per_epoch)) if has_every else 0
  options = {key: value for key, value in entry.items() if key not in SCHEDULE_KEYS}
  return Entry(name, entry["type"], options, every_steps, at, select_best)


class Schedule:
  """Which entries run after a step, at the start and at the end, and the best checkpoint's score."""

  def __init__(self, evals, steps_per_epoch, total_steps, reserved=()):
    self.entries = parse(evals, steps_per_epoch, reserved)
    self.total_steps = total_steps
    self.start = [entry for entry in self.entries if entry.at == "start"]
    self.end = [entry for entry in self.entries if entry.at == "end"]
    self.selecting = next((entry.name for entry in self.entries if entry.select_best), None)

  def due(self, step):
    """The periodic entries that run after `step`: those whose period divides it, and all of them at the last step."""
    return [entry for entry in self.entries
            if entry.every_steps and (step % entry.every_steps == 0 or step == self.total_steps)]

  def selection(self, due, evaluated):
    """(score, metrics) of the selecting entry if it is among the `due` entries, else None; `evaluated` is their
    {name: metrics} (an evaluator that reports none is absent)."""
    if self.selecting not in {entry.name for entry in due}:
      return None
    metrics = evaluated.get(self.selecting, {})
    if SELECTION_METRIC not in metrics:
      raise ValueError(f"evals.{self.selecting}.select_best=True: its evaluator reports no {SELECTION_METRIC!r} to "
                       "pick the best checkpoint by; set select_best on a retrieval entry")
    return metrics[SELECTION_METRIC], metrics
