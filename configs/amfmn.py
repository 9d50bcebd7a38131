"""AMFMN (Yuan et al., TGRS 2021) as its released code trains it (docs/METHODS.md §3).

  python -m rsalign_jax.main --config=configs/amfmn.py --workdir=DIR                 # synthetic benchmark, CPU size
  python -m rsalign_jax.main --config=configs/amfmn.py:runlocal --workdir=DIR        # a seconds-long smoke run
  python -m rsalign_jax.main --config=configs/amfmn.py:rsitmd --workdir=DIR          # released-code hyperparameters
  python -m rsalign_jax.main --config=configs/amfmn.py:rsitmd,dynamic --workdir=DIR  # + the paper's dynamic margin
Arg options: a dataset (`synthetic`, `rsicd`, `rsitmd`, `ucm`, `sydney`), `dynamic` (the paper's L_ct margin,
gamma 0.6, beta 5, from a caption prior computed in the train step), `att=soft_att|fusion_att|similarity_att`,
`runlocal`, `manual_dir=PATH`, `seed=N`, `data_dir=PATH`, `image_size=N` (a multiple of 16: MVSA needs it) and
the towers of configlib.swap_towers: `image_backbone=resnet|lite0|lite2` (ImageNet EfficientNet-Lite),
`text_encoder=gru|minilm`, `frozen=image|text|image+text`.
The real-dataset args carry the released settings (docs/METHODS.md §3.5): 256 px, ResNet-18 width 64, GRU 620/2400,
embed 512, soft_att, Adam (no decay) at lr 1e-4 (RSICD) / 2e-4 (RSITMD; UCM and Sydney, which the code does not
configure, use it too), x0.7 at epochs 19, 39, 59, 70 epochs, batch 100 (a device count dividing 100: 1, 2, 4),
margin 0.2 summed over all negatives, resize 278 + random crop 256 (the reference's rotation is a no-op).
"""
from rsalign_jax import configlib

RELEASED_LR = {"rsicd": 1e-4, "rsitmd": 2e-4, "ucm": 2e-4, "sydney": 2e-4}


def amfmn_augmentation(size):
  """AMFMN's effective training augmentation scaled to `size`: resize to size*278/256, random crop (no rotation)."""
  return f"decode|resize({round(size * 278 / 256)})|random_crop({size})|normalize"


def get_config(arg=None):
  arg = configlib.parse_arg(arg, positional="dataset", dataset="synthetic", runlocal=False, manual_dir="", seed=0,
                            dynamic=False, att="soft_att", data_dir="", image_size=0, **configlib.TOWER_ARGS)
  config = configlib.base_config(arg)
  size = config.dataset.image_size
  config.input.pp_train = amfmn_augmentation(size)

  config.model_name = "amfmn"
  # CPU size: 80 px (a multiple of 16, which MVSA needs; f3 and L' are 5x5), half-width ResNet-18, small GRU.
  config.model = dict(embed_dim=256, resnet_width=32, mvsa_channels=3, att_type=arg.att, word_dim=128,
                      hidden_dim=256, text_dropout=0.25, score_chunk_elements=1 << 23)
  config.loss_name = "amfmn"
  config.loss = dict(margin="dynamic" if arg.dynamic else 0.2, max_violation=False, gamma=0.6, beta=5.0)
  config.optimizer = dict(name="adam", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0)
  config.schedule = dict(name="warmup_step_decay", warmup_epochs=0, decay_every_epochs=2, decay_factor=0.7)
  config.total_epochs = 6

  if arg.dataset in RELEASED_LR:
    config.model.update(embed_dim=512, resnet_width=64, word_dim=620, hidden_dim=2400)
    config.optimizer.lr = RELEASED_LR[arg.dataset]
    config.schedule.decay_every_epochs = 20
    config.total_epochs = 70
    config.input.batch_size = 100
  if arg.runlocal:
    configlib.shrink_for_runlocal(config)
    config.input.pp_train = amfmn_augmentation(min(size, 32))
    config.model.update(embed_dim=32, resnet_width=8, word_dim=16, hidden_dim=32)
  configlib.swap_towers(config, arg)
  return config
