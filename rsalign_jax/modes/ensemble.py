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

from rsalign_jax.evaluation import metrics as metrics_lib
from rsalign_jax.evaluation.evaluators import querybank as querybank_evaluator
from rsalign_jax.modes import evaluate
from rsalign_jax.modes import trained as trained_lib


def querybank_entry(config, split):
  """The config's first enabled `querybank` evaluator entry on `split`, or None."""
  for entry in config.get("evals", {}).values():
    if entry.get("type") == "querybank" and entry.get("split") == split and entry.get("enabled", True):
      return entry
  return None


def member_scores(loaded, split, entry):
  """One member's scores: (images x distinct captions,) and, with a querybank `entry`, the scores against its banks."""
  setup = loaded.setup
  evaluator = setup.make_evaluator(split)
  with jax.set_mesh(setup.mesh):
    if entry is None:
      r = setup.retrieval
      images, texts = evaluator.embeddings(loaded.variables, r.embed_images, r.embed_texts)
      return evaluator, (evaluator.scores(loaded.variables, r.score, images, texts),)
    bank = setup.make_evaluator(entry.get("bank_split") or setup.config.dataset.train_split)
    return evaluator, querybank_evaluator.bank_scores(evaluator, bank, setup.retrieval, loaded.variables)


def evaluate_ensemble(members, workdir, *, checkpoint="", split=""):
  """The ensemble of `members` ((config, workdir) pairs of trained runs of one dataset) on `split` (default: the
  test split); writes WORKDIR/ensemble_<split>.json and .md and returns {split, members, metrics, table}."""
  config = members[0][0]
  split = split or config.dataset.test_split
  entry = querybank_entry(config, split)
  total, reference = None, None
  for member_config, member_workdir in members:
    evaluator, scores = member_scores(trained_lib.load(member_config, member_workdir, checkpoint), split, entry)
    if reference is None:
      reference = evaluator
    elif (member_config.dataset.name, scores[0].shape) != (config.dataset.name, total[0].shape) or not np.array_equal(
        evaluator.index.record, reference.index.record):
      raise ValueError(f"{member_workdir}: its {split} split ({member_config.dataset.name}, scores "
                       f"{scores[0].shape}) differs from {members[0][1]}'s ({config.dataset.name}, "
                       f"{total[0].shape}); an ensemble's members must be evaluated on the same split")
    total = scores if total is None else tuple(t + s for t, s in zip(total, scores))
  mean = tuple(t / len(members) for t in total)
  name = f"ensemble of {len(members)}"
  metrics = {name: metrics_lib.retrieval_metrics(reference.caption_columns(mean[0]), reference.index.record)}
  if entry is not None:
    beta, dynamic = entry.get("beta", 10.0), entry.get("dynamic", True)
    metrics[f"{name}, querybank β={beta:g}"] = querybank_evaluator.normalised_metrics(reference, *mean, beta=beta,
                                                                                      dynamic=dynamic)
  table = metrics_lib.format_table(metrics, title=f"{config.dataset.name} {split}")
  result = {"split": split, "dataset": config.dataset.name, "members": [str(w) for _, w in members],
            "metrics": metrics, "table": table}
  evaluate.write_report(workdir, f"ensemble_{split}", result, table)
  return result
