"""Evaluators found by module path, as models and losses are: `config.evals.<name>.type='<type>'` is
`rsalign_jax/evaluation/evaluators/<type>.py`, whose `Evaluator(setup, name, **options)` (`setup`: the run's
`experiment.Setup`; options: the entry's keywords, `evaluation.schedule`) provides

  run(variables, step, writer) -> {metric: float}, or None for an evaluator that writes what it makes (a picture)

`run` here writes the metrics under `<name>/`; the trainer also keeps those of start and end entries in results.json.
"""
import inspect

from rsalign_jax import registry
from rsalign_jax.evaluation import metrics as metrics_lib

TABLE_COLUMNS = ("i2t_R1", "t2i_R1", "mR", "rsum")


def evaluator_class(name, type_name):
  """`rsalign_jax.evaluation.evaluators.<type_name>.Evaluator`, for the entry `name`."""
  return registry.find_class(__name__, type_name, "Evaluator", field=f"evals.{name}.type",
                             is_valid=lambda cls: callable(getattr(cls, "run", None)),
                             expected="class with a run(variables, step, writer) method", listed_as="types")


def build(setup, entries):
  """{name: Evaluator} of `entries` (`schedule.Entry`), built now: a bad entry fails before any step runs."""
  evaluators = {}
  for entry in entries:
    cls = evaluator_class(entry.name, entry.type)
    signature = inspect.signature(cls)
    try:
      signature.bind(setup, entry.name, **entry.options)
    except TypeError as e:
      raise TypeError(f"evals.{entry.name}: {e}; the {entry.type!r} evaluator takes "
                      f"{list(signature.parameters)[2:]}") from None
    evaluators[entry.name] = cls(setup, entry.name, **entry.options)
  return evaluators


def run(evaluators, entries, variables, step, writer):
  """{name: metrics} of `entries` run on the model's `variables` (those reporting none left out), each evaluator's
  metrics written under `<name>/` at `step`."""
  evaluated = {}
  for entry in entries:
    metrics = evaluators[entry.name].run(variables, step, writer)
    if metrics is not None:
      writer.scalars(step, metrics, prefix=f"{entry.name}/")
      evaluated[entry.name] = metrics
  return evaluated


def papers_table(rows, title):
  """The papers' retrieval table of the `rows` ({label: metrics}) holding its columns (other evaluators report other
  metrics); None when none does."""
  retrieval = {label: metrics for label, metrics in rows.items() if set(TABLE_COLUMNS) <= metrics.keys()}
  return metrics_lib.format_table(retrieval, title=title) if retrieval else None
