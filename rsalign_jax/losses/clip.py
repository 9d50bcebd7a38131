"""CLIP / SigLIP objective for dual encoders: softmax or sigmoid contrastive loss with learned temperature.

kind='softmax': `contrastive.softmax_loss` (CLIP), learned `log_scale` initialised to log(1/0.07), the scale
exp(log_scale) capped at 100 as in CLIP (the cap is applied in the forward pass: OpenCLIP clamps the parameter
after each step instead, ours). kind='sigmoid': `sigmoid.sigmoid_loss` (SigLIP), learned `log_scale` (t') init
log 10 and `bias` init -10. Captions of the same image in a batch (`batch['image_id']`) are all positives.
Both kinds name the temperature `log_scale`, so a CLIP checkpoint's `logit_scale` imports into either.
`impl`/`block_size` select how the loss is computed over the global batch (see `rsalign_jax.losses`).
"""
import math

import flax.linen as nn
import jax.numpy as jnp

from rsalign_jax.losses import base
from rsalign_jax.losses.contrastive import softmax_loss
from rsalign_jax.losses.sigmoid import sigmoid_loss

KINDS = ("softmax", "sigmoid")
MAX_LOG_SCALE = math.log(100.0)


class Objective(base.Objective):
  kind: str = "softmax"
  log_scale_init: float | None = None  # None: log(1/0.07) for softmax, log(10) for sigmoid
  bias_init: float = -10.0
  impl: str = "global"
  block_size: int = 0

  @nn.compact
  def __call__(self, outputs, batch):
    if self.kind not in KINDS:
      raise ValueError(f"loss.kind={self.kind!r}: expected one of {KINDS}")
    default_init = math.log(1 / 0.07) if self.kind == "softmax" else math.log(10.0)
    init = default_init if self.log_scale_init is None else self.log_scale_init
    log_scale = self.param("log_scale", nn.initializers.constant(init), (), jnp.float32)
    images, texts, ids = outputs["image_embedding"], outputs["text_embedding"], batch["image_id"]
    common = dict(impl=self.impl, block_size=self.block_size or None)
    if self.kind == "softmax":
      log_scale = jnp.minimum(log_scale, MAX_LOG_SCALE)
      return softmax_loss(images, texts, ids, log_scale=log_scale, **common), {"scale": jnp.exp(log_scale)}
    bias = self.param("bias", nn.initializers.constant(self.bias_init), (), jnp.float32)
    loss = sigmoid_loss(images, texts, ids, log_scale=log_scale, bias=bias, **common)
    return loss, {"scale": jnp.exp(log_scale), "bias": bias}
