"""Heads trained on frozen, cached pretrained trunks, on any dataset the project reads: the real-data recipe and the
large-batch study (README "Results on real data", "Large-batch experiments").

  python -m rsalign_jax.main --config=configs/frozen_trunks.py:rsicd,manual_dir=PATH,data_dir=DIR --workdir=W
  python -m rsalign_jax.main --config=configs/frozen_trunks.py:ucm,manual_dir=PATH --workdir=W
  python -m rsalign_jax.main --config=configs/frozen_trunks.py:rsicd,manual_dir=PATH,batch=8192,loss=sigmoid,\
sampling=per_caption,epochs=10 --workdir=W
  python -m rsalign_jax.main --config=configs/frozen_trunks.py:rsicd,manual_dir=PATH,finetune=text,init_from=W,\
lr=1e-4,epochs=5 --workdir=W_FT

The model is `configs/clip.py`'s dual encoder on ImageNet EfficientNet-Lite (`image_tower`, default lite0) and
all-MiniLM-L6-v2, both frozen; their trunk outputs are computed once (`trunk_cache`: `views` dihedral views per
training image) and MLP heads (2048 hidden, GELU, dropout 0.5) over the image map pooled by average and max and over
the mean-pooled sentence are trained with the softmax (InfoNCE) or sigmoid loss. The dataset's own splits are used
(its `train_split`, `val_split`, `test_split`); the best checkpoint by validation rsum is tested.

Arg: the dataset (`rsicd`, `rsitmd`, `ucm`, `sydney`, `synthetic`), `manual_dir=PATH`, `data_dir=PATH`, `seed=N`,
`image_tower=lite0|lite2`, `image_size=N` (default 224, Lite0's training resolution), `views=N` (8), `epochs=N` (50),
`batch=N` (128), `lr=X` (1e-3; `lr_scaling=sqrt` multiplies it by sqrt(batch / 128); AdamW as configs/clip.py's,
one warm-up epoch, x0.1 for the last), `sampling=per_image|per_caption` (one caption of each image per epoch, or
every caption; same-image captions in a batch are all positives), `loss=softmax|sigmoid`, `block_size=N` (the loss
in column blocks of N, `loss.impl=ring`; 0: the whole (B, B) matrix at once), `qbnorm=BETA` (default 10, chosen on
rsicd_aid150's validation split; > 0 adds `val_qbnorm` and `test_qbnorm` end entries: querybank-normalised metrics
with the training split as the banks, `evaluation/evaluators/querybank.py`; 0: none), `finetune=text|image|image+text`
(those towers trained end to end at `finetune_lr_mult` (0.2) times the heads' lr, the others still frozen and
cached), `init_from=WORKDIR` (start from that trained run's heads and temperature, `rsalign_jax/weights/trained.py`:
fine-tuning a tower under converged heads, linear probing then fine-tuning), `eval_views=N` (1; test-time
augmentation: each evaluated image scores the mean over its first N dihedral views, read from the trunk cache).
"""
import os

from rsalign_jax import configlib

LR_SCALINGS = ("none", "sqrt")
SAMPLINGS = ("per_image", "per_caption")
LOSSES = ("softmax", "sigmoid")
REFERENCE_BATCH = 128


def get_config(arg=None):
  arg = configlib.parse_arg(arg, positional="dataset", dataset="synthetic", manual_dir="", data_dir="", seed=0,
                            image_tower="lite0", image_size=224, views=8, epochs=50, batch=128, lr=1e-3,
                            lr_scaling="none", sampling="per_image", loss="softmax", block_size=0, qbnorm=10.0,
                            finetune="", finetune_lr_mult=0.2, init_from="", eval_views=1)
  for name, value, allowed in (("sampling", arg.sampling, SAMPLINGS), ("loss", arg.loss, LOSSES),
                               ("lr_scaling", arg.lr_scaling, LR_SCALINGS)):
    if value not in allowed:
      raise ValueError(f"config arg {name}={value!r}: expected one of {allowed}")
  clip = _clip_module()
  finetuned = tuple(filter(None, arg.finetune.split("+")))
  if set(finetuned) - set(clip.FROZEN_PARAMS):
    raise ValueError(f"config arg finetune={arg.finetune!r}: expected '+'-joined towers of "
                     f"{sorted(clip.FROZEN_PARAMS)}")
  frozen = "+".join(tower for tower in clip.FROZEN_PARAMS if tower not in finetuned)
  config = clip.get_config(f"{arg.dataset},image_tower={arg.image_tower},text_tower=bert,init=minilm,"
                           f"frozen={frozen},image_pool=mean_max,projection_hidden=2048,projection_dropout=0.5,"
                           f"seed={arg.seed},image_size={arg.image_size},manual_dir={arg.manual_dir},"
                           f"data_dir={arg.data_dir},siglip={arg.loss == 'sigmoid'}")
  config.trunk_cache.views = arg.views if frozen else 0
  config.optimizer.lr_mults = tuple((clip.FROZEN_PARAMS[tower], arg.finetune_lr_mult) for tower in finetuned)
  if arg.init_from:
    config.init.trained_model = dict(format="trained.load", checkpoint=arg.init_from, into="params/model",
                                     subtree="model")
    config.init.trained_objective = dict(format="trained.load", checkpoint=arg.init_from, into="params/objective",
                                         subtree="objective")
  config.input.batch_size = arg.batch
  config.input.sampling = arg.sampling
  config.total_epochs = arg.epochs
  scale = (arg.batch / REFERENCE_BATCH) ** 0.5 if arg.lr_scaling == "sqrt" else 1.0
  config.optimizer.lr = arg.lr * scale
  config.schedule = dict(name="warmup_step_decay", warmup_epochs=1, decay_every_epochs=arg.epochs, decay_factor=0.1)
  if arg.block_size:
    config.loss.impl, config.loss.block_size = "ring", arg.block_size
  config.checkpoint_every_steps = 200
  config.eval_views = arg.eval_views
  if arg.qbnorm > 0:
    for name in ("val", "test"):
      config.evals[f"{name}_qbnorm"] = dict(type="querybank", split=config.evals[name].split, at="end",
                                            beta=arg.qbnorm, enabled=True)
  return config


def _clip_module():
  return configlib.load_module(os.path.join(os.path.dirname(__file__), "clip.py"))
