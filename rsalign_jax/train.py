"""The one trainer: methods differ by config, model module (`config.model_name`) and objective (`config.loss_name`).

`train_and_evaluate(config, workdir)` trains with the global batch sharded over the ('data', 'fsdp') mesh, runs the
evaluators of `config.evals` on their schedules (`evaluation.schedule`: periodic ones, e.g. validation; start ones on a
fresh initial state; end ones on the tested state), keeps the best state by the selecting entry's rsum, resumes
automatically from the newest checkpoint in `workdir`, and writes the start and end metrics to `workdir/results.json`.
On a preemption notice (SIGTERM) it finishes the current step, checkpoints it and returns early; re-running the same
command resumes.
"""
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rsalign_jax import configlib, experiment, gradcache, optimizers
from rsalign_jax.data import pipeline
from rsalign_jax.evaluation import evaluators as evaluators_lib
from rsalign_jax.evaluation import schedule as schedule_lib
from rsalign_jax.runtime import checkpointing, metric_writer, preemption, progress, provenance, workdir_lock
from rsalign_jax.runtime import sharding as sharding_lib

log = metric_writer.log
# What results.json holds besides the metrics of the start and end evaluators (under their names, which these keys
# are not).
RESULTS_KEYS = ("tested_checkpoint", "best_val", "best_step", "total_steps", "train_seconds_this_run", "dataset",
                "test_images", "model", "loss", "seed", "config", "git_commit", "versions")


def train_step(state, batch, *, model, objective, tx, schedule, dropout_key, grad_cache_chunk=0, frozen=()):
  """One update on a global batch; returns the new state and float32 scalar metrics.

  frozen: the optimizer's `frozen` regexes; autodiff skips those parameters (their gradients are zero).

  grad_cache_chunk > 0: the same full-batch gradient by gradient caching (`rsalign_jax.gradcache`), embedding the
  batch in chunks of that many examples (BatchNorm then normalises per chunk, as it does per device).
  """
  rng = jax.random.fold_in(dropout_key, state.step)
  is_frozen = optimizers.frozen_mask(state.params, frozen)

  def embed(model_params, examples, rng):
    model_params = optimizers.stop_frozen_gradients(model_params, is_frozen["model"])
    args, fields = experiment.model_inputs(model, examples)
    outputs, updates = model.apply({"params": model_params, "batch_stats": state.batch_stats}, *args, **fields,
                                   train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
    return outputs, updates.get("batch_stats", {})

  def objective_loss(objective_params, outputs, batch):
    objective_params = optimizers.stop_frozen_gradients(objective_params, is_frozen["objective"])
    return objective.apply({"params": objective_params}, outputs, batch)

  if grad_cache_chunk:
    (loss, (aux, batch_stats)), grads = gradcache.gradcache_value_and_grad(
        embed, objective_loss, state.params, batch, chunk_size=grad_cache_chunk, rng=rng)
  else:
    def loss_fn(params):
      outputs, batch_stats = embed(params["model"], batch, rng)
      loss, aux = objective_loss(params["objective"], outputs, batch)
      return loss, (aux, batch_stats)

    (loss, (aux, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, **aux, "l2_grads": optax.tree.norm(grads), "l2_params": optax.tree.norm(params),
             "l2_updates": optax.tree.norm(updates), "lr": schedule(state.step)}
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
  return new_state, metrics


# The loss and gradients of a step and the parameters it produced (a NaN learning rate spoils only the last).
_WATCHED = ("loss", "l2_grads", "l2_params")


@jax.jit
def _first_non_finite(first, step, metrics):
  """`first` after `step`: the first step whose watched metrics were not all finite (0: none yet), and those metrics.

  Kept on the device, so the loop checks every step but fetches to the host only at the steps that need it.
  """
  watched = {k: metrics[k] for k in _WATCHED}
  now = (first["step"] == 0) & ~jnp.all(jnp.isfinite(jnp.stack(list(watched.values()))))
  return jax.tree.map(lambda kept, new: jnp.where(now, new, kept), first, {"step": step, **watched})


def _check_finite(first):
  """Raises if a step was non-finite; `first` is `_first_non_finite`'s, fetched to the host."""
  if first["step"]:
    bad = ", ".join(f"{k}={first[k]}" for k in _WATCHED if not np.isfinite(first[k]))
    raise FloatingPointError(
        f"step {first['step']}: non-finite {bad}; stopping before any checkpoint of this or a later state is written. "
        "Lower optimizer.lr, set optimizer.grad_clip_norm, or check the input data.")


def train_and_evaluate(config, workdir):
  """Trains `config` in `workdir` (resuming if it holds a checkpoint) and returns the results dict."""
  mesh = sharding_lib.make_mesh(fsdp=config.sharding.fsdp)
  workdir = os.path.abspath(workdir)  # orbax needs absolute paths
  with workdir_lock.hold(workdir), jax.set_mesh(mesh):  # sharded losses (`loss.impl`) read the mesh from here
    return _train_and_evaluate(config, workdir, mesh)


def _train_and_evaluate(config, workdir, mesh):
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    configlib.save_resolved(config, workdir)
  data_sharding = sharding_lib.batch_sharding(mesh)
  if config.input.batch_size % jax.device_count():
    raise ValueError(f"input.batch_size={config.input.batch_size} must be divisible by the "
                     f"{jax.device_count()} devices")
  writer = metric_writer.MetricWriter(workdir)
  log("devices: %d (%s), processes: %d", jax.device_count(), jax.devices()[0].platform, jax.process_count())

  setup = experiment.build_setup(config, workdir, mesh)
  items = setup.train_items()
  steps_per_epoch = setup.steps_per_epoch
  total_steps = config.get("total_steps") or config.total_epochs * steps_per_epoch
  schedule = schedule_lib.Schedule(config.evals, steps_per_epoch, total_steps, reserved=RESULTS_KEYS)
  evaluators = evaluators_lib.build(setup, schedule.entries)

  rng = jax.random.key(config.seed)
  model, state_sharding, abstract_state = setup.model, setup.state_sharding, setup.abstract_state
  step_fn = jax.jit(
      functools.partial(train_step, model=model, objective=setup.objective, tx=setup.tx, schedule=setup.schedule,
                        dropout_key=jax.random.fold_in(rng, 1), grad_cache_chunk=config.grad_cache_chunk,
                        frozen=setup.frozen),
      out_shardings=(state_sharding, sharding_lib.replicated(mesh)),
      donate_argnums=(0,) if jax.devices()[0].platform != "cpu" else ())

  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
  best_checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "best"), keep=1)
  loader_iterator = iter(pipeline.make_train_loader(items, pp_spec=setup.pp_train, seed=config.seed,
                                                    worker_count=config.input.worker_count))
  meta = {"best_val_rsum": -1.0, "best_step": None, "best_val": None, "start": {}}  # "start": {name: metrics}
  if checkpointer.latest_step() is not None:
    state, loader_state, restored_meta = checkpointer.restore(abstract_state)
    meta.update(restored_meta)
    loader_iterator.set_state(loader_state)
    writer.truncate_after(int(state.step))
    log("resumed from %s at step %d", workdir, int(state.step))
  else:
    state = setup.initial_state(rng)
    meta["start"] = evaluators_lib.run(evaluators, schedule.start, experiment.model_variables(state), 0, writer)
  log("parameters: %s model, %s objective", f"{_count(state.params['model']):,}", _count(state.params["objective"]))

  # --- Train loop ------------------------------------------------------------------------------------------------
  prefetcher = sharding_lib.DevicePrefetcher(loader_iterator, data_sharding, size=config.input.prefetch)
  step = int(state.step)
  log("training steps %d..%d (%d steps/epoch, global batch %d)", step, total_steps, steps_per_epoch,
      config.input.batch_size)
  window_start, window_steps, train_start = time.time(), 0, time.time()
  preemption_watch = preemption.PreemptionWatch()
  preempted = False
  first_bad = jax.device_put({"step": np.int32(0), **{k: np.float32(0) for k in _WATCHED}},
                             sharding_lib.replicated(mesh))
  compiled_step = None
  try:
    while step < total_steps:
      batch = next(prefetcher)
      if compiled_step is None:  # compiled ahead of the first call, to report its per-device memory
        state = jax.device_put(state, state_sharding)
        compiled_step = step_fn.lower(state, batch).compile()
        writer.scalars(step + 1, {"step_memory_mib": _step_memory_mib(compiled_step)}, prefix="perf/")
      state, step_metrics = compiled_step(state, batch)
      first_bad = _first_non_finite(first_bad, state.step, step_metrics)
      step += 1
      window_steps += 1
      log_now = step % config.log_every_steps == 0 or step == total_steps
      due = schedule.due(step)
      preempted = preemption_watch.reached(step)
      save_now = preempted or step % config.checkpoint_every_steps == 0 or step == total_steps
      if not (log_now or due or save_now):
        continue  # nothing needs this step on the host: dispatch the next one while the device runs it
      step_metrics, bad = jax.device_get((step_metrics, first_bad))  # waits for the step: time the window after it
      _check_finite(bad)
      if log_now:
        seconds_per_step = (time.time() - window_start) / window_steps
        writer.scalars(step, step_metrics, prefix="train/")
        writer.scalars(step, {"seconds_per_step": seconds_per_step,
                              "images_per_second": config.input.batch_size / seconds_per_step}, prefix="perf/")
        log("step %d/%d (epoch %.1f) loss %.4f | %.3f s/step, %.0f img/s | ETA %s", step, total_steps,
            step / steps_per_epoch, step_metrics["loss"], seconds_per_step, config.input.batch_size / seconds_per_step,
            progress.format_duration(seconds_per_step * (total_steps - step)))
        window_start, window_steps = time.time(), 0
      if due:
        evaluated = evaluators_lib.run(evaluators, due, experiment.model_variables(state), step, writer)
        selection = schedule.selection(due, evaluated)
        if selection is not None and selection[0] > meta["best_val_rsum"]:
          meta.update(best_val_rsum=selection[0], best_step=step, best_val=selection[1])
          best_checkpointer.save(step, state, meta={"step": step, "val": selection[1]})
        window_start, window_steps = time.time(), 0
      if save_now:
        checkpointer.save(step, state, loader_state=prefetcher.state, meta=meta)
      if preempted:
        break
  finally:
    preemption_watch.close()
    prefetcher.close()
    checkpointer.wait_until_finished()
    best_checkpointer.wait_until_finished()
  train_seconds = time.time() - train_start
  if preempted:
    log("preempted: checkpoint saved at step %d; re-run the same command to resume", step)
    writer.close()
    checkpointer.close()
    best_checkpointer.close()
    return {"preempted_at_step": step}

  # --- End evaluators --------------------------------------------------------------------------------------------
  tested = "last"
  if config.test_on_best and best_checkpointer.latest_step() is not None:
    state, _, _ = best_checkpointer.restore(abstract_state)
    tested = f"best val (step {int(state.step)})"
  end = evaluators_lib.run(evaluators, schedule.end, experiment.model_variables(state), step, writer)
  writer.hparams(config.to_dict(), [f"{name}/{metric}" for name, metrics in end.items() for metric in metrics])
  test_split = config.dataset.test_split
  results = {**end, "tested_checkpoint": tested, **meta["start"], "best_val": meta["best_val"],
             "best_step": meta["best_step"], "total_steps": total_steps,
             "train_seconds_this_run": round(train_seconds, 1), "dataset": config.dataset.name,
             "test_images": setup.splits[test_split].index.num_images if test_split in setup.splits else None,
             "model": config.model_name, "loss": config.loss_name, "seed": config.seed, "config": config.to_dict(),
             "git_commit": provenance.git_commit(), "versions": provenance.versions()}
  rows = {f"{name}: {config.model_name} (random init)": metrics for name, metrics in meta["start"].items()}
  rows.update({f"{name}: {config.model_name} ({tested})": metrics for name, metrics in end.items()})
  table = evaluators_lib.papers_table(rows, title=config.dataset.name)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
    if table:
      print(table, flush=True)
  if table:
    writer.text(step, "results/table", table)
  writer.close()
  checkpointer.close()
  best_checkpointer.close()
  return results


def _step_memory_mib(compiled):
  """XLA's per-device buffers of a compiled step: arguments, outputs and temporaries at their peak (MiB)."""
  stats = compiled.memory_analysis()
  return stats.peak_memory_in_bytes / 2**20 if stats is not None else float("nan")


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))
