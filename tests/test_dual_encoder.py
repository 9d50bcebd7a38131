"""CLIP/SigLIP dual encoder: towers, pooling, the objective against numpy, configs, and trainer smoke runs."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_consistent_results, load_config, runlocal_config
from rsalign_jax import experiment, train
from rsalign_jax.losses import clip as clip_loss
from rsalign_jax.models import dual_encoder, text_transformer, vit
from rsalign_jax.weights import common

VIT = dict(patch_size=8, width=16, depth=1, heads=2, mlp_dim=32, pool="cls", activation="gelu")
TEXT = dict(width=16, depth=2, heads=2, mlp_dim=32, max_len=8)
BERT = dict(hidden=16, layers=1, heads=2, intermediate=32, max_position=16)


def batch(rows=4, size=16, t=8, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(rows, size, size, 3)).astype(np.float32)
  lengths = rng.integers(1, t + 1, rows)
  tokens = np.where(np.arange(t)[None] < lengths[:, None], rng.integers(1, 30, (rows, t)), 0).astype(np.int32)
  return jnp.asarray(images), jnp.asarray(tokens), jnp.asarray(lengths)


@pytest.mark.parametrize("image_tower, image, text_tower, text, pool, dtype", [
    ("vit", VIT, "transformer", TEXT, "last", jnp.bfloat16),
    ("resnet", dict(depth=18, width=4), "bert", BERT, "mean", jnp.float32),  # bf16 convs compile slowly on CPU
    ("vit", dict(VIT, pool="map"), "bert", BERT, "cls", jnp.float32),
])
def test_towers_give_float32_embeddings_and_cosine_scores(image_tower, image, text_tower, text, pool, dtype):
  model = dual_encoder.Model(vocab_size=30, embed_dim=12, image_tower=image_tower, image=image,
                             text_tower=text_tower, text=text, text_pool=pool, dtype=dtype)
  images, tokens, lengths = batch(size=32 if image_tower == "resnet" else 16)
  variables = model.init(jax.random.key(0), images, tokens, lengths, train=False)
  out = model.apply(variables, images, tokens, lengths, train=False)
  assert out["image_embedding"].shape == (4, 12) and out["image_embedding"].dtype == jnp.float32
  assert out["text_embedding"].shape == (4, 12) and out["text_embedding"].dtype == jnp.float32
  a, b = np.asarray(out["image_embedding"], np.float64), np.asarray(out["text_embedding"], np.float64)
  want = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
  np.testing.assert_allclose(model.score(out["image_embedding"], out["text_embedding"]), want, atol=1e-5)
  assert set(variables["params"]) == {"image_encoder", "text_encoder", "image_projection", "text_projection"}
  assert hash(model) == hash(model.clone())  # config dicts are frozen: jit caches key on the module


def test_mlp_projection_matches_numpy_and_drops_out_only_in_training():
  model = dual_encoder.Model(vocab_size=30, embed_dim=6, image_tower="vit", image=VIT, text_tower="transformer",
                             text=TEXT, projection_hidden=10, projection_dropout=0.5)
  images, tokens, lengths = batch()
  variables = model.init(jax.random.key(0), images, tokens, lengths, train=False)
  head = variables["params"]["image_projection"]
  assert {k: v["kernel"].shape for k, v in head.items()} == {"hidden": (16, 10), "out": (10, 6)}
  features = np.asarray(model.apply(variables, images, method="image_trunk"), np.float64)
  hidden = features @ head["hidden"]["kernel"] + head["hidden"]["bias"]
  gelu = 0.5 * hidden * (1 + np.tanh(np.sqrt(2 / np.pi) * (hidden + 0.044715 * hidden ** 3)))
  want = gelu @ head["out"]["kernel"] + head["out"]["bias"]
  got = model.apply(variables, images, train=False, method="embed_images")
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  trained = [model.apply(variables, images, train=True, method="embed_images", rngs={"dropout": jax.random.key(k)})
             for k in (1, 2)]
  assert not np.allclose(trained[0], trained[1]) and not np.allclose(trained[0], got)


def test_image_pool_mean_max_concatenates_average_and_max_of_the_map():
  maps = np.random.default_rng(0).normal(size=(2, 3, 3, 4)).astype(np.float32)
  np.testing.assert_allclose(dual_encoder.pool_map(maps, "mean"), maps.mean(axis=(1, 2)), rtol=1e-6)
  np.testing.assert_allclose(dual_encoder.pool_map(maps, "mean_max"),
                             np.concatenate([maps.mean(axis=(1, 2)), maps.max(axis=(1, 2))], -1), rtol=1e-6)
  model = dual_encoder.Model(vocab_size=30, embed_dim=6, image_tower="resnet", image=dict(depth=18, width=4),
                             text_tower="transformer", text=TEXT, image_pool="mean_max")
  images, tokens, lengths = batch(size=64)
  variables = model.init(jax.random.key(0), images, tokens, lengths, train=False)
  assert variables["params"]["image_projection"]["kernel"].shape == (2 * 32, 6)  # ResNet-18 width 4: 32 channels
  with pytest.raises(ValueError, match=r"model.image_pool='max': expected one of \('mean', 'mean_max'\)"):
    model.clone(image_pool="max").init(jax.random.key(0), images, tokens, lengths, train=False)


def test_causal_text_tower_ignores_everything_after_the_pooled_token():
  model = dual_encoder.Model(vocab_size=30, embed_dim=8, image=VIT, text=TEXT, text_pool="last")
  images, tokens, lengths = batch()
  params = model.init(jax.random.key(0), images, tokens, lengths, train=False)
  embed = lambda tok: model.apply(params, tok, lengths, train=False, method=model.embed_texts)
  after = np.arange(tokens.shape[1])[None] >= np.asarray(lengths)[:, None]
  changed_after = jnp.where(after, 7, tokens)
  np.testing.assert_allclose(embed(changed_after), embed(tokens), atol=1e-6)
  changed_first = tokens.at[:, 0].set(tokens[:, 0] % 29 + 1)
  assert np.all(np.abs(np.asarray(embed(changed_first) - embed(tokens))).max(axis=1) > 1e-4)


def test_pool_tokens_picks_argmax_or_last_real_position():
  hidden = jnp.arange(2 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 1)
  tokens = jnp.array([[5, 9, 2, 0], [3, 1, 4, 8]])
  lengths = jnp.array([3, 0])
  np.testing.assert_array_equal(text_transformer.pool_tokens(hidden, tokens, lengths, "argmax")[:, 0], [1, 7])
  np.testing.assert_array_equal(text_transformer.pool_tokens(hidden, tokens, lengths, "last")[:, 0], [2, 4])
  with pytest.raises(ValueError, match="text pool='cls'"):
    text_transformer.pool_tokens(hidden, tokens, lengths, "cls")


def test_bad_settings_fail_clearly():
  images, tokens, lengths = batch(size=12)
  with pytest.raises(ValueError, match="image size 12x12 is not a multiple of patch_size=8"):
    vit.ViT(**VIT).init(jax.random.key(0), images, train=False)
  with pytest.raises(ValueError, match="model.text_pool='mean': the 'transformer' tower pools with one of"):
    dual_encoder.Model(vocab_size=30, image=VIT, text=TEXT, text_pool="mean").init(
        jax.random.key(0), images, tokens, lengths, train=False)
  with pytest.raises(ValueError, match="8 tokens per caption but max_len=4"):
    text_transformer.TextTransformer(30, **dict(TEXT, max_len=4)).init(jax.random.key(0), tokens, train=False)


def numpy_softmax_loss(x, y, ids, scale):
  x, y = x / np.linalg.norm(x, axis=1, keepdims=True), y / np.linalg.norm(y, axis=1, keepdims=True)
  logits = scale * x @ y.T
  positive = ids[:, None] == ids[None, :]
  lse = lambda z, axis: np.log(np.exp(z).sum(axis))
  mean_pos = lambda axis: (logits * positive).sum(axis) / positive.sum(axis)
  return 0.5 * (np.mean(lse(logits, 1) - mean_pos(1)) + np.mean(lse(logits, 0) - mean_pos(0)))


def numpy_sigmoid_loss(x, y, ids, scale, bias):
  x, y = x / np.linalg.norm(x, axis=1, keepdims=True), y / np.linalg.norm(y, axis=1, keepdims=True)
  z = np.where(ids[:, None] == ids[None, :], 1.0, -1.0)
  return np.sum(np.log1p(np.exp(-z * (scale * x @ y.T + bias)))) / len(x)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_objective_matches_numpy_and_starts_from_the_papers_temperatures(kind):
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  ids = np.array([0, 0, 1, 2, 2, 2])
  outputs = {"image_embedding": jnp.asarray(x), "text_embedding": jnp.asarray(y)}
  objective = clip_loss.Objective(kind=kind)
  variables = objective.init(jax.random.key(0), outputs, {"image_id": jnp.asarray(ids)})
  loss, metrics = objective.apply(variables, outputs, {"image_id": jnp.asarray(ids)})
  if kind == "softmax":
    assert set(variables["params"]) == {"log_scale"}
    assert float(metrics["scale"]) == pytest.approx(1 / 0.07, rel=1e-6)
    want = numpy_softmax_loss(x, y, ids, 1 / 0.07)
  else:
    assert set(variables["params"]) == {"log_scale", "bias"}
    assert float(metrics["scale"]) == pytest.approx(10.0, rel=1e-6) and float(metrics["bias"]) == -10.0
    want = numpy_sigmoid_loss(x, y, ids, 10.0, -10.0)
  assert float(loss) == pytest.approx(want, rel=1e-5)


def test_softmax_scale_is_capped_at_100():
  outputs = {"image_embedding": jnp.eye(3), "text_embedding": jnp.eye(3)}
  objective = clip_loss.Objective(kind="softmax", log_scale_init=10.0)
  variables = objective.init(jax.random.key(0), outputs, {"image_id": jnp.arange(3)})
  _, metrics = objective.apply(variables, outputs, {"image_id": jnp.arange(3)})
  assert float(metrics["scale"]) == pytest.approx(100.0, rel=1e-6)


def test_configs_select_towers_and_losses():
  default = load_config("clip")
  assert default.model_name == "dual_encoder" and default.loss_name == "clip" and default.loss.kind == "softmax"
  assert default.model.image_tower == "resnet" and default.dataset.image_size == 80
  assert default.model.text.max_len == default.text.max_len and not default.init
  assert load_config("clip", "siglip").loss.kind == "sigmoid"
  vit_config = load_config("clip", "image_tower=vit")
  assert vit_config.model.image.patch_size == 10 and 80 % vit_config.model.image.patch_size == 0
  with pytest.raises(ValueError, match="image_tower='swin'"):
    load_config("clip", "image_tower=swin")


def test_bert_config_uses_wordpiece_and_imports_minilm():
  bert_weights = pytest.importorskip("rsalign_jax.weights.bert")
  try:
    minilm = bert_weights.minilm_dir()
  except FileNotFoundError:
    pytest.skip("all-MiniLM-L6-v2 is not installed")
  config = load_config("clip", "text_tower=bert,init=minilm")
  assert config.text.tokenizer == "wordpiece" and config.text.vocab_file == f"{minilm}/vocab.txt"
  assert config.model.text.hidden == 384 and config.model.text_pool == "mean"
  assert config.init.text.to_dict() == dict(format="bert.load", checkpoint=minilm, into="params/model/text_encoder")
  assert not load_config("clip", "text_tower=bert").init
  # What the trainer does with config.init: the text tower's leaves become MiniLM's, the rest stays as it was.
  model = experiment.build_model(config, vocab_size=30522)
  images, tokens, lengths = batch(rows=2, size=80)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, tokens, lengths, train=False))
  tree = {"params": {"model": variables["params"], "objective": {}}, "batch_stats": variables["batch_stats"]}
  new = common.init_params(tree, config.init)
  want = common.load_state_dict(minilm)["embeddings.word_embeddings.weight"]
  np.testing.assert_array_equal(new["params"]["model"]["text_encoder"]["word_embeddings"]["embedding"], want)
  assert new["params"]["model"]["image_projection"]["kernel"] is variables["params"]["image_projection"]["kernel"]


def test_trainer_smoke_siglip_vit(tmp_path_factory):
  # The default (CLIP loss, ResNet) trains in tests/test_modes.py's trained-model search test.
  config = runlocal_config(tmp_path_factory, "clip", "runlocal,siglip,image_tower=vit")
  workdir = tmp_path_factory.mktemp("clip")
  results = train.train_and_evaluate(config, str(workdir))
  written = json.loads((workdir / "results.json").read_text())
  assert written["test"] == results["test"] and written["total_steps"] == 4
  assert written["random_init"] is not None
  assert_consistent_results(written)
