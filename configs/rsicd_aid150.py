"""Real-data runs on rsicd_aid150 (RSICD's captions on the matching AID scenes, 150 px) sized for a 2-core CPU.

  python -m rsalign_jax.main --config=configs/rsicd_aid150.py:hvsa_pretrained --workdir=DIR
  python -m rsalign_jax.main --config=configs/rsicd_aid150.py:floor,seed=1 --workdir=DIR
Arg: one row of the README's "Results on real data" tables (ROWS), `seed=N`, `manual_dir=PATH` (default
../shared/data/rsicd_aid150 beside the repository), `data_dir=PATH` (where the tfds build goes; default
~/tensorflow_datasets/rsicd_aid150, apart from a real RSICD build), `epochs=N` (default per row), `views=N` (rows
with a frozen tower: train on its cached trunk outputs (N dihedral views per image, `rsalign_jax.trunk_cache`;
0 recomputes the towers every step; default per row), `image_size=N` (the model's input size; default the images'
own 150 px).

Protocol (the papers'): train/val are the re-split of the RSICD train images (`train_papers`/`val_papers`), the
test split is the official one; the best-by-val-rsum checkpoint is tested. Ours, for the CPU budget: images stay at
their 150 px (HVSA's augmentation scaled: resize 163, rotate U[0, 90] deg, crop 150), each epoch draws one of an
image's captions (`input.sampling='per_image'`), batch 128, AdamW with 1 warm-up epoch and x0.1 for the last
epoch, fine-tuning at lr 1e-4 and linear heads (frozen towers) at 1e-3; HVSA's loss with fixed equal weights
(its learned weighting collapses on short schedules, see configs/hvsa.py).
"""
import os

from rsalign_jax import configlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# EfficientNet-Lite0's stem and its first five stages (blocks 0-10; the last two stages, blocks 11-15, work at 5x5 px).
LITE0_EARLY_STAGES = "model/image_encoder/(conv_stem|bn0|blocks_([0-9]|10))/.*"
# row -> (method config, its arg, epochs, lr[, dict(optimizer=overrides, views=trunk cache views)])
ROWS = {
    # The floor every method must clear: both pretrained towers frozen, only linear heads trained (InfoNCE).
    "floor": ("clip", "image_tower=lite0,text_tower=bert,init=minilm,frozen=image+text", 5, 1e-3),
    # Frozen trunks computed once (8 dihedral views per training image, `rsalign_jax.trunk_cache`): the floor at 30
    # epochs, and MLP projection heads (hidden 2048, dropout 0.5) on the same frozen features, EfficientNet-Lite0's
    # map pooled by average and max, at 50 epochs.
    "floor_cached": ("clip", "image_tower=lite0,text_tower=bert,init=minilm,frozen=image+text", 30, 1e-3,
                     dict(views=8)),
    "mlp_heads": ("clip", "image_tower=lite0,text_tower=bert,init=minilm,frozen=image+text,image_pool=mean_max,"
                          "projection_hidden=2048,projection_dropout=0.5", 50, 1e-3, dict(views=8)),
    "clip_pretrained": ("clip", "image_tower=lite0,text_tower=bert,init=minilm", 4, 1e-4),
    # The floor plus EfficientNet-Lite0's last two stages fine-tuned at 0.1x the heads' lr (about 2x the floor's
    # step time: autodiff stops at block 11).
    "clip_top_stages": ("clip", "image_tower=lite0,text_tower=bert,init=minilm,frozen=text", 5, 1e-3,
                        dict(optimizer=dict(frozen=(LITE0_EARLY_STAGES,),
                                            lr_mults=(("model/image_encoder/.*", 0.1),)))),
    # The ablation on frozen pretrained trunks (the floor's budget): HVSA's heads (KEA over Lite0's last map, a
    # ReLU(Linear) over MiniLM's sentence) with HVSA's loss, plain VSE++ or InfoNCE; a GRU trained from scratch in
    # place of MiniLM; a ResNet-18 trained from scratch in place of Lite0.
    "hvsa_frozen": ("hvsa", "image_backbone=lite0,text_encoder=minilm,frozen=image+text", 5, 1e-3),
    "hvsa_frozen_vsepp": ("hvsa", "image_backbone=lite0,text_encoder=minilm,frozen=image+text,loss=vsepp", 5, 1e-3),
    "hvsa_frozen_infonce": ("hvsa", "image_backbone=lite0,text_encoder=minilm,frozen=image+text,loss=infonce", 5,
                            1e-3),
    "hvsa_frozen_image_gru": ("hvsa", "image_backbone=lite0,frozen=image", 5, 1e-3),
    "hvsa_scratch_image_frozen_text": ("hvsa", "text_encoder=minilm,frozen=text", 5, 1e-3),
    "hvsa_pretrained": ("hvsa", "image_backbone=lite0,text_encoder=minilm", 4, 1e-4),
    "hvsa_pretrained_vsepp": ("hvsa", "image_backbone=lite0,text_encoder=minilm,loss=vsepp", 4, 1e-4),
    "hvsa_pretrained_infonce": ("hvsa", "image_backbone=lite0,text_encoder=minilm,loss=infonce", 4, 1e-4),
    "hvsa_pretrained_gru": ("hvsa", "image_backbone=lite0", 4, 1e-4),
    "hvsa_scratch_minilm": ("hvsa", "text_encoder=minilm", 4, 1e-4),
}


def get_config(arg=None):
  arg = configlib.parse_arg(arg, positional="row", row="hvsa_pretrained", seed=0, epochs=0, views=-1, image_size=150,
                            manual_dir=os.path.join(os.path.dirname(REPO), "shared", "data", "rsicd_aid150"),
                            data_dir=os.path.join("~", "tensorflow_datasets", "rsicd_aid150"))
  if arg.row not in ROWS:
    raise ValueError(f"config arg row {arg.row!r}: expected one of {sorted(ROWS)}")
  method, method_arg, epochs, lr, *extras = ROWS[arg.row]
  extras = extras[0] if extras else {}
  config = load_method_config(method, f"rsicd,{method_arg},seed={arg.seed},image_size={arg.image_size},"
                                      f"manual_dir={arg.manual_dir},data_dir={os.path.expanduser(arg.data_dir)}")
  config.input.batch_size = 128
  config.input.sampling = "per_image"
  config.total_epochs = arg.epochs or epochs
  config.optimizer.lr = lr
  for name, value in extras.get("optimizer", {}).items():
    config.optimizer[name] = config.optimizer.get(name, ()) + value
  config.trunk_cache.views = extras.get("views", 0) if arg.views < 0 else arg.views
  config.schedule = dict(name="warmup_step_decay", warmup_epochs=1, decay_every_epochs=config.total_epochs,
                         decay_factor=0.1)
  config.checkpoint_every_steps = 200
  if config.loss_name == "hvsa":
    config.loss.auto_weighting = False  # the paper's learned weighting collapses on short schedules (configs/hvsa.py)
  return config


def load_method_config(name, arg):
  return configlib.load_module(os.path.join(REPO, "configs", f"{name}.py")).get_config(arg)
