"""Several seeds of one config: `--config.seeds=0,1,2` trains (`--mode=train`) or evaluates (`--mode=eval`) each in
WORKDIR/seed_<n> and reports mean +- std of the test table, as the papers' repeated runs do (sample std, ddof=1;
0 for one seed). Training reuses a seed's finished run (its results.json) and trains or resumes the others.
"""
import json
import os

import numpy as np

from rsalign_jax import train
from rsalign_jax.modes import evaluate
from rsalign_jax.runtime import metric_writer

log = metric_writer.log
TABLE_KEYS = ("i2t_R1", "i2t_R5", "i2t_R10", "t2i_R1", "t2i_R5", "t2i_R10", "mR", "rsum")


def seed_workdir(workdir, seed):
  return os.path.join(workdir, f"seed_{seed}")


def seed_config(config, seed):
  """`config` with `seed` and no further seeds."""
  config = config.copy_and_resolve_references()
  config.seed = seed
  if "seeds" in config:
    config.seeds = ()
  return config


def train_seeds(config, workdir, seeds):
  """Trains (or reuses the finished run of) every seed in WORKDIR/seed_<n>; reports mean +- std of the test table."""
  runs = {}
  for seed in seeds:
    directory = seed_workdir(workdir, seed)
    results_path = os.path.join(directory, "results.json")
    if os.path.exists(results_path):
      log("seed %d: reusing the finished run in %s", seed, directory)
    else:
      log("seed %d: training in %s", seed, directory)
      if "preempted_at_step" in train.train_and_evaluate(seed_config(config, seed), directory):
        raise RuntimeError(f"seed {seed} was preempted; re-run the same command to resume it")
    with open(results_path) as f:
      runs[seed] = json.load(f)["test"]
  return summarize(config, workdir, runs, config.dataset.test_split)


def evaluate_seeds(config, workdir, seeds, *, checkpoint="", split=""):
  """`evaluate` on every WORKDIR/seed_<n>; reports mean +- std."""
  runs = {seed: evaluate.evaluate(seed_config(config, seed), seed_workdir(workdir, seed), checkpoint=checkpoint,
                         split=split)["metrics"] for seed in seeds}
  return summarize(config, workdir, runs, split or config.dataset.test_split)


def summarize(config, workdir, runs, split):
  """Mean and std of every metric over seeds: printed as a table, written to WORKDIR/seeds_<split>.json and .md."""
  mean, std = mean_std(runs)
  table = format_rows(seed_rows(runs, mean, std), title=f"{config.model_name}, {config.dataset.name} {split}")
  result = {"split": split, "dataset": config.dataset.name, "model": config.model_name, "seeds": list(runs),
            "runs": {str(seed): run for seed, run in runs.items()}, "mean": mean, "std": std, "table": table}
  evaluate.write_report(workdir, f"seeds_{split}", result, table)
  return result


def mean_std(runs):
  """({metric: mean}, {metric: sample std}) over the seeds' metrics {seed: {metric: value}}."""
  keys = list(next(iter(runs.values())))
  values = {k: np.asarray([run[k] for run in runs.values()], np.float64) for k in keys}
  mean = {k: float(v.mean()) for k, v in values.items()}
  std = {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()}
  return mean, std


def seed_rows(runs, mean, std, label=""):
  """`format_rows`' rows: one per seed, then mean ± std; `label` prefixes every row's name."""
  rows = {f"{label}seed {seed}": {k: f"{run[k]:.2f}" for k in TABLE_KEYS} for seed, run in runs.items()}
  rows[f"{label}mean ± std ({len(runs)} seeds)"] = {k: f"{mean[k]:.2f} ± {std[k]:.2f}" for k in TABLE_KEYS}
  return rows


def format_rows(rows, title=""):
  """A markdown table of preformatted cells in the papers' column layout (`metrics.format_table`'s headers)."""
  labels = ["i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10", "mR", "rsum"]
  lines = [f"**{title}**", ""] if title else []
  lines += ["| model | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
  lines += [f"| {name} | " + " | ".join(cells[k] for k in TABLE_KEYS) + " |" for name, cells in rows.items()]
  return "\n".join(lines)
