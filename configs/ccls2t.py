"""CCLS2T (Zhu et al., TGRS 2024), our design of it (docs/METHODS.md Part B §4.2; the paper is not public).

  python -m rsalign_jax.main --config=configs/ccls2t.py --workdir=DIR            # synthetic benchmark, CPU size
  python -m rsalign_jax.main --config=configs/ccls2t.py:runlocal --workdir=DIR   # a seconds-long smoke run
  python benchmarks/hash_retrieval.py --workdir=DIR                              # CBRSIR: hash codes + index
The trainer itself reports the exhaustive Hamming CBRSIR row at the end (`config.evals.hash`, results.json `hash`).
Arg options: a dataset (`synthetic`, `rsicd`, `rsitmd`, `ucm`, `sydney`), `runlocal`, `manual_dir=PATH`, `seed=N`.

On the synthetic benchmark the captions are the images' metadata prompts (`dataset.captions='metadata_prompt'`),
the text tower takes the `spacetime` field, and the hash loss treats same-scene pairs as positives, so the codes
serve class-level image->image retrieval. The trainer's i2t/t2i table then measures matching an image with its own
metadata prompt among all test prompts. The real caption datasets carry no acquisition metadata: their args train
the same towers and hash heads on the human captions, without the spacetime input and reconstruction, at the sizes
docs/METHODS.md Part B §4.2 gives (256 px, ResNet-18 width 64, 4-layer d-512 text transformer, 64 bits).
"""
from rsalign_jax import configlib
from rsalign_jax.data import fields

REAL_DATASETS = ("rsicd", "rsitmd", "ucm", "sydney")


def get_config(arg=None):
  arg = configlib.parse_arg(arg, positional="dataset", dataset="synthetic", runlocal=False, manual_dir="", seed=0)
  config = configlib.base_config(arg)

  config.dataset.captions = "metadata_prompt"
  config.model_name = "ccls2t"
  # CPU size: 80 px, half-width ResNet-18 over the image and its 40 px copy, a 2-layer d-128 text transformer (at
  # d 256 its ~13 GFLOP forward per batch of 33-token prompts rivals the ResNet's ~15; d 128 makes it a quarter).
  config.model = dict(embed_dim=256, resnet_depth=18, resnet_width=32, scales=(1, 2), fusion_heads=4, text_width=128,
                      text_depth=2, text_heads=4, max_text_len=64, text_dropout=0.1, hash_bits=64, spacetime=True,
                      spacetime_dim=fields.SPACETIME_DIM)
  config.loss_name = "ccls2t"
  config.loss = dict(mid_weight=0.5, hash_loss="contrastive", hash_positives="scene", hash_weight=1.0,
                     quantization_weight=0.1, balance_weight=0.1, spacetime_weight=1.0, impl="global", block_size=0)
  config.optimizer = dict(name="adamw", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip_norm=1.0)
  config.schedule = dict(name="warmup_step_decay", warmup_epochs=1, decay_every_epochs=13, decay_factor=0.1)
  config.total_epochs = 18  # 15 steps an epoch: one metadata prompt per image
  config.evals.val.every_epochs = config.evals.val_gallery.every_epochs = 3.0
  # CBRSIR with the hash codes (benchmarks/hash_retrieval.py's exhaustive Hamming row): test images query the train
  # images, relevant = same scene class (Sydney-Captions has no scene labels).
  config.evals.hash = dict(type="hash_retrieval", split=config.dataset.test_split,
                           gallery_split=config.dataset.train_split, ks=(10, 50), at="end",
                           enabled=arg.dataset != "sydney")

  if arg.dataset in REAL_DATASETS:
    config.dataset.captions = "captions"
    config.model = dict(embed_dim=512, resnet_depth=18, resnet_width=64, scales=(1, 2), fusion_heads=8,
                        text_width=512, text_depth=4, text_heads=8, max_text_len=64, text_dropout=0.1, hash_bits=64,
                        spacetime=False)
    config.loss.hash_positives = "image"
    config.optimizer.lr = 2e-4
    config.schedule = dict(name="warmup_step_decay", warmup_epochs=2, decay_every_epochs=20, decay_factor=0.1)
    config.total_epochs = 30
    config.evals.val.every_epochs = config.evals.val_gallery.every_epochs = 1.0
  if arg.runlocal:
    configlib.shrink_for_runlocal(config)
    config.model = dict(config.model.to_dict(), embed_dim=32, resnet_width=8, fusion_heads=2, text_width=32,
                        text_depth=2, text_heads=2, hash_bits=16)
  return config
