"""CCLS2T's objective (our design, docs/METHODS.md Part B §4.2.3-4.2.4; the paper's losses are not public):

  loss = CLIP(z_img, z_txt) + mid_weight CLIP(mid_img, mid_txt)
       + hash_weight HASH(h_img, h_txt) + quantization_weight Q + balance_weight BAL + spacetime_weight ST

- CLIP: `contrastive.softmax_loss` (symmetric InfoNCE, same-image pairs positive), each level with its own learned
  log logit scale (init log 1/0.07, clipped at log 100 as in CLIP).
- HASH on the relaxed codes h = tanh(W z): `hash_loss='contrastive'` (softmax_loss on h, own scale) or 'pairwise'
  (DCMH's pairwise likelihood, `hashing.pairwise_likelihood_loss`). Its positives are same-image pairs
  (`hash_positives='image'`) or same-scene pairs ('scene', reads the batch's `scene` field): codes then serve
  class-level image->image retrieval (CBRSIR) while the float embeddings stay instance-level.
- Q = quantisation ||h - sign h||^2 and BAL = bit balance ||mean h||^2, both averaged over the two modalities and
  divided by the number of bits, so their weights do not depend on K.
- ST: mean squared error of the text tower's spacetime reconstruction against the `spacetime` field (skipped when
  the model has no metadata input).
"""
import math

import flax.linen as nn
import jax.numpy as jnp

from rsalign_jax.losses import base
from rsalign_jax.losses import hashing
from rsalign_jax.losses.contrastive import softmax_loss

HASH_LOSSES = ("contrastive", "pairwise")
HASH_POSITIVES = ("image", "scene")


class Objective(base.Objective):
  init_log_scale: float = math.log(1 / 0.07)
  max_log_scale: float = math.log(100.0)
  mid_weight: float = 0.5
  hash_loss: str = "contrastive"
  hash_positives: str = "image"
  hash_weight: float = 1.0
  quantization_weight: float = 0.1
  balance_weight: float = 0.1
  spacetime_weight: float = 1.0
  impl: str = "global"
  block_size: int = 0

  @property
  def batch_fields(self):
    return ("scene",) if self.hash_positives == "scene" else ()

  def _clip(self, images, texts, ids, name):
    """softmax_loss with the learned, clipped log scale `log_scale_<name>`; returns (loss, log scale)."""
    log_scale = self.param(f"log_scale_{name}", nn.initializers.constant(self.init_log_scale), ())
    log_scale = jnp.minimum(log_scale, self.max_log_scale)
    loss = softmax_loss(images, texts, ids, log_scale=log_scale, impl=self.impl, block_size=self.block_size or None)
    return loss, log_scale

  @nn.compact
  def __call__(self, outputs, batch):
    if self.hash_loss not in HASH_LOSSES:
      raise ValueError(f"loss.hash_loss={self.hash_loss!r}: expected one of {HASH_LOSSES}")
    if self.hash_positives not in HASH_POSITIVES:
      raise ValueError(f"loss.hash_positives={self.hash_positives!r}: expected one of {HASH_POSITIVES}")
    ids = batch["image_id"]
    final, log_scale = self._clip(outputs["image_embedding"], outputs["text_embedding"], ids, "final")
    mid, _ = self._clip(outputs["image_mid"], outputs["text_mid"], ids, "mid")
    image_codes, text_codes = outputs["image_codes"], outputs["text_codes"]
    hash_ids = batch["scene"] if self.hash_positives == "scene" else ids
    if self.hash_loss == "contrastive":
      hash_term, _ = self._clip(image_codes, text_codes, hash_ids, "hash")
    else:
      hash_term = hashing.pairwise_likelihood_loss(image_codes, text_codes, hash_ids, impl=self.impl,
                                                   block_size=self.block_size or None)
    bits = image_codes.shape[-1]
    quantization = (hashing.quantization_loss(image_codes) + hashing.quantization_loss(text_codes)) / (2 * bits)
    balance = (hashing.bit_balance_loss(image_codes) + hashing.bit_balance_loss(text_codes)) / (2 * bits)
    total = (final + self.mid_weight * mid + self.hash_weight * hash_term + self.quantization_weight * quantization
             + self.balance_weight * balance)
    metrics = {"clip": final, "clip_mid": mid, "hash": hash_term, "quantization": quantization,
               "bit_balance": balance, "logit_scale": jnp.exp(log_scale)}
    if "spacetime_reconstruction" in outputs:
      target = batch["spacetime"].astype(jnp.float32)
      spacetime = jnp.mean((outputs["spacetime_reconstruction"].astype(jnp.float32) - target) ** 2)
      total = total + self.spacetime_weight * spacetime
      metrics["spacetime"] = spacetime
    return total, metrics
