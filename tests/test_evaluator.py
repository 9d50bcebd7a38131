"""The retrieval evaluator on 8 devices with a toy model whose retrieval is known exactly."""
import io

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

from rsalign_jax.data import splits
from rsalign_jax.data.tokenizers import WordVocab
from rsalign_jax.evaluation import evaluator as evaluator_lib
from rsalign_jax.evaluation.evaluator import RetrievalEvaluator
from rsalign_jax.runtime import sharding as sharding_lib

NUM_IMAGES = 12  # not a multiple of the batch: the last batch is padded


def source(captions_of):
  records = []
  for i in range(NUM_IMAGES):
    buf = io.BytesIO()
    PIL.Image.fromarray(np.full((4, 4, 3), i * 10, np.uint8)).save(buf, "PNG")
    records.append({"image": buf.getvalue(), "captions": [c.encode() for c in captions_of(i)], "image_id": i})
  return records


def toy_functions(vocab, num_classes):
  """Image i -> one-hot(i // group); caption 'objecti ...' -> one-hot(i // group): retrieval by group."""
  word_class = np.zeros(vocab.size, np.int32)
  for i in range(NUM_IMAGES):
    word_class[vocab.word2idx[f"object{i}"]] = i
  word_class = jnp.asarray(word_class)
  group = NUM_IMAGES // num_classes

  def embed_images(variables, images, fields):
    index = jnp.round(images[:, 0, 0, 0] / 10).astype(jnp.int32)
    return jax.nn.one_hot(index // group, num_classes)

  def embed_texts(variables, tokens, lengths, fields):
    return jax.nn.one_hot(word_class[tokens[:, 0]] // group, num_classes)

  return embed_images, embed_texts, lambda variables, a, b: a @ b.T


def make_evaluator(records, vocab):
  split = splits.read("test", records, records, vocab, max_len=4)
  return RetrievalEvaluator(split, pp_spec="decode", batch_size=8, mesh=sharding_lib.make_mesh())


def test_perfect_toy_retrieval_scores_100():
  records = source(lambda i: [f"object{i} seen from above", f"object{i} again"])
  vocab = WordVocab.build([c.decode() for r in records for c in r["captions"]], min_count=1, stopwords="keep")
  evaluator = make_evaluator(records, vocab)
  metrics = evaluator.run({}, *toy_functions(vocab, num_classes=NUM_IMAGES))
  assert jax.device_count() == 8
  assert all(metrics[k] == 100.0 for k in ("i2t_R1", "t2i_R1", "i2t_R10", "t2i_R10"))


def test_identical_captions_are_embedded_once_and_tie_exactly():
  records = source(lambda i: [f"object{i} here", f"object{i} here", f"object{i} here"])
  vocab = WordVocab.build([c.decode() for r in records for c in r["captions"]], min_count=1, stopwords="keep")
  evaluator = make_evaluator(records, vocab)
  embed_images, embed_texts, score = toy_functions(vocab, num_classes=NUM_IMAGES // 3)
  images, texts = evaluator.embeddings({}, embed_images, embed_texts)
  assert images.shape == (NUM_IMAGES, NUM_IMAGES // 3) and texts.shape == (NUM_IMAGES, NUM_IMAGES // 3)
  metrics = evaluator.run({}, embed_images, embed_texts, score)
  # Groups of 3 images are indistinguishable: t2i R@1 is 1/3 in expectation, R@5 certain.
  np.testing.assert_allclose([metrics["t2i_R1"], metrics["t2i_R5"]], [100 / 3, 100.0])
  # i2t: 9 tied captions in the group, 3 of them correct: P(first is correct) = 1/3.
  np.testing.assert_allclose(metrics["i2t_R1"], 100 / 3)


def test_test_time_views_score_the_mean_of_each_images_views():
  """`views=4` with `dihedral_views(4)`: an image's score is the mean over its 4 rotations of the score of that
  rotation's embedding (here its first pixel row, which rotating changes), checked against numpy."""
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 255, (NUM_IMAGES, 4, 4, 3), dtype=np.uint8)
  records = source(lambda i: [f"object{i} seen from above"])
  for record, image in zip(records, pixels):
    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, "PNG")
    record["image"] = buf.getvalue()
  vocab = WordVocab.build([c.decode() for r in records for c in r["captions"]], min_count=1, stopwords="keep")
  text_table = rng.normal(size=(vocab.size, 12)).astype(np.float32)
  split = splits.read("test", records, records, vocab, max_len=4)
  evaluator = RetrievalEvaluator(split, pp_spec="decode|dihedral_views(4)", views=4, batch_size=8,
                                 mesh=sharding_lib.make_mesh())

  def embed_images(variables, images, fields):
    return images[:, 0].reshape(len(images), -1).astype(jnp.float32) / 255

  def embed_texts(variables, tokens, lengths, fields):
    return jnp.asarray(text_table)[tokens[:, 0]]

  images, texts = evaluator.embeddings({}, embed_images, embed_texts)
  assert images.shape == (NUM_IMAGES, 4, 12)
  scores = evaluator.scores({}, lambda v, a, b: a @ b.T, images, texts)
  rows = np.stack([[np.rot90(image, k)[0].reshape(-1) / 255 for k in range(4)] for image in pixels])
  tokens, _, _ = vocab.encode_batch([r["captions"][0].decode() for r in records], 4)
  expected = np.einsum("nvd,td->nt", rows, text_table[tokens[:, 0]]) / 4
  np.testing.assert_allclose(evaluator.caption_columns(scores), expected, rtol=1e-5, atol=1e-6)
  one_view = RetrievalEvaluator(split, pp_spec="decode", batch_size=8, mesh=sharding_lib.make_mesh())
  plain = one_view.scores({}, lambda v, a, b: a @ b.T, *one_view.embeddings({}, embed_images, embed_texts))
  assert not np.allclose(plain, scores)


def test_decoded_images_are_kept_for_the_next_pass_only_when_they_fit(monkeypatch):
  """A split whose decoded images exceed the cache limit is decoded again each pass, never held whole."""
  records = source(lambda i: [f"object{i} seen from above"])
  vocab = WordVocab.build([c.decode() for r in records for c in r["captions"]], min_count=1, stopwords="keep")
  functions = toy_functions(vocab, num_classes=NUM_IMAGES)
  image_bytes = 4 * 4 * 3  # one decoded uint8 image
  for limit, kept in ((NUM_IMAGES * image_bytes, True), (NUM_IMAGES * image_bytes - 1, False)):
    monkeypatch.setattr(evaluator_lib, "_CACHE_LIMIT_BYTES", limit)
    evaluator = make_evaluator(records, vocab)
    first = evaluator.run({}, *functions)
    assert (evaluator._images is not None) == kept
    assert evaluator.run({}, *functions) == first
