"""AMFMN: scores against explicit numpy references, MVSA shapes, the objective and its caption prior, configs, and
trainer smoke runs (runlocal, 8 virtual devices)."""
import collections
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config, runlocal_config, write_wordpiece_vocab
from rsalign_jax import train
from rsalign_jax.data.tokenizers import WordPieceTokenizer, WordVocab
from rsalign_jax.losses import amfmn as amfmn_loss
from rsalign_jax.models import amfmn

TINY = dict(vocab_size=9, embed_dim=16, resnet_width=8, word_dim=5, hidden_dim=7)


def _normal(*shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _cosine_rows(v, attended):
  """Explicit cos(v_i, Ft_ij) over an (N, M, D) tensor, the reference's `cosine_similarity`."""
  dots = np.einsum("nd,nmd->nm", v, attended)
  norms = np.linalg.norm(v, axis=-1)[:, None] * np.linalg.norm(attended, axis=-1)
  return dots / np.maximum(norms, 1e-8)


# ---------------------------------------------------------------- scores


def _attention(att_type, visual, text, chunk_elements=1 << 23):
  module = amfmn.CrossAttention(att_type, chunk_elements)
  params = module.init(jax.random.key(1), visual, text)["params"]
  params = jax.tree.map(lambda x: _normal(*x.shape, seed=x.size) * 0.5, params)  # init-independent values
  return np.asarray(module.apply({"params": params}, visual, text)), jax.tree.map(np.asarray, params)


def test_soft_att_closed_form_equals_the_explicit_pairwise_cosine():
  visual, text = _normal(6, 12, seed=1), np.maximum(_normal(5, 12, seed=2), 0)  # text is ReLU'd in the model
  text[3] = 0  # an all-zero text vector takes the 1e-8 clamp
  scores, params = _attention("soft_att", visual, text)
  gate = _sigmoid(visual @ params["gate"]["kernel"] + params["gate"]["bias"])
  expected = _cosine_rows(visual, gate[:, None, :] * text[None, :, :])
  np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
  assert np.all(scores[:, 3] == 0)


def test_soft_att_gradient_is_finite_at_an_all_zero_text():
  visual, text = _normal(3, 8, seed=1), np.zeros((2, 8), np.float32)
  module = amfmn.CrossAttention("soft_att")
  params = module.init(jax.random.key(0), visual, text)
  grads = jax.grad(lambda p, v, t: module.apply(p, v, t).sum(), argnums=(0, 1, 2))(params, visual, text)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("chunk_elements", [1 << 23, 5 * 12 * 3, 1])  # one block; blocks of 3 (padded); rows of 1
def test_fusion_att_in_image_blocks_equals_the_unchunked_reference(chunk_elements):
  visual, text = _normal(7, 12, seed=3), np.maximum(_normal(5, 12, seed=4), 0)
  scores, params = _attention("fusion_att", visual, text, chunk_elements)
  joint = np.concatenate([np.repeat(visual[:, None], 5, 1), np.repeat(text[None], 7, 0)], axis=-1)  # (7, 5, 24)
  fc1, fc2 = params["fc1"], params["fc2"]
  attended = _sigmoid(joint @ fc1["kernel"] + fc1["bias"]) * (joint @ fc2["kernel"] + fc2["bias"])
  np.testing.assert_allclose(scores, _cosine_rows(visual, attended), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_elements", [1 << 23, 5 * 12 * 3])
def test_similarity_att_in_image_blocks_equals_the_unchunked_reference(chunk_elements):
  visual, text = _normal(7, 12, seed=5), np.maximum(_normal(5, 12, seed=6), 0)
  scores, params = _attention("similarity_att", visual, text, chunk_elements)
  v = visual @ params["fc_visual"]["kernel"] + params["fc_visual"]["bias"]
  t = text @ params["fc_text"]["kernel"] + params["fc_text"]["bias"]
  attended = _sigmoid(v[:, None] * t[None]) * t[None]
  np.testing.assert_allclose(scores, _cosine_rows(visual, attended), rtol=1e-5, atol=1e-6)


def test_unknown_att_type_is_a_clear_error():
  with pytest.raises(ValueError, match="model.att_type='dot_att': expected one of"):
    _attention("dot_att", _normal(2, 4), _normal(2, 4))


# ---------------------------------------------------------------- towers


def test_nearest_resize_is_pytorch_nearest_with_an_output_size():
  x = np.arange(9, dtype=np.float32).reshape(1, 3, 3, 1)
  np.testing.assert_array_equal(amfmn.nearest_resize(x, 5, 5)[0, :, 0, 0], [0, 0, 3, 3, 6])  # floor(i * 3 / 5)
  np.testing.assert_array_equal(amfmn.nearest_resize(x, 6, 6)[0, :, :, 0], np.repeat(np.repeat(x[0, :, :, 0], 2, 0),
                                                                                      2, 1))


@pytest.mark.parametrize("size, width, grid", [(80, 32, 5), (256, 64, 16)])
def test_mvsa_shapes(size, width, grid):
  """80 px: f1 20x20 -> L' 5x5 = f3; 256 px: f1 64x64 -> L' 16x16 = f3 (the reference's sizes)."""
  model = amfmn.Model(**{**TINY, "resnet_width": width, "embed_dim": 32})
  images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((2, 4), jnp.int32)
  lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
  variables = jax.eval_shape(lambda *x: model.init(jax.random.key(0), *x, train=False), images, tokens, lengths)
  mvsa = variables["params"]["mvsa"]
  assert mvsa["lf_conv"]["kernel"].shape == (3, 3, 3 * width, 3)  # [f1, up(f2)]: width + 2 width channels
  assert mvsa["hf_conv"]["kernel"].shape == (1, 1, 12 * width, 3)  # [f3, up(f4)]: 4 width + 8 width
  assert mvsa["solo_attention"]["kernel"].shape == (grid * grid, 32)  # the flattened grid x grid attention map
  embedded = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, method="embed_images"), variables, images)
  assert embedded.shape == (2, 32) and embedded.dtype == jnp.float32


def test_image_size_not_a_multiple_of_16_is_a_clear_error():
  model = amfmn.Model(**TINY)
  with pytest.raises(ValueError, match="multiple of 16"):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, jnp.ones((2, 3), jnp.int32), jnp.ones(2, jnp.int32),
                                        train=False), jax.ShapeDtypeStruct((2, 72, 72, 3), jnp.float32))


def test_model_call_scores_the_batch_with_the_evaluator_score():
  model = amfmn.Model(**TINY)
  images = _normal(3, 32, 32, 3)
  tokens = np.array([[1, 2, 0], [3, 0, 0], [4, 5, 6]], np.int32)
  lengths = np.array([2, 1, 3], np.int32)
  variables = model.init(jax.random.key(0), images, tokens, lengths, train=False)
  outputs = model.apply(variables, images, tokens, lengths, train=False)
  v = model.apply(variables, images, train=False, method="embed_images")
  t = model.apply(variables, tokens, lengths, train=False, method="embed_texts")
  np.testing.assert_allclose(outputs["scores"], model.apply(variables, v, t, method="score"), rtol=1e-6)
  assert set(outputs) == {"scores"} and outputs["scores"].shape == (3, 3)
  assert np.all(t >= 0)


# ---------------------------------------------------------------- caption prior


def _bleu4(references, hypothesis):
  """NLTK's sentence_bleu, weights (0.25,)*4, no smoothing (0 when an order has no match; NLTK gives <1e-77)."""
  precisions = []
  for n in range(1, 5):
    grams = collections.Counter(tuple(hypothesis[k:k + n]) for k in range(len(hypothesis) - n + 1))
    max_ref = collections.Counter()
    for ref in references:
      for gram, count in collections.Counter(tuple(ref[k:k + n]) for k in range(len(ref) - n + 1)).items():
        max_ref[gram] = max(max_ref[gram], count)
    clipped = sum(min(count, max_ref[gram]) for gram, count in grams.items())
    if clipped == 0:
      return 0.0
    precisions.append(clipped / max(1, sum(grams.values())))
  c = len(hypothesis)
  closest = min((len(r) for r in references), key=lambda r: (abs(r - c), r))
  brevity = 1.0 if c > closest else math.exp(1 - closest / c)
  return brevity * math.exp(sum(math.log(p) for p in precisions) / 4)


def _prior(references, caption, unk):
  """The authors' `calc_sim` on id lists, with <unk> as the stopword."""
  score1 = 1.0 if caption in references else _bleu4(references, caption)
  content = [[w for w in r if w != unk] for r in references]
  ratios = [len(set(r) & set(caption)) / len(r) for r in content if r]
  return (score1 + (np.mean(ratios) if ratios else 0.0)) / 2


def _pad(rows, length):
  out = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return out


UNK = 9
SETS = [[[1, 2, 3, 4], [1, 2, 3, 4], [5, UNK, 6], [UNK, UNK], [1, 2, 3, 4]],
        [[1, 2, 3, 4, 5, 6], [7, 8] * 4, [UNK], [UNK], [UNK]]]
CAPTIONS = [[1, 2, 3, 4], [5, 6], [1, 2, 3, 4, 4], [1, 2, 3], [], [7, 8]]


def test_prior_on_a_hand_made_caption_set():
  got = np.asarray(amfmn_loss.prior_similarity(np.stack([_pad(s, 8) for s in SETS]), _pad(CAPTIONS, 8),
                                               unk_token=UNK))
  # BLEU of [1 2 3 4 4]: precisions 4/5, 3/4, 2/3, 1/2; brevity 1 vs length 4, exp(1 - 6/5) vs length 6.
  bleu_c = (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
  expected = [
      # image 0: references with content words: 3 x [1 2 3 4] and [5 6]; [unk unk] does not count.
      [(1 + 3 / 4) / 2,  # exact copy of a reference
       (0 + 1 / 4) / 2,  # [5 6]: shorter than 4 tokens -> BLEU 0; overlap only with [5 unk 6]
       (bleu_c + 3 / 4) / 2, (0 + 3 * 3 / 4 / 4) / 2, 0.0, 0.0],
      # image 1: content references [1..6] (6 words) and [7 8 x4] (8 words, 2 distinct).
      [(math.exp(1 - 6 / 4) + 4 / 6 / 2) / 2,  # all precisions 1, brevity exp(1 - 6/4)
       (0 + 2 / 6 / 2) / 2, (math.exp(1 - 6 / 5) * bleu_c + 4 / 6 / 2) / 2, (0 + 3 / 6 / 2) / 2, 0.0,
       (0 + 2 / 8 / 2) / 2]]
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
  for i, refs in enumerate(SETS):
    for j, caption in enumerate(CAPTIONS):
      assert got[i, j] == pytest.approx(_prior(refs, caption, UNK), abs=1e-6)


def test_prior_equals_the_reference_on_random_captions():
  rng = np.random.default_rng(0)

  def sample(n):
    return [list(rng.integers(1, 5, rng.integers(0, 11))) for _ in range(n)]  # 4 ids (4 = unk): many n-gram hits
  sets, captions = [sample(5) for _ in range(12)], sample(12)
  sets[2][1] = list(captions[5])
  got = np.asarray(amfmn_loss.prior_similarity(np.stack([_pad(s, 10) for s in sets]), _pad(captions, 10),
                                               unk_token=4))
  expected = [[_prior(refs, caption, 4) for caption in captions] for refs in sets]
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  assert got[2, 5] >= 0.5 and np.mean(got > 0.3) > 0.1  # exact matches and partial BLEU both occur


# ---------------------------------------------------------------- objective


def _hinge_reference(scores, ids, margins, hardest):
  b = len(scores)
  rows, cols = np.zeros((b, b)), np.zeros((b, b))
  for i in range(b):
    for j in range(b):
      if ids[i] != ids[j]:
        rows[i, j] = max(0.0, margins[i, j] + scores[i, j] - scores[i, i])
        cols[i, j] = max(0.0, margins[i, j] + scores[i, j] - scores[j, j])
  return rows.max(1).sum() + cols.max(0).sum() if hardest else rows.sum() + cols.sum()


@pytest.mark.parametrize("hardest", [False, True])
def test_fixed_margin_objective_equals_numpy(hardest):
  scores = np.tanh(_normal(6, 6, seed=7))
  ids = np.array([0, 1, 0, 2, 3, 4])  # rows 0 and 2 share an image: not negatives of each other
  objective = amfmn_loss.Objective(margin=0.2, max_violation=hardest)
  loss, metrics = objective.apply({}, {"scores": scores}, {"image_id": ids})
  assert float(loss) == pytest.approx(_hinge_reference(scores, ids, np.full((6, 6), 0.2), hardest), rel=1e-5)
  assert float(metrics["positive_score"]) == pytest.approx(np.mean(np.diag(scores)), rel=1e-5)


@pytest.mark.parametrize("hardest", [False, True])
def test_dynamic_margin_objective_equals_numpy(hardest):
  sets = np.stack([_pad(s, 8) for s in SETS * 3])  # 6 images: 0, 2, 4 share references (different image ids)
  tokens = _pad(CAPTIONS, 8)
  scores = np.tanh(_normal(6, 6, seed=8))
  ids = np.array([0, 1, 2, 3, 4, 4])
  prior = np.array([[_prior(SETS[i % 2], c, UNK) for c in CAPTIONS] for i in range(6)])
  margins = 0.6 * (np.exp(5.0) - np.exp(5.0 * prior)) / (np.exp(5.0) - 1)
  objective = amfmn_loss.Objective(margin="dynamic", max_violation=hardest, gamma=0.6, beta=5.0, unk_token=UNK)
  batch = {"image_id": ids, "tokens": tokens, "caption_set": sets}
  loss, _ = objective.apply({}, {"scores": scores}, batch)
  assert float(loss) == pytest.approx(_hinge_reference(scores, ids, margins, hardest), rel=1e-5)


def test_objective_declares_its_field_and_errors_are_clear():
  assert amfmn_loss.Objective(margin="dynamic").batch_fields == ("caption_set",)
  assert amfmn_loss.Objective(margin=0.2).batch_fields == ()
  outputs, batch = {"scores": np.eye(2)}, {"image_id": np.arange(2)}
  with pytest.raises(ValueError, match="loss.margin='fixed': expected a number or 'dynamic'"):
    amfmn_loss.Objective(margin="fixed").apply({}, outputs, batch)
  dynamic_batch = {**batch, "tokens": np.ones((2, 3), np.int32), "caption_set": np.ones((2, 5, 3), np.int32)}
  with pytest.raises(ValueError, match="loss.margin='dynamic' needs the tokenizer's <unk> id"):
    amfmn_loss.Objective(margin="dynamic").apply({}, outputs, dynamic_batch)


@pytest.mark.parametrize("tokenizer", ["word", "wordpiece"])
def test_the_unk_id_comes_from_the_tokenizer(tokenizer, tmp_path):
  if tokenizer == "word":
    vocab = WordVocab.build(["two planes near a runway"] * 5, min_count=1)
    expected = vocab.word2idx["<unk>"]
  else:
    vocab = WordPieceTokenizer(write_wordpiece_vocab(tmp_path / "vocab.txt"))
    expected = 1  # [UNK] is the vocab.txt's second line, not its last
  objective = amfmn_loss.Objective.from_config({"margin": "dynamic"}, vocab)
  assert objective.unk_token == vocab.unk_id == expected


# ---------------------------------------------------------------- configs and trainer


def test_configs():
  default = load_config("amfmn")
  assert (default.model_name, default.loss_name, default.dataset.image_size) == ("amfmn", "amfmn", 80)
  assert default.loss.margin == 0.2 and "fields" not in default.input
  paper = load_config("amfmn", "rsitmd")
  assert (paper.optimizer.name, paper.optimizer.lr, paper.input.batch_size, paper.total_epochs) == ("adam", 2e-4,
                                                                                                 100, 70)
  assert paper.schedule.to_dict() == dict(name="warmup_step_decay", warmup_epochs=0, decay_every_epochs=20,
                                          decay_factor=0.7)
  assert (paper.model.hidden_dim, paper.model.embed_dim, paper.model.att_type) == (2400, 512, "soft_att")
  assert paper.input.pp_train == "decode|resize(278)|random_crop(256)|normalize"
  assert load_config("amfmn", "rsicd").optimizer.lr == 1e-4
  dynamic = load_config("amfmn", "rsitmd,dynamic,att=fusion_att")
  assert dynamic.loss.margin == "dynamic"
  assert dynamic.model.att_type == "fusion_att"


@pytest.mark.parametrize("arg", ["runlocal", "runlocal,dynamic"])
def test_trainer_smoke_run(arg, tmp_path_factory):
  config = runlocal_config(tmp_path_factory, "amfmn", arg)
  workdir = tmp_path_factory.mktemp("amfmn")
  results = train.train_and_evaluate(config, str(workdir))
  written = json.loads((workdir / "results.json").read_text())
  assert written["test"] == results["test"] and written["total_steps"] == 4
  assert all(np.isfinite(v) for v in written["test"].values())
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_rows = [row for row in lines if "train/loss" in row]
  assert train_rows and all(np.isfinite(row["train/loss"]) for row in train_rows)
  if "dynamic" in arg:
    assert all(0 < row["train/mean_negative_margin"] <= 0.6 for row in train_rows)
