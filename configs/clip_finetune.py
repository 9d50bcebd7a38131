"""Fine-tuning a CLIP checkpoint (an OpenCLIP state dict or an HF CLIPModel: RemoteCLIP, GeoRSCLIP) on an RS dataset.

  python -m rsalign_jax.main --config=configs/clip_finetune.py:rsitmd,manual_dir=DIR,checkpoint=PATH --workdir=W
  python -m rsalign_jax.main --config=configs/clip_finetune.py:rsicd,manual_dir=DIR,checkpoint=PATH,lit --workdir=W
  python -m rsalign_jax.main --config=configs/clip_finetune.py:ucm,manual_dir=DIR,checkpoint=PATH,loss=sigmoid ...
  python -m rsalign_jax.main --config=configs/clip_finetune.py:runlocal,checkpoint=PATH --workdir=W  # smoke run
Arg options: a dataset (`synthetic`, `rsicd`, `rsitmd`, `ucm`, `sydney`), `runlocal`, `manual_dir=PATH`, `seed=N`,
`data_dir=PATH`, and:
- `checkpoint=PATH` (required), `format=open_clip|hf`: an OpenCLIP ViT state dict file (default; RemoteCLIP's and
  GeoRSCLIP's releases) or an HF `CLIPModel.save_pretrained` directory (rsalign_jax.weights.clip);
- `activation=gelu|quick_gelu`: not stored in the weights; default HF config.json's, else OpenCLIP's 'gelu'.
  RemoteCLIP's and GeoRSCLIP's own code builds their ViT-B/32 as OpenAI's (`pretrained='openai'`): 'quick_gelu';
- `lit`: LiT, the image tower locked (`model/image_encoder` frozen, in inference mode); the text tower and both
  projections train;
- `loss=softmax|sigmoid`: CLIP's or SigLIP's loss (losses/clip.py); the checkpoint's temperature initialises either;
- `vocab_file=PATH`: CLIP's BPE (data.tokenizers.ClipBpeTokenizer); default the HF directory's vocab.json (with its
  merges.txt) if it has one, else open_clip's bpe_simple_vocab_16e6.txt.gz from the installed open-clip-torch
  (`python -m rsalign_jax.weights fetch`).
The model is the checkpoint's (weights.clip.model_config): its architecture, image size, CLIP's pixel normalisation,
argmax (end-of-text) pooling and its context length (77) as `text.max_len`; all its weights and its temperature are
imported (`config.init.clip`). Training (ours, between HarMA's AdamW lr 4e-6 on GeoRSCLIP and CLIP-rsicd's 5e-5,
docs/METHODS.md §6): AdamW lr 1e-5 (b2 0.98, eps 1e-6) wd 0.2, grad clip 1.0, batch 128, 1 warm-up epoch, x0.1 from
the 8th epoch, 10 epochs. The evaluation of the initial state scores the checkpoint itself (zero-shot retrieval).
"""
import os

from rsalign_jax import configlib
from rsalign_jax.weights import clip

LOSSES = ("softmax", "sigmoid")
FROZEN_PARAMS = {"image": "model/image_encoder/.*"}


def get_config(arg=None):
  arg = configlib.parse_arg(arg, positional="dataset", dataset="synthetic", runlocal=False, manual_dir="", seed=0,
                            data_dir="", checkpoint="", format="open_clip", activation="", lit=False, loss="softmax",
                            vocab_file="")
  if not arg.checkpoint:
    raise ValueError("config arg checkpoint=PATH is required: an OpenCLIP state dict file (format=open_clip) or an "
                     "HF CLIPModel directory (format=hf)")
  if arg.format not in clip.FORMATS:
    raise ValueError(f"config arg format={arg.format!r}: expected one of {clip.FORMATS}")
  if arg.loss not in LOSSES:
    raise ValueError(f"config arg loss={arg.loss!r}: expected one of {LOSSES}")
  config = configlib.base_config(arg)
  config.model_name = "dual_encoder"
  config.loss_name = "clip"
  config.loss = dict(kind=arg.loss, log_scale_init=None, bias_init=-10.0, impl="global", block_size=0)
  config.optimizer = dict(name="adamw", lr=1e-5, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2, grad_clip_norm=1.0)
  config.schedule = dict(name="warmup_step_decay", warmup_epochs=1, decay_every_epochs=8, decay_factor=0.1)
  config.total_epochs = 10
  if arg.runlocal:
    configlib.shrink_for_runlocal(config)
  # After runlocal: the checkpoint fixes the architecture and image size.
  configlib.clip_checkpoint(config, arg.checkpoint, arg.format, activation=arg.activation or None)
  config.text.vocab_file = arg.vocab_file or bpe_file(arg)
  configlib.freeze(config, "image" if arg.lit else "", FROZEN_PARAMS)
  return config


def bpe_file(arg):
  """The HF checkpoint directory's vocab.json, else the installed open-clip-torch's BPE merges."""
  if arg.format == "hf":
    folder = arg.checkpoint if os.path.isdir(arg.checkpoint) else os.path.dirname(arg.checkpoint)
    if os.path.exists(os.path.join(folder, "vocab.json")):
      return os.path.join(folder, "vocab.json")
  return clip.packaged_bpe()
