"""`--mode=eval`: the papers' retrieval table of a trained workdir, and mean +- std over several seeds.

Evaluation recomputes exactly what the trainer reports: the same evaluator (`Setup.make_evaluator`), the same jitted
towers and the same checkpoint choice (best val if `config.test_on_best` and a best checkpoint exists, else the
last), so its numbers equal `results.json`'s test numbers. Several seeds (`config.seeds`, e.g. `--config.seeds=0,1,2`)
live in WORKDIR/seed_<n>; training reuses a seed's finished run (its results.json) and trains or resumes the others;
the table then reports mean +- std over the seeds, as the papers' repeated runs do (sample std, ddof=1; 0 for one).
"""
import json
import os

import jax
import numpy as np

from rsalign_jax import train
from rsalign_jax.evaluation import metrics as metrics_lib
from rsalign_jax.modes import trained as trained_lib
from rsalign_jax.runtime import metric_writer

log = metric_writer.log
TABLE_KEYS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mR", "rsum")


def evaluate(config, workdir, *, checkpoint="", split=""):
  """Evaluates a checkpoint of `workdir` on `split` (default: the test split); prints and writes the table.

  Writes WORKDIR/eval_<split>.json ({split, dataset, checkpoint, step, metrics, table}) and .md. Returns the dict.
  """
  loaded = trained_lib.load(config, workdir, checkpoint)
  split = split or config.dataset.test_split
  with jax.set_mesh(loaded.setup.mesh):
    evaluator = loaded.setup.make_evaluator(split)
    metrics = loaded.setup.retrieval.evaluate(evaluator, loaded.variables)
  title = f"{config.dataset.name} {split}"
  table = metrics_lib.format_table({f"{config.model_name} ({loaded.checkpoint})": metrics}, title=title)
  result = {"split": split, "dataset": config.dataset.name, "model": config.model_name,
            "checkpoint": loaded.checkpoint, "step": loaded.step, "images": evaluator.num_images,
            "metrics": metrics, "table": table}
  _write(workdir, f"eval_{split}", result, table)
  return result


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
  runs = {seed: evaluate(seed_config(config, seed), seed_workdir(workdir, seed), checkpoint=checkpoint,
                         split=split)["metrics"] for seed in seeds}
  return summarize(config, workdir, runs, split or config.dataset.test_split)


def summarize(config, workdir, runs, split):
  """Mean and std of every metric over seeds: printed as a table, written to WORKDIR/seeds_<split>.json and .md."""
  keys = list(next(iter(runs.values())))
  values = {k: np.asarray([run[k] for run in runs.values()], np.float64) for k in keys}
  mean = {k: float(v.mean()) for k, v in values.items()}
  std = {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()}
  rows = {f"seed {seed}": {k: f"{run[k]:.2f}" for k in TABLE_KEYS} for seed, run in runs.items()}
  rows[f"mean ± std ({len(runs)} seeds)"] = {k: f"{mean[k]:.2f} ± {std[k]:.2f}" for k in TABLE_KEYS}
  table = format_rows(rows, title=f"{config.model_name}, {config.dataset.name} {split}")
  result = {"split": split, "dataset": config.dataset.name, "model": config.model_name, "seeds": list(runs),
            "runs": {str(seed): run for seed, run in runs.items()}, "mean": mean, "std": std, "table": table}
  _write(workdir, f"seeds_{split}", result, table)
  return result


def format_rows(rows, title=""):
  """A markdown table of preformatted cells in the papers' column layout (`metrics.format_table`'s headers)."""
  labels = ["i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10", "mR", "rsum"]
  lines = [f"**{title}**", ""] if title else []
  lines += ["| model | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
  lines += [f"| {name} | " + " | ".join(cells[k] for k in TABLE_KEYS) + " |" for name, cells in rows.items()]
  return "\n".join(lines)


def _write(workdir, name, result, table):
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, f"{name}.json"), "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(workdir, f"{name}.md"), "w") as f:
    f.write(table + "\n")
  print(table, flush=True)
