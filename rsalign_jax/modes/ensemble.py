"""An ensemble of trained models: the papers' retrieval table of the mean of their scores on one split.

`--mode=eval --config.seeds=0,1,2 --ensemble` evaluates each seed (`modes.seeds`) and then the seeds' models as one
ensemble; `--mode=eval --ensemble --members=W1,W2` ensembles trained workdirs of any configs of one dataset (each
restored with its saved config, e.g. runs at two input sizes), and when the members are seeds workdirs (their runs in
seed_<n>) one ensemble per seed, reported with mean ± std. Reports go to WORKDIR/ensemble_<split>.json and .md.

Each member's tested checkpoint scores every image of the split against every caption; the ensemble ranks by the mean
of those scores (for cosine-scoring models, the cosine of the members' normalised embeddings concatenated). When a
member's config evaluates the split with querybank normalisation (a `querybank` entry,
`evaluation/evaluators/querybank.py`), the ensemble's mean scores against that entry's banks are normalised the same
way and reported on a second row.
"""
import os
import re

import jax
import numpy as np

from rsalign_jax import configlib
from rsalign_jax.evaluation import evaluators as evaluators_lib
from rsalign_jax.evaluation import metrics as metrics_lib
from rsalign_jax.evaluation import schedule as schedule_lib
from rsalign_jax.modes import evaluate
from rsalign_jax.modes import seeds as seeds_lib
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
  result = _ensemble_metrics(members, checkpoint=checkpoint, split=split)
  config = members[0][0]
  result["table"] = metrics_lib.format_table(result["metrics"], title=f"{config.dataset.name} {result['split']}")
  evaluate.write_report(workdir, f"ensemble_{result['split']}", result, result["table"])
  return result


def _ensemble_metrics(members, *, checkpoint, split):
  config = members[0][0]
  split = split or config.dataset.test_split
  entry = next(filter(None, (querybank_entry(c, split) for c, _ in members)), None)
  total, reference = None, None
  for member_config, member_workdir in members:
    evaluator, normaliser, scores = member_scores(trained_lib.load(member_config, member_workdir, checkpoint), split,
                                                  entry)
    if reference is None:  # kept for its caption columns: its images are freed before the next member loads
      reference = evaluator, normaliser
      for kept in filter(None, reference):
        kept.release_inputs()
    elif member_config.dataset.name != config.dataset.name or not np.array_equal(evaluator.index.record,
                                                                                  reference[0].index.record):
      raise ValueError(f"{member_workdir}: its {split} split ({member_config.dataset.name}, {evaluator.num_images} "
                       f"images) differs from {members[0][1]}'s ({config.dataset.name}, "
                       f"{reference[0].num_images} images); an ensemble's members must be evaluated on the same split")
    elif normaliser is None:  # the members may key the split's distinct captions differently (e.g. cached trunks)
      scores = (scores[0][:, reference[0].distinct_columns_of(evaluator)],)
    else:
      scores = reference[1].aligned(normaliser, scores)
    total = scores if total is None else tuple(t + s for t, s in zip(total, scores))
  mean = tuple(t / len(members) for t in total)
  (evaluator, normaliser), name = reference, f"ensemble of {len(members)}"
  metrics = {name: metrics_lib.retrieval_metrics(evaluator.caption_columns(mean[0]), evaluator.index.record)}
  if normaliser is not None:
    metrics[f"{name}, querybank β={normaliser.beta:g}"] = normaliser.normalised_metrics(*mean)
  return {"split": split, "dataset": config.dataset.name, "members": [str(w) for _, w in members], "metrics": metrics}


def member_runs(workdirs, configure=lambda config: config):
  """{seed: [(config, workdir) of each member's run of that seed]} for seeds workdirs (runs in seed_<n>), or
  {None: [(config, workdir), ...]} for trained workdirs; each run's config is the one it saved, through
  `configure` (e.g. evaluation options)."""
  kinds = {}
  for workdir in workdirs:
    if os.path.exists(os.path.join(workdir, configlib.RESOLVED_CONFIG)):
      kinds[workdir] = (None,)
    elif os.path.isdir(workdir):
      kinds[workdir] = tuple(sorted(int(m.group(1)) for m in map(re.compile(r"seed_(\d+)$").match, os.listdir(workdir))
                                    if m and os.path.exists(os.path.join(workdir, m.group(0),
                                                                         configlib.RESOLVED_CONFIG))))
    if not kinds.get(workdir):
      raise FileNotFoundError(f"--members: {workdir} holds neither a trained run ({configlib.RESOLVED_CONFIG}) nor "
                              "seed_<n> runs of one")
  first = workdirs[0]
  for workdir, seeds in kinds.items():
    if seeds != kinds[first]:
      raise ValueError(f"--members: {workdir} holds {_runs_text(seeds)}, {first} {_runs_text(kinds[first])}; the "
                       "members must be trained runs, or seeds workdirs of the same seeds")
  return {seed: [(configure(configlib.load_resolved(path)), path) for path in (
      workdir if seed is None else seeds_lib.seed_workdir(workdir, seed) for workdir in workdirs)]
          for seed in kinds[first]}


def _runs_text(seeds):
  return "a trained run" if seeds == (None,) else f"the runs of seeds {', '.join(map(str, seeds))}"


def evaluate_members(workdirs, workdir, *, checkpoint="", split="", configure=lambda config: config):
  """The ensemble of trained workdirs (`member_runs`), or of seeds workdirs one seed at a time with mean ± std over
  the seeds; writes WORKDIR/ensemble_<split>.json and .md."""
  runs = member_runs(workdirs, configure)
  if None in runs:
    return evaluate_ensemble(runs[None], workdir, checkpoint=checkpoint, split=split)
  per_seed = {seed: _ensemble_metrics(members, checkpoint=checkpoint, split=split) for seed, members in runs.items()}
  first = next(iter(per_seed.values()))
  rows, summary = {}, {}
  for name in first["metrics"]:
    metrics = {seed: result["metrics"][name] for seed, result in per_seed.items()}
    mean, std = seeds_lib.mean_std(metrics)
    summary[name] = {"runs": {str(seed): m for seed, m in metrics.items()}, "mean": mean, "std": std}
    rows.update(seeds_lib.seed_rows(metrics, mean, std, label=f"{name}: "))
  table = seeds_lib.format_rows(rows, title=f"{first['dataset']} {first['split']}, ensembles of {len(workdirs)} "
                                            f"workdirs' runs of one seed")
  result = {"split": first["split"], "dataset": first["dataset"], "seeds": list(per_seed),
            "members": {str(seed): r["members"] for seed, r in per_seed.items()}, "metrics": summary, "table": table}
  evaluate.write_report(workdir, f"ensemble_{first['split']}", result, table)
  return result
