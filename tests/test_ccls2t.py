"""CCLS2T: metadata prompts, spacetime features, towers, objective, hash index and metrics, and a trainer run."""
import importlib
import json
import math
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from helpers import assert_consistent_results, load_config
from rsalign_jax import train
from rsalign_jax.data import fields
from rsalign_jax.data import metadata_prompts
from rsalign_jax.data import sources
from rsalign_jax.serving import hash_index
from rsalign_jax.losses import ccls2t as ccls2t_loss
from rsalign_jax.models import ccls2t
from rsalign_jax.models import resnet

RECORD = {"sensor": b"WorldView-2", "gsd": 0.5, "date": b"2020-03-01", "lat": 30.0, "lon": -90.0, "scene": 1}
S3 = math.sqrt(3) / 2


# ---------------------------------------------------------------- prompts and spacetime features


def test_spacetime_features_match_hand_computed_values():
  expected = [0.5, S3, S3, -S3,  # sin(f * 30 deg), f = 1, 2, 4, 8
              S3, 0.5, -0.5, -0.5,  # cos(f * 30 deg)
              -1, 0, 0, 0,  # sin(f * -90 deg)
              0, -1, 1, 1,  # cos(f * -90 deg)
              math.sin(2 * math.pi * 60 / 366), math.cos(2 * math.pi * 60 / 366),  # 1 March of a leap year: day 61
              0.5, math.log10(0.5)]  # (2020 - 2015) / 10, log10 GSD
  value = fields.spacetime(RECORD, None)
  assert value.dtype == np.float32 and value.shape == (fields.SPACETIME_DIM,)
  np.testing.assert_allclose(value, expected, atol=1e-6)


def test_spacetime_and_prompts_name_missing_or_bad_metadata():
  with pytest.raises(ValueError, match=r"input field 'spacetime' needs .* the record has no 'gsd', 'lat'"):
    fields.spacetime({"sensor": b"x", "date": b"2020-01-01", "lon": 0.0}, None)
  with pytest.raises(ValueError, match="record 'date' '2020/01/01' is not a yyyy-mm-dd date"):
    fields.spacetime(dict(RECORD, date=b"2020/01/01"), None)


def test_prompt_text_of_known_records():
  names = ["airport", "sparse_residential"]
  assert metadata_prompts.format_prompt(RECORD, names) == (
      "an optical image from WorldView-2 with 0.50 m GSD, acquired on 2020-03-01 (spring), centred at 30.00, -90.00, "
      "scene: sparse residential.")
  south = dict(RECORD, date="2021-01-15", lat=-33.456, lon=151.2049, gsd=10.0)
  assert metadata_prompts.format_prompt(south) == (
      "an optical image from WorldView-2 with 10.00 m GSD, acquired on 2021-01-15 (summer), centred at -33.46, "
      "151.20.")
  seasons = [metadata_prompts.season(metadata_prompts.datetime.date(2020, m, 1), 10.0) for m in (12, 1, 3, 6, 9, 11)]
  assert seasons == ["winter", "winter", "spring", "summer", "autumn", "autumn"]


@pytest.fixture(scope="module")
def data_dir():
  with tempfile.TemporaryDirectory() as directory:
    yield directory


def test_open_split_serves_prompts_as_captions(data_dir):
  config = ml_collections.ConfigDict(dict(name="synthetic_rs/tiny", data_dir=data_dir, captions="metadata_prompt"))
  prompts = sources.open_split(config, "train")
  originals = sources.open_split(ml_collections.ConfigDict(dict(name="synthetic_rs/tiny", data_dir=data_dir)), "train")
  record, original = prompts[3], originals[3]
  names = tfds.builder("synthetic_rs/tiny", data_dir=data_dir).info.features["scene"].names
  assert record["captions"] == [metadata_prompts.format_prompt(original, names)]
  assert record["captions"][0].endswith(f"scene: {names[original['scene']].replace('_', ' ')}.")
  assert record["image"] == original["image"] and len(prompts) == len(originals) == 64
  index = sources.CaptionIndex.read(prompts)
  assert len(index.captions) == index.num_images == 64


def test_prompts_on_a_dataset_without_metadata_fail_clearly(tmp_path):
  importlib.import_module("rsalign_jax.data.rsicd")  # registers the builder
  features = tfds.builder("rsicd", data_dir=str(tmp_path)).info.features  # RSICD's features; nothing is prepared
  with pytest.raises(ValueError, match="dataset 'rsicd' has no 'sensor', 'gsd', 'date', 'lat', 'lon' feature"):
    metadata_prompts.with_captions([], features, "metadata_prompt", "rsicd")
  with pytest.raises(ValueError, match="dataset.captions='prompt': expected one of"):
    metadata_prompts.with_captions([], features, "prompt", "rsicd")
  assert metadata_prompts.with_captions(source := [], features, "captions", "rsicd") is source


# ---------------------------------------------------------------- towers


TINY = dict(vocab_size=20, embed_dim=8, resnet_width=4, fusion_heads=2, text_width=8, text_heads=2, hash_bits=8,
            spacetime_dim=fields.SPACETIME_DIM)


def _inputs(batch=3, size=32, length=6, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32),
          jnp.asarray(rng.integers(1, 20, size=(batch, length)), jnp.int32), jnp.asarray([2, 6, 0][:batch]),
          jnp.asarray(rng.normal(size=(batch, fields.SPACETIME_DIM)), jnp.float32))


@pytest.fixture(scope="module")
def tiny_model():
  model = ccls2t.Model(**TINY)
  images, tokens, lengths, spacetime = _inputs()
  variables = jax.jit(lambda: model.init(jax.random.key(0), images, tokens, lengths, spacetime=spacetime,
                                         train=False))()
  return model, variables, (images, tokens, lengths, spacetime)


def test_model_outputs_fields_and_shared_trunk(tiny_model):
  model, variables, (images, tokens, lengths, spacetime) = tiny_model
  out = jax.jit(lambda v: model.apply(v, images, tokens, lengths, spacetime=spacetime, train=False))(variables)
  assert {k: v.shape for k, v in out.items()} == {
      "image_embedding": (3, 8), "text_embedding": (3, 8), "image_mid": (3, 8), "text_mid": (3, 8),
      "image_codes": (3, 8), "text_codes": (3, 8), "spacetime_reconstruction": (3, fields.SPACETIME_DIM)}
  assert all(v.dtype == jnp.float32 for v in out.values()) and np.all(np.abs(out["image_codes"]) < 1)
  assert model.TEXT_FIELDS == ("spacetime",) and ccls2t.Model(**TINY, spacetime=False).TEXT_FIELDS == ()
  # One trunk for both scales, named and shaped like resnet.ResNet (so the same weights load into either).
  trunk = variables["params"]["image_encoder"]["resnet"]
  reference = jax.eval_shape(lambda: resnet.ResNet(18, 4).init(jax.random.key(0), images, train=False))["params"]
  assert jax.tree.map(jnp.shape, trunk) == jax.tree.map(lambda x: x.shape, reference)
  codes = jax.jit(lambda v: model.apply(v, images, method="image_codes"))(variables)
  np.testing.assert_allclose(codes, out["image_codes"], rtol=1e-5, atol=1e-6)


def test_text_tower_masks_padding_and_uses_spacetime(tiny_model):
  model, variables, (_, tokens, lengths, spacetime) = tiny_model
  embed = jax.jit(lambda t, s: model.apply(variables, t, lengths, spacetime=s, train=False, method="embed_texts"))
  base = np.asarray(embed(tokens, spacetime))
  np.testing.assert_allclose(embed(tokens.at[0, 2:].set(7).at[2].set(3), spacetime), base, rtol=1e-5, atol=1e-6)
  moved = np.asarray(embed(tokens, spacetime.at[1].add(1.0)))
  assert not np.allclose(moved[1], base[1]) and np.allclose(moved[[0, 2]], base[[0, 2]], atol=1e-6)
  with pytest.raises(ValueError, match="needs the 'spacetime' field"):
    model.apply(variables, tokens, lengths, train=False, method="embed_texts")


# ---------------------------------------------------------------- objective


def _np_clip(images, texts, ids, scale):
  a = images / np.linalg.norm(images, axis=1, keepdims=True)
  b = texts / np.linalg.norm(texts, axis=1, keepdims=True)
  logits = scale * a @ b.T
  positives = ids[:, None] == ids[None, :]

  def direction(m):
    lse = np.log(np.exp(m).sum(1))
    return np.mean(lse - (m * positives).sum(1) / positives.sum(1))

  return 0.5 * (direction(logits) + direction(logits.T))


def _outputs(batch=6, dim=5, bits=4, seed=0):
  rng = np.random.default_rng(seed)
  out = {k: rng.normal(size=(batch, dim)) for k in ("image_embedding", "text_embedding", "image_mid", "text_mid")}
  out.update(image_codes=np.tanh(rng.normal(size=(batch, bits))), text_codes=np.tanh(rng.normal(size=(batch, bits))),
             spacetime_reconstruction=rng.normal(size=(batch, 3)))
  targets = {"image_id": np.arange(batch), "scene": np.array([0, 1, 0, 2, 1, 0]),
             "spacetime": rng.normal(size=(batch, 3))}
  return out, targets


@pytest.mark.parametrize("hash_loss", ["contrastive", "pairwise"])
def test_objective_matches_numpy(hash_loss):
  out, batch = _outputs()
  objective = ccls2t_loss.Objective(hash_loss=hash_loss, hash_positives="scene", mid_weight=0.5, hash_weight=2.0,
                                    quantization_weight=0.3, balance_weight=0.7, spacetime_weight=1.5)
  variables = objective.init(jax.random.key(0), out, batch)
  loss, metrics = objective.apply(variables, jax.tree.map(jnp.asarray, out), jax.tree.map(jnp.asarray, batch))
  scale = 1 / 0.07
  h, g, scene = out["image_codes"], out["text_codes"], batch["scene"]
  if hash_loss == "contrastive":
    hash_term = _np_clip(h, g, scene, scale)
  else:
    theta = 0.5 * h @ g.T
    hash_term = np.mean(np.log1p(np.exp(theta)) - (scene[:, None] == scene[None, :]) * theta)
  quantization = (np.mean(((h - np.sign(h)) ** 2).sum(1)) + np.mean(((g - np.sign(g)) ** 2).sum(1))) / 8
  balance = ((h.mean(0) ** 2).sum() + (g.mean(0) ** 2).sum()) / 8
  spacetime = np.mean((out["spacetime_reconstruction"] - batch["spacetime"]) ** 2)
  expected = dict(clip=_np_clip(out["image_embedding"], out["text_embedding"], batch["image_id"], scale),
                  clip_mid=_np_clip(out["image_mid"], out["text_mid"], batch["image_id"], scale), hash=hash_term,
                  quantization=quantization, bit_balance=balance, spacetime=spacetime)
  for name, value in expected.items():
    np.testing.assert_allclose(metrics[name], value, rtol=2e-5, err_msg=name)
  total = (expected["clip"] + 0.5 * expected["clip_mid"] + 2.0 * hash_term + 0.3 * quantization + 0.7 * balance
           + 1.5 * spacetime)
  np.testing.assert_allclose(loss, total, rtol=2e-5)


def test_objective_declares_its_field_and_errors_name_the_option():
  assert ccls2t_loss.Objective(hash_positives="scene").batch_fields == ("scene",)
  assert ccls2t_loss.Objective(hash_positives="image").batch_fields == ()
  out, batch = _outputs()
  with pytest.raises(ValueError, match="loss.hash_loss='dcmh': expected one of"):
    ccls2t_loss.Objective(hash_loss="dcmh").init(jax.random.key(0), out, batch)


# ---------------------------------------------------------------- hash index and metrics


def _np_hamming(a, b):
  return ((a[:, None] >= 0) != (b[None] >= 0)).sum(-1)


def test_packing_and_popcount_hamming_match_numpy():
  rng = np.random.default_rng(0)
  codes = rng.normal(size=(9, 40))
  words = hash_index.pack_codes(codes)
  bits = codes >= 0
  assert words.dtype == np.uint32 and words.shape == (9, 2)
  assert [int(w) for w in words[:, 0]] == [sum(int(b) << j for j, b in enumerate(row[:32])) for row in bits]
  assert [int(w) for w in words[:, 1]] == [sum(int(b) << j for j, b in enumerate(row[32:])) for row in bits]
  np.testing.assert_array_equal(hash_index.pack_codes(bits), words)
  other = rng.normal(size=(5, 40))
  distances = hash_index.hamming_distances(jnp.asarray(hash_index.pack_codes(other)), jnp.asarray(words))
  np.testing.assert_array_equal(distances, _np_hamming(other, codes))
  signs = np.where(codes >= 0, 1, -1)
  np.testing.assert_array_equal(distances, (40 - np.where(other >= 0, 1, -1) @ signs.T) // 2)


def test_exact_top_k_matches_stable_argsort():
  rng = np.random.default_rng(1)
  gallery, queries = rng.normal(size=(200, 6)), rng.normal(size=(23, 6))  # 6 bits: many ties
  indices, distances = hash_index.hamming_top_k(hash_index.pack_codes(queries), hash_index.pack_codes(gallery), 30,
                                                chunk_size=8)
  reference = _np_hamming(queries, gallery)
  order = np.argsort(reference, axis=1, kind="stable")[:, :30]
  np.testing.assert_array_equal(indices, order)
  np.testing.assert_array_equal(distances, np.take_along_axis(reference, order, 1))
  embeddings = rng.normal(size=(50, 4))
  embeddings[[10, 30, 40]] = embeddings[20]  # exact ties
  indices, _ = hash_index.cosine_top_k(embeddings[[20, 3]], embeddings, 6, chunk_size=1)
  unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
  np.testing.assert_array_equal(indices, np.argsort(-(unit[[20, 3]] @ unit.T), axis=1, kind="stable")[:, :6])
  assert list(indices[0, :4]) == [10, 20, 30, 40]


def test_two_level_index_probing_everything_is_exhaustive():
  rng = np.random.default_rng(2)
  gallery, queries = rng.normal(size=(120, 12)), rng.normal(size=(17, 12))
  exhaustive, _ = hash_index.hamming_top_k(hash_index.pack_codes(queries), hash_index.pack_codes(gallery), 25)
  embeddings = rng.normal(size=(120, 5))
  for index in (hash_index.TwoLevelIndex.build(gallery, num_clusters=6, embeddings=embeddings),
                hash_index.TwoLevelIndex.build(gallery, labels=rng.integers(0, 4, 120), embeddings=embeddings)):
    np.testing.assert_array_equal(index.search(queries, 25, probe=index.num_clusters, chunk_size=5), exhaustive)
    assert index.mean_candidates(queries, index.num_clusters) == 120
    query_embeddings = rng.normal(size=(17, 5))
    reranked = index.search(queries, 25, probe=index.num_clusters, rerank_depth=120, query_embeddings=query_embeddings)
    np.testing.assert_array_equal(reranked, hash_index.cosine_top_k(query_embeddings, embeddings, 25)[0])
  # A probed cluster smaller than k: its 5 members (all at distance 1, so in index order), then -1 padding.
  near = np.ones((5, 12)) - 2 * np.eye(5, 12)  # all +1 but one bit
  far = -np.ones((15, 12))
  codes, labels = np.concatenate([far[:3], near, far[3:]]), np.repeat([1, 0, 1], [3, 5, 12])
  small = hash_index.TwoLevelIndex.build(codes, labels=labels)
  np.testing.assert_array_equal(small.search(np.ones((1, 12)), 8, probe=1), [[3, 4, 5, 6, 7, -1, -1, -1]])


def test_map_and_precision_at_k_on_a_hand_made_example():
  gallery_labels = np.array([0, 0, 1, 1, 0])
  ranked = np.array([[0, 2, 1, 3, 4],  # relevant (label 0): 1 0 1 -> AP@3 (1 + 2/3) / 2, P@3 2/3
                     [0, 3, 2, -1, -1],  # label 1: 0 1 1 -> AP@3 (1/2 + 2/3) / 2, P@3 2/3
                     [2, 3, -1, -1, -1]])  # label 0: no hit -> AP@3 0, P@3 0
  scores = hash_index.retrieval_scores(ranked, np.array([0, 1, 0]), gallery_labels, (3, 5))
  assert scores["mAP@3"] == pytest.approx(100 * (5 / 6 + 7 / 12 + 0) / 3)
  assert scores["P@3"] == pytest.approx(100 * (2 / 3 + 2 / 3 + 0) / 3)
  # K = 5: query 0 has hits at ranks 1, 3, 5 -> (1 + 2/3 + 3/5) / 3; query 1 unchanged.
  assert scores["mAP@5"] == pytest.approx(100 * ((1 + 2 / 3 + 3 / 5) / 3 + 7 / 12) / 3)
  assert scores["P@5"] == pytest.approx(100 * (3 / 5 + 2 / 5) / 3)


# ---------------------------------------------------------------- configs and the trainer


def test_configs_default_real_and_runlocal():
  default = load_config("ccls2t", "")
  assert (default.dataset.name, default.dataset.captions, default.model_name) == ("synthetic_rs/small",
                                                                                 "metadata_prompt", "ccls2t")
  assert default.dataset.image_size == 80 and default.model.spacetime and default.loss.hash_positives == "scene"
  rsicd = load_config("ccls2t", "rsicd")
  assert (rsicd.dataset.captions, rsicd.model.spacetime, rsicd.loss.hash_positives) == ("captions", False, "image")
  assert rsicd.dataset.image_size == 256 and rsicd.model.resnet_width == 64
  assert load_config("ccls2t", "runlocal").dataset.name == "synthetic_rs/tiny"


def test_runlocal_trains_on_8_devices_and_writes_results(tmp_path, data_dir):
  assert jax.device_count() == 8
  config = load_config("ccls2t", "runlocal")
  config.dataset.data_dir = data_dir
  results = train.train_and_evaluate(config, str(tmp_path))
  written = json.loads((tmp_path / "results.json").read_text())
  assert written["test"] == results["test"] and written["total_steps"] == 4 and written["model"] == "ccls2t"
  assert written["random_init"] is not None
  assert_consistent_results(written)
  # The hash evaluator (config.evals.hash): 16 test images query the 64 train images by Hamming distance.
  assert written["hash"] == results["hash"] and set(written["hash"]) == {"mAP10", "P10", "mAP50", "P50"}
  assert all(0.0 <= value <= 100.0 for value in written["hash"].values())
  metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {k: metrics[-1][f"hash/{k}"] for k in written["hash"]} == written["hash"]
  assert any("train/spacetime" in m for m in metrics)
