"""Optimizers and the papers' per-epoch learning-rate schedules, built from the config."""
import re

import jax
import jax.numpy as jnp
import optax


def warmup_step_decay(base_lr, *, steps_per_epoch, warmup_epochs=0, decay_every_epochs=20, decay_factor=0.1):
  """The HVSA/AMFMN `adjust_learning_rate` schedule, constant within an epoch e (0-based):

  lr = base * (e+1)/warmup for e < warmup, else base * factor^floor((e+1)/decay_every). With HVSA's values
  (warmup 10, every 20, x0.1) the decays land at epochs 19 and 39, one epoch earlier than "every 20" suggests,
  exactly as in the reference. AMFMN is warmup 0, x0.7.
  """
  def schedule(step):
    epoch = step // steps_per_epoch
    warm = base_lr * (epoch + 1) / max(warmup_epochs, 1)
    decayed = base_lr * decay_factor ** ((epoch + 1) // decay_every_epochs)
    return jnp.where(epoch < warmup_epochs, warm, decayed)
  return schedule


def make_schedule(config, steps_per_epoch):
  kind = config.schedule.name
  if kind == "warmup_step_decay":
    kwargs = {k: v for k, v in config.schedule.items() if k != "name"}
    return warmup_step_decay(config.optimizer.lr, steps_per_epoch=steps_per_epoch, **kwargs)
  if kind == "constant":
    return optax.constant_schedule(config.optimizer.lr)
  raise ValueError(f"schedule.name={kind!r}: expected 'warmup_step_decay' or 'constant'")


def make_optimizer(config, schedule):
  """optax AdamW (HVSA: decoupled decay scaled by the lr, like torch) or Adam (AMFMN), optional global-norm clip.

  `optimizer.frozen` (regexes over '/'-joined parameter paths such as 'model/efficientnet/.*') names parameters
  that never change: neither updates nor weight decay reach them and they get no optimizer state.
  """
  opt = config.optimizer
  if opt.name == "adamw":
    tx = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
  elif opt.name == "adam":
    tx = optax.adam(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps)
  else:
    raise ValueError(f"optimizer.name={opt.name!r}: expected 'adamw' or 'adam'")
  if opt.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  frozen = tuple(opt.get("frozen", ()))
  if frozen:
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, frozen_labels(frozen))
  return tx


def frozen_labels(patterns):
  """params -> the same tree of 'frozen' / 'train' labels; a pattern that matches no parameter is an error."""
  compiled = [re.compile(p) for p in patterns]

  def labels(params):
    names = jax.tree_util.tree_map_with_path(
        lambda path, _: jax.tree_util.keystr(path, simple=True, separator="/"), params)
    unused = [p.pattern for p in compiled if not any(p.fullmatch(name) for name in jax.tree.leaves(names))]
    if unused:
      raise ValueError(f"optimizer.frozen: {unused} match no parameter; parameters look like "
                       f"{sorted(jax.tree.leaves(names))[:3]}")
    return jax.tree.map(lambda name: "frozen" if any(p.fullmatch(name) for p in compiled) else "train", names)
  return labels
