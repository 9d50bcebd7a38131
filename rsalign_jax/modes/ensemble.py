"""An ensemble of trained models: the papers' retrieval table of the mean of their scores on one split.

`--mode=eval --config.seeds=0,1,2 --ensemble` evaluates each seed (`modes.seeds`) and then the seeds' models as one
ensemble, written to WORKDIR/ensemble_<split>.json and .md. Each member's tested checkpoint scores every image of the
split against every caption; the ensemble ranks by the mean of those scores (for cosine-scoring models, the cosine of
the members' normalised embeddings concatenated). When the config evaluates the split with querybank normalisation (a
`querybank` entry, `evaluation/evaluators/querybank.py`), the ensemble's mean scores against that entry's banks are
normalised the same way and reported on a second row.
"""
import jax
import numpy as np

from rsalign_jax.evaluation import evaluators as evaluators_lib
from rsalign_jax.evaluation import metrics as metrics_lib
from rsalign_jax.evaluation import schedule as schedule_lib
from rsalign_jax.modes import evaluate
from rsalign_jax.modes import trained as trained_lib


def querybank_entry(config, split):
  """The config's first enabled `querybank` evaluator entry on `split` (`schedule.Entry`), or None."""
  entries = schedule_lib.parse(config.get("evals", {}), steps_per_epoch=1)
  return next((e for e in entries if e.type == "querybank" and e.options.get("split") == split), None)


def member_scores(loaded, split, entry):
  """(the split's evaluator, the querybank evaluator of `entry` or None, the member's scores: images x distinct
  captions, and with `entry` its scores against the banks)."""
  setup = loaded.setup
  evaluator = setup.make_evaluator(split)
  with jax.set_mesh(setup.mesh):
    if entry is None:
      r = setup.retrieval
      images, texts = evaluator.embeddings(loaded.variables, r.embed_images, r.embed_texts)
      return evaluator, None, (evaluator.scores(loaded.variables, r.score, images, texts),)
    normaliser = evaluators_lib.build(setup, [entry])[entry.name]
    return evaluator, normaliser, normaliser.bank_scores(loaded.variables)


def evaluate_ensemble(members, workdir, *, checkpoint="", split=""):
  """The ensemble of `members` ((config, workdir) pairs of trained runs of one dataset) on `split` (default: the
  test split); writes WORKDIR/ensemble_<split>.json and .md and returns {split, members, metrics, table}."""
  config = members[0][0]
  split = split or config.dataset.test_split
  entry = querybank_entry(config, split)
  total, reference = None, None
  for member_config, member_workdir in members:
    evaluator, normaliser, scores = member_scores(trained_lib.load(member_config, member_workdir, checkpoint), split,
                                                  entry)
    if reference is None:
      reference = evaluator, normaliser
    elif (member_config.dataset.name, scores[0].shape) != (config.dataset.name, total[0].shape) or not np.array_equal(
        evaluator.index.record, reference[0].index.record):
      raise ValueError(f"{member_workdir}: its {split} split ({member_config.dataset.name}, scores "
                       f"{scores[0].shape}) differs from {members[0][1]}'s ({config.dataset.name}, "
                       f"{total[0].shape}); an ensemble's members must be evaluated on the same split")
    total = scores if total is None else tuple(t + s for t, s in zip(total, scores))
  mean = tuple(t / len(members) for t in total)
  (evaluator, normaliser), name = reference, f"ensemble of {len(members)}"
  metrics = {name: metrics_lib.retrieval_metrics(evaluator.caption_columns(mean[0]), evaluator.index.record)}
  if normaliser is not None:
    metrics[f"{name}, querybank β={normaliser.beta:g}"] = normaliser.normalised_metrics(*mean)
  table = metrics_lib.format_table(metrics, title=f"{config.dataset.name} {split}")
  result = {"split": split, "dataset": config.dataset.name, "members": [str(w) for _, w in members],
            "metrics": metrics, "table": table}
  evaluate.write_report(workdir, f"ensemble_{split}", result, table)
  return result
