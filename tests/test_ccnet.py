"""CCNet (our interpretation): TAM, CFM and the pairwise score against a numpy reference, chunking, the
distinction loss (incl. unlabelled scene -1 rows) against numpy, the config and a runlocal trainer run."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_consistent_results, config_module, load_config, runlocal_config
from rsalign_jax import train
from rsalign_jax.losses import ccnet as ccnet_loss
from rsalign_jax.losses import contrastive
from rsalign_jax.losses import labels as labels_lib
from rsalign_jax.models import ccnet
from rsalign_jax.models import skipthoughts

DIM = 6
HYPER = dict(top_k=3, pool_temperature=0.3, cooccurrence_temperature=0.5, alpha=0.7, score_lambda=0.4)
TINY = dict(vocab_size=9, embed_dim=DIM, attention_dim=4, mlp_dim=5, resnet_width=8, word_dim=5, hidden_dim=7,
            **HYPER)


# ---------------------------------------------------------------- numpy reference (one pair at a time, explicit)


def _unit(x):
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.maximum(norm, 1e-12)


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def numpy_pair_score(regions, image_global, words, text_global, p, *, top_k, pool_temperature,
                     cooccurrence_temperature, alpha, score_lambda):
  """CCNet's S for one image (N, d) + (d,) and one caption's real words (L, d) + (d,); p: the Model's params."""
  dense = lambda x, name: x @ p[name]["kernel"] + p[name]["bias"]  # noqa: E731
  # TAM
  q, k, val = dense(words, "query"), dense(regions, "key"), dense(regions, "value")
  attention = np.stack([_softmax(q[i] @ k.T / np.sqrt(q.shape[1])) for i in range(len(words))])
  relevance = attention.max(axis=0)
  kept = np.argsort(-relevance)[:top_k]
  weights = _softmax(relevance[kept] / pool_temperature)
  pooled = (weights[:, None] * val[kept]).sum(axis=0)
  hidden = np.maximum(pooled @ p["mlp_hidden_kernel"] + p["mlp_hidden_bias"], 0)
  visual = _unit(image_global + hidden @ p["mlp_out_kernel"] + p["mlp_out_bias"])
  tam = visual @ _unit(text_global)
  # CFM
  w, v = _unit(words), _unit(regions)
  num_words, num_regions = len(w), len(v)
  joint = np.exp((w @ v.T) / cooccurrence_temperature)
  joint /= joint.sum()
  p_w, p_v = joint.sum(axis=1), joint.sum(axis=0)
  w_new = np.stack([w[i] + alpha * num_words * p_w[i] * ((joint[i] / p_w[i]) @ v) for i in range(num_words)])
  v_new = np.stack([v[j] + alpha * num_regions * p_v[j] * ((joint[:, j] / p_v[j]) @ w)
                    for j in range(num_regions)])
  cfm = np.mean((_unit(w_new) @ _unit(v_new).T).max(axis=1))
  return score_lambda * tam + (1 - score_lambda) * cfm


def numpy_scores(image_embedding, text_embedding, params, hyper):
  regions, image_global = (np.asarray(x, np.float64) for x in ccnet.unpack_images(image_embedding, DIM))
  words, mask, text_global = (np.asarray(x) for x in ccnet.unpack_texts(text_embedding, DIM))
  params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  return np.array([[numpy_pair_score(regions[a], image_global[a], words[b][mask[b]].astype(np.float64),
                                     text_global[b], params, **hyper)
                    for b in range(len(words))] for a in range(len(regions))])


# ---------------------------------------------------------------- fixtures


def _random_params(model, seed):
  """Model params with every leaf replaced by N(0, 0.5) noise, so the reference does not depend on the init."""
  images, tokens, lengths = _inputs(2, 2)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, tokens, lengths, train=False))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda x: (0.5 * rng.normal(size=x.shape)).astype(np.float32), shapes["params"])
  stats = jax.tree.map(lambda x: np.ones(x.shape, np.float32), shapes["batch_stats"])
  return {"params": params, "batch_stats": stats}


def _inputs(num_images, num_captions, seed=0, max_len=5):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(num_images, 64, 64, 3)).astype(np.float32)  # 2 x 2 = 4 regions
  lengths = rng.integers(0, max_len + 1, size=num_captions).astype(np.int32)
  lengths[0] = max_len
  tokens = rng.integers(1, 10, size=(num_captions, max_len)).astype(np.int32)
  tokens = np.where(np.arange(max_len)[None] < lengths[:, None], tokens, 0)
  return images, tokens, lengths


def _random_embeddings(num_images, num_captions, regions=5, max_len=4, seed=0):
  rng = np.random.default_rng(seed)
  image_embedding = rng.normal(size=(num_images, (regions + 1) * DIM)).astype(np.float32)
  lengths = rng.integers(1, max_len + 1, size=num_captions)
  mask = np.arange(max_len)[None] < lengths[:, None]
  words = rng.normal(size=(num_captions, max_len, DIM)).astype(np.float32)
  text_embedding = np.asarray(ccnet.pack_texts(words * mask[..., None], mask, rng.normal(size=(num_captions, DIM))))
  return jnp.asarray(image_embedding), jnp.asarray(text_embedding)


@pytest.fixture(scope="module")
def model_and_variables():
  model = ccnet.Model(**TINY)
  return model, _random_params(model, seed=1)


# ---------------------------------------------------------------- model


def test_pack_unpack_round_trip_and_width_errors():
  rng = np.random.default_rng(0)
  regions, glob = rng.normal(size=(3, 4, DIM)), rng.normal(size=(3, DIM))
  got_regions, got_global = ccnet.unpack_images(ccnet.pack_images(regions, glob), DIM)
  np.testing.assert_allclose(got_regions, regions, rtol=1e-6)
  np.testing.assert_allclose(got_global, glob, rtol=1e-6)
  words, mask = rng.normal(size=(3, 5, DIM)), np.arange(5)[None] < np.array([[1], [5], [3]])
  got_words, got_mask, got_global = ccnet.unpack_texts(ccnet.pack_texts(words, mask, glob), DIM)
  np.testing.assert_allclose(got_words, words, rtol=1e-6)
  np.testing.assert_array_equal(got_mask, mask)
  with pytest.raises(ValueError, match=r"image embeddings have width 13; expected \(regions \+ 1\)"):
    ccnet.unpack_images(jnp.zeros((2, 13)), DIM)
  with pytest.raises(ValueError, match="text embeddings have width 14; expected max_len"):
    ccnet.unpack_texts(jnp.zeros((2, 14)), DIM)


def test_score_equals_numpy_reference(model_and_variables):
  """TAM (attention, relevance, top-k filter, pool, MLP) + CFM (co-occurrence, reinforcement, S_f) + the mix."""
  model, variables = model_and_variables
  image_embedding, text_embedding = _random_embeddings(3, 4)
  got = model.apply(variables, image_embedding, text_embedding, method="score")
  want = numpy_scores(image_embedding, text_embedding, variables["params"], HYPER)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("part, hyper", [("tam", dict(score_lambda=1.0)), ("cfm", dict(score_lambda=0.0)),
                                         ("no filter", dict(top_k=5)), ("no reinforcement", dict(alpha=0.0))])
def test_each_part_equals_numpy_reference(model_and_variables, part, hyper):
  del part
  model, variables = model_and_variables
  hyper = {**HYPER, **hyper}
  image_embedding, text_embedding = _random_embeddings(2, 3, seed=2)
  got = ccnet.Model(**{**TINY, **hyper}).apply(variables, image_embedding, text_embedding, method="score")
  want = numpy_scores(image_embedding, text_embedding, variables["params"], hyper)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_top_k_filter_changes_the_score(model_and_variables):
  _, variables = model_and_variables
  image_embedding, text_embedding = _random_embeddings(2, 3, seed=3)
  filtered, unfiltered = (ccnet.Model(**{**TINY, "top_k": k, "score_lambda": 1.0}).apply(
      variables, image_embedding, text_embedding, method="score") for k in (1, 5))
  assert np.abs(np.asarray(filtered) - np.asarray(unfiltered)).min() > 1e-4


def test_chunked_score_of_7_by_11_equals_one_block(model_and_variables):
  _, variables = model_and_variables
  image_embedding, text_embedding = _random_embeddings(7, 11, seed=4)
  whole = ccnet.Model(**TINY, image_chunk=64, text_chunk=64).apply(
      variables, image_embedding, text_embedding, method="score")
  assert whole.shape == (7, 11)
  np.testing.assert_allclose(whole, numpy_scores(image_embedding, text_embedding, variables["params"], HYPER),
                             rtol=1e-5, atol=1e-5)
  for image_chunk, text_chunk in ((3, 4), (2, 5), (7, 1)):
    chunked = ccnet.Model(**TINY, image_chunk=image_chunk, text_chunk=text_chunk).apply(
        variables, image_embedding, text_embedding, method="score")
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)


def test_chunked_pairwise_pads_and_crops():
  images, texts = jnp.arange(7.0), {"t": jnp.arange(11.0) * 100}
  got = ccnet.chunked_pairwise(lambda a, b: a[:, None] + b["t"][None, :], images, texts, 3, 4)
  np.testing.assert_array_equal(got, np.arange(7.0)[:, None] + np.arange(11.0)[None, :] * 100)


def test_call_returns_batch_scores_and_global_embeddings(model_and_variables):
  model, variables = model_and_variables
  images, tokens, lengths = _inputs(4, 4, seed=5)
  out = model.apply(variables, images, tokens, lengths, train=False)
  image_embedding = model.apply(variables, images, train=False, method="embed_images")
  text_embedding = model.apply(variables, tokens, lengths, train=False, method="embed_texts")
  assert image_embedding.shape == (4, (4 + 1) * DIM) and text_embedding.shape == (4, 5 * (DIM + 1) + DIM)
  np.testing.assert_allclose(out["scores"], model.apply(variables, image_embedding, text_embedding,
                                                        method="score"), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out["image_embedding"], image_embedding[:, -DIM:], rtol=1e-6)
  np.testing.assert_allclose(out["text_embedding"], text_embedding[:, -DIM:], rtol=1e-6)
  _, mask, _ = ccnet.unpack_texts(text_embedding, DIM)
  np.testing.assert_array_equal(mask, np.arange(5)[None] < np.maximum(lengths, 1)[:, None])


def test_skipthoughts_all_states_ends_in_the_sentence_vector():
  gru = skipthoughts.BayesianUniSkip(9, 5, 7)
  _, tokens, lengths = _inputs(1, 4, seed=6)
  variables = gru.init(jax.random.key(0), tokens, lengths, train=False)
  states = gru.apply(variables, tokens, lengths, train=False, all_states=True)
  assert states.shape == (4, 5, 7)
  last = np.maximum(lengths, 1) - 1
  np.testing.assert_array_equal(states[np.arange(4), last], gru.apply(variables, tokens, lengths, train=False))


def test_score_memory_for_1024_images_by_5000_captions_is_bounded():
  """The CPU default config's scorer, compiled (not run) for the evaluator's largest chunk: XLA's temp buffers."""
  model_config = load_config("ccnet").model.to_dict()
  model = ccnet.Model(vocab_size=100, **model_config)
  d, length = model_config["embed_dim"], 32
  images = jax.ShapeDtypeStruct((1024, 10 * d), jnp.float32)
  texts = jax.ShapeDtypeStruct((5000, length * (d + 1) + d), jnp.float32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 80, 80, 3)),
                                             jnp.ones((2, length), jnp.int32), jnp.ones((2,), jnp.int32),
                                             train=False))
  compiled = jax.jit(lambda v, a, b: model.apply(v, a, b, method="score")).lower(params, images, texts).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < 400 * 2**20


# ---------------------------------------------------------------- loss


def numpy_infonce(scores, ids, scale):
  logits = scale * scores
  positives = ids[:, None] == ids[None, :]

  def direction(l):
    return np.mean([np.log(np.exp(row).sum()) - row[pos].mean() for row, pos in zip(l, positives)])

  return 0.5 * (direction(logits) + direction(logits.T))


def numpy_affiliation(images, texts, labels, scale):
  labelled = labels >= 0
  classes = sorted(set(labels[labelled]))
  centres = {m: {k: _unit(x)[labels == k].mean(axis=0) for k in classes} for m, x in (("img", images),
                                                                                        ("txt", texts))}

  def term(x, other):
    losses = []
    for row, y in zip(_unit(x)[labelled], labels[labelled]):
      logits = np.array([scale * row @ _unit(centres[other][k]) for k in classes])
      losses.append(-(logits[classes.index(y)] - np.log(np.exp(logits).sum())))
    return np.mean(losses)

  return 0.5 * (term(images, "txt") + term(texts, "img"))


def test_infonce_of_a_score_matrix_equals_numpy_with_repeated_image_ids():
  rng = np.random.default_rng(0)
  scores, ids = rng.uniform(-1, 1, size=(6, 6)), np.array([3, 1, 3, 2, 1, 3])
  got = contrastive.logits_loss(jnp.asarray(scores / 0.07), jnp.asarray(ids))
  np.testing.assert_allclose(got, numpy_infonce(scores, ids, 1 / 0.07), rtol=1e-5)


def test_class_affiliation_leaves_out_scene_minus_one_rows():
  rng = np.random.default_rng(1)
  images, texts = rng.normal(size=(7, 4)), rng.normal(size=(7, 4))
  labels = np.array([0, 2, -1, 2, 0, -1, 4])
  loss = lambda i, t, y: labels_lib.class_affiliation_loss(  # noqa: E731
      jnp.asarray(i), jnp.asarray(t), jnp.asarray(y), num_classes=5, log_scale=np.log(10.0))
  np.testing.assert_allclose(loss(images, texts, labels), numpy_affiliation(images, texts, labels, 10.0), rtol=1e-5)
  unlabelled = labels < 0
  grad_images, grad_texts = jax.grad(loss, argnums=(0, 1))(images, texts, labels)
  assert np.all(np.asarray(grad_images)[unlabelled] == 0) and np.all(np.asarray(grad_texts)[unlabelled] == 0)
  assert np.abs(np.asarray(grad_images)[~unlabelled]).sum() > 0
  none = np.full(7, -1)
  assert float(loss(images, texts, none)) == 0.0
  assert all(np.all(np.isfinite(g)) for g in jax.grad(loss, argnums=(0, 1))(images, texts, none))


def test_objective_combines_itc_and_class_term():
  rng = np.random.default_rng(2)
  outputs = {"scores": jnp.asarray(rng.uniform(-1, 1, (6, 6)), jnp.float32),
             "image_embedding": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
             "text_embedding": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}
  ids, scene = np.array([0, 1, 0, 2, 3, 1]), np.array([1, 0, 1, -1, 1, 0])
  batch = {"image_id": jnp.asarray(ids), "scene": jnp.asarray(scene)}
  objective = ccnet_loss.Objective(num_classes=3, class_weight=0.5)
  variables = objective.init(jax.random.key(0), outputs, batch)
  np.testing.assert_allclose(variables["params"]["log_scale"], np.log(1 / 0.07), rtol=1e-6)
  loss, metrics = objective.apply(variables, outputs, batch)
  itc = numpy_infonce(np.asarray(outputs["scores"]), ids, 1 / 0.07)
  cls = numpy_affiliation(np.asarray(outputs["image_embedding"]), np.asarray(outputs["text_embedding"]), scene,
                          1 / 0.07)
  np.testing.assert_allclose([metrics["itc"], metrics["cls"], loss], [itc, cls, itc + 0.5 * cls], rtol=1e-5)
  assert objective.batch_fields == ("scene",)
  without = ccnet_loss.Objective(num_classes=0, class_weight=0.0)
  loss, metrics = without.apply(variables, outputs, {"image_id": batch["image_id"]})
  np.testing.assert_allclose(loss, itc, rtol=1e-5)
  assert "cls" not in metrics and without.batch_fields == ()


# ---------------------------------------------------------------- config and trainer


def test_config_class_counts_match_the_dataset_builders():
  from rsalign_jax.data import rsicd, rsitmd, ucm_captions
  from rsalign_jax.data.synthetic_rs import SCENE_CLASSES
  module = config_module("ccnet")
  assert module.NUM_CLASSES == {"synthetic": len(SCENE_CLASSES), "rsicd": len(rsicd.SCENE_CLASSES),
                                "rsitmd": len(rsitmd.SCENE_CLASSES), "ucm": len(ucm_captions.SCENE_CLASSES),
                                "sydney": 0}
  for dataset in ("synthetic", "rsicd", "rsitmd", "ucm"):
    config = module.get_config(dataset)
    assert config.loss.num_classes == module.NUM_CLASSES[dataset] and config.loss.class_weight > 0
  sydney = module.get_config("sydney")
  assert sydney.loss.class_weight == 0.0


def test_runlocal_trains_and_writes_results(tmp_path_factory):
  assert jax.device_count() == 8
  config = runlocal_config(tmp_path_factory, "ccnet")
  workdir = tmp_path_factory.mktemp("ccnet")
  results = train.train_and_evaluate(config, str(workdir))
  written = json.loads((workdir / "results.json").read_text())
  assert written["test"] == results["test"] and written["total_steps"] == 4
  assert written["random_init"] is not None
  assert_consistent_results(written)
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert any("train/cls" in row for row in metrics)
