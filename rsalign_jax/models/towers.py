"""Swappable trunks of the paper methods (HVSA, AMFMN): the image backbone and the sentence encoder.

The papers train an ImageNet ResNet-18 and the skip-thoughts GRU. ImageNet ResNet weights cannot be installed
offline, so the models also take a pretrained EfficientNet-Lite trunk (`image_backbone='lite0'..'lite4'`,
models/efficientnet_lite.py; its weights expect images scaled as (x - 127) / 128) and a BERT/MiniLM sentence
encoder (`text_encoder='bert'`, models/bert.py, mean pooled like sentence-transformers). A tower named in `frozen`
('image', 'text') runs in inference mode (BatchNorm running statistics, no dropout) under `stop_gradient`; the
optimizer must also leave its parameters alone (`optimizer.frozen`, see rsalign_jax.optimizers). `image_trunk`
(the last map 'f4') and `text_trunk` (the sentence feature) are what the heads read; a frozen tower named in
`precomputed` takes those outputs as its input instead of images / token ids (`rsalign_jax.trunk_cache`).

Submodule names follow the trunk, so importers fill them directly: `resnet`, `efficientnet`, `skipthoughts`, `bert`.
"""
import flax
import jax

from rsalign_jax.models import base, bert, efficientnet_lite, resnet, skipthoughts

IMAGE_BACKBONES = ("resnet", *efficientnet_lite.VARIANTS)
TEXT_ENCODERS = ("gru", "bert")


class SwappableTowers:
  """Mixin for a linen Model with fields image_backbone, resnet_depth, resnet_width, text_encoder, word_dim,
  hidden_dim, text_dropout, bert_config (BERT kwargs), frozen, precomputed, vocab_size and dtype. Call
  `setup_towers()` in `setup`. Only the towers in the model's TRUNKS (rsalign_jax.models.base) can be precomputed."""

  def __post_init__(self):
    # BERT kwargs arrive as a dict (config.model.to_dict()); frozen, the module stays hashable for jit's cache.
    object.__setattr__(self, "bert_config", flax.core.FrozenDict(self.bert_config or {}))
    object.__setattr__(self, "frozen", tuple(self.frozen))
    object.__setattr__(self, "precomputed", tuple(self.precomputed))
    super().__post_init__()

  def setup_towers(self):
    if self.image_backbone not in IMAGE_BACKBONES:
      raise ValueError(f"model.image_backbone={self.image_backbone!r}: expected one of {IMAGE_BACKBONES}")
    if self.text_encoder not in TEXT_ENCODERS:
      raise ValueError(f"model.text_encoder={self.text_encoder!r}: expected one of {TEXT_ENCODERS}")
    unknown = set(self.frozen) - set(base.TOWER_NAMES)
    if unknown:
      raise ValueError(f"model.frozen={tuple(self.frozen)!r}: {sorted(unknown)} not in {base.TOWER_NAMES}")
    if set(self.precomputed) - set(self.frozen):
      raise ValueError(f"model.precomputed={self.precomputed!r}: only frozen towers {self.frozen!r} can be "
                       "precomputed (a trained tower's output changes every step)")
    if set(self.precomputed) - set(self.TRUNKS):
      raise ValueError(f"model.precomputed={self.precomputed!r}: {type(self).__module__} splits only the towers "
                       f"{self.TRUNKS} into trunk and heads; precompute those only")
    if self.image_backbone == "resnet":
      self.resnet = resnet.ResNet(self.resnet_depth, self.resnet_width, self.dtype)
    else:
      width, depth = efficientnet_lite.VARIANTS[self.image_backbone]
      self.efficientnet = efficientnet_lite.EfficientNetLite(width, depth, dtype=self.dtype)
    if self.text_encoder == "gru":
      self.skipthoughts = skipthoughts.BayesianUniSkip(self.vocab_size, self.word_dim, self.hidden_dim,
                                                       self.text_dropout, self.dtype)
    else:
      self.bert = bert.Bert(vocab_size=self.vocab_size, **self.bert_config, dtype=self.dtype)

  @property
  def image_features_dim(self) -> int:
    """Channels of the backbone's last map 'f4'."""
    if self.image_backbone == "resnet":
      return resnet.ResNet(self.resnet_depth, self.resnet_width).out_features
    return efficientnet_lite.HEAD

  @property
  def sentence_dim(self) -> int:
    return self.hidden_dim if self.text_encoder == "gru" else self.bert_config.get("hidden", bert.Bert.hidden)

  def image_trunk(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """The backbone's last map 'f4' (what `image_features` returns when the image tower is precomputed)."""
    return self.image_features(images, train=train)["f4"]

  def text_trunk(self, tokens: jax.Array, lengths: jax.Array, *, train: bool = False) -> jax.Array:
    return self.sentence_features(tokens, lengths, train=train)

  def image_features(self, images: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """The backbone's maps {'f1'..'f4'} at strides 4, 8, 16, 32 ({'f4': images} when precomputed)."""
    if "image" in self.precomputed:
      return {"f4": images}
    frozen = "image" in self.frozen
    trunk = self.resnet if self.image_backbone == "resnet" else self.efficientnet
    maps = {k: v for k, v in trunk(images, train=train and not frozen).items() if k != "pooled"}
    return jax.lax.stop_gradient(maps) if frozen else maps

  def sentence_features(self, tokens: jax.Array, lengths: jax.Array, *, train: bool) -> jax.Array:
    """(B, sentence_dim): the GRU state at the last real token, or BERT's mean-pooled last layer (float32); the
    input itself when precomputed."""
    if "text" in self.precomputed:
      return tokens
    frozen = "text" in self.frozen
    train = train and not frozen
    if self.text_encoder == "gru":
      sentences = self.skipthoughts(tokens, lengths, train=train)
    else:
      sentences = bert.mean_pool(self.bert(tokens, lengths, train=train), lengths)
    return jax.lax.stop_gradient(sentences) if frozen else sentences
