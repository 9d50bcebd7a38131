"""Optimizers and the papers' per-epoch learning-rate schedules, built from the config."""
import re

import jax
import jax.numpy as jnp
import optax

from rsalign_jax.runtime import sharding as sharding_lib


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


def make_optimizer(config, schedule, frozen=None):
  """optax AdamW (HVSA: decoupled decay scaled by the lr, like torch) or Adam (AMFMN), optional global-norm clip.

  `optimizer.frozen` (regexes over '/'-joined parameter paths such as 'model/efficientnet/.*') names parameters
  that never change: neither updates nor weight decay reach them and they get no optimizer state.
  `optimizer.lr_mults` ((regex, factor) pairs, the first match wins) scales the schedule for those parameters, as
  torch's parameter groups do: e.g. a pretrained backbone at 0.1x the lr of freshly initialised heads.
  frozen: patterns in place of `optimizer.frozen` (heads on cached trunks have no frozen parameters).
  """
  opt = config.optimizer
  if opt.name not in ("adamw", "adam"):
    raise ValueError(f"optimizer.name={opt.name!r}: expected 'adamw' or 'adam'")

  def optimizer(lr):
    if opt.name == "adamw":
      return optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
    return optax.adam(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps)

  frozen = frozen_patterns(config) if frozen is None else tuple(frozen)
  lr_mults = tuple((pattern, float(factor)) for pattern, factor in opt.get("lr_mults", ()))
  if frozen or lr_mults:
    groups = {"train": optimizer(schedule), "frozen": optax.set_to_zero()}
    groups.update({f"lr_mults[{i}]": optimizer(scaled(schedule, factor)) for i, (_, factor) in enumerate(lr_mults)})
    tx = optax.multi_transform(groups, parameter_labels(frozen, [pattern for pattern, _ in lr_mults]))
  else:
    tx = optimizer(schedule)
  if opt.grad_clip_norm:  # frozen parameters' gradients are zero (train_step), so the norm is the trained ones'
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx


def frozen_patterns(config):
  """`optimizer.frozen` as a tuple: hashable, so train_step can take it as a static argument."""
  return tuple(config.optimizer.get("frozen", ()))


def scaled(schedule, factor):
  """`schedule` (a function of the step, or a constant lr) times `factor`."""
  if callable(schedule):
    return lambda step: factor * schedule(step)
  return factor * schedule


def stop_frozen_gradients(params, frozen):
  """`params` with stop_gradient on the leaves where the tree `frozen` is True.

  Inside a differentiated function this spares autodiff the weight gradients of frozen parameters and the whole
  backward pass below the lowest trainable layer: a backbone frozen up to its last blocks trains at little more
  than the cost of its forward pass.
  """
  return jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)


def frozen_mask(params, patterns):
  """params -> the same tree of bools, True where one of `patterns` (regexes, see `parameter_labels`) matches."""
  return jax.tree.map(lambda label: label == "frozen", parameter_labels(patterns)(params))


def parameter_paths(params):
  """params -> the same tree of '/'-joined paths ('model/image_encoder/conv_stem/kernel'), what the regexes match."""
  return jax.tree_util.tree_map_with_path(lambda path, _: sharding_lib.path_name(path), params)


def parameter_labels(frozen, lr_mults=()):
  """params -> the same tree of labels: 'frozen' where a `frozen` regex matches the '/'-joined path, else
  'lr_mults[i]' for the first of the `lr_mults` regexes that matches, else 'train'. A regex that matches no
  parameter is an error (a typo would otherwise silently train or freeze the wrong thing)."""
  named = {"optimizer.frozen": [re.compile(p) for p in frozen],
           "optimizer.lr_mults": [re.compile(p) for p in lr_mults]}

  def labels(params):
    names = parameter_paths(params)
    for field, compiled in named.items():
      unused = [p.pattern for p in compiled if not any(p.fullmatch(name) for name in jax.tree.leaves(names))]
      if unused:
        raise ValueError(f"{field}: {unused} match no parameter; parameters look like "
                         f"{sorted(jax.tree.leaves(names))[:3]}")

    def label(name):
      if any(p.fullmatch(name) for p in named["optimizer.frozen"]):
        return "frozen"
      return next((f"lr_mults[{i}]" for i, p in enumerate(named["optimizer.lr_mults"]) if p.fullmatch(name)),
                  "train")
    return jax.tree.map(label, names)
  return labels
