"""The training input pipeline: epoch coverage, process-count invariance, resumable iterator state."""
import io
import types

import ml_collections
import numpy as np
import PIL.Image
import pytest

from rsalign_jax.data import pipeline, sources
from rsalign_jax.data.sources import CaptionIndex
from rsalign_jax.data.tokenizers import WordVocab

PP = "decode|resize(10)|random_rotate(0, 90)|random_crop(8)|normalize"


def fake_source(num_images=12, captions_per_image=(5, 3)):
  records = []
  for i in range(num_images):
    buf = io.BytesIO()
    PIL.Image.fromarray(np.full((12, 12, 3), i * 10, np.uint8)).save(buf, "PNG")
    count = captions_per_image[i % len(captions_per_image)]
    records.append({"image": buf.getvalue(), "captions": [f"image{i} caption{k}".encode() for k in range(count)],
                    "image_id": i, "filename": f"img_{i}.png", "scene": i % 4})
  return records


def make_items(source, *, batch=8, process_index=0, process_count=1, sampling="per_caption", seed=3, fields=()):
  index = CaptionIndex.read(source)
  vocab = WordVocab.build(index.captions, min_count=1, stopwords="keep")
  tokens, lengths, _ = vocab.encode_batch(index.captions, 4)
  items = pipeline.TrainItems(source, index, tokens, lengths, sampling=sampling, global_batch_size=batch,
                              process_index=process_index, process_count=process_count, seed=seed, name="fake",
                              fields=fields)
  return items, vocab


def take(items, n, state=None):
  iterator = iter(pipeline.make_train_loader(items, pp_spec=PP, seed=3))
  if state is not None:
    iterator.set_state(state)
  return [next(iterator) for _ in range(n)], iterator.get_state()


def test_one_epoch_visits_every_caption_once():
  source = fake_source()
  items, vocab = make_items(source, batch=4)
  assert items.num_items == 6 * 5 + 6 * 3
  batches, _ = take(items, items.num_items // 4)
  seen = np.concatenate([b["tokens"] for b in batches])
  index = CaptionIndex.read(source)
  expected, _, _ = vocab.encode_batch(index.captions, 4)
  assert sorted(map(tuple, seen)) == sorted(map(tuple, expected))
  assert batches[0]["image"].shape == (4, 8, 8, 3) and batches[0]["image"].dtype == np.float32


def test_two_processes_load_the_rows_of_the_same_global_batches():
  source = fake_source()
  whole, _ = take(make_items(source)[0], 5)
  halves = [take(make_items(source, process_index=p, process_count=2)[0], 5)[0] for p in (0, 1)]
  for step in range(5):
    for key in whole[step]:
      np.testing.assert_array_equal(whole[step][key],
                                    np.concatenate([halves[0][step][key], halves[1][step][key]]))


def test_restored_state_resumes_at_the_next_batch():
  items, _ = make_items(fake_source())
  straight, _ = take(items, 6)
  _, state = take(items, 4)
  resumed, _ = take(items, 2, state)
  for a, b in zip(straight[4:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_per_image_sampling_draws_one_caption_per_image_per_epoch():
  items, _ = make_items(fake_source(), batch=4, sampling="per_image")
  assert items.num_items == 12
  batches, _ = take(items, 3)
  ids = np.concatenate([b["image_id"] for b in batches])
  assert sorted(ids.tolist()) == list(range(12))


def test_bad_settings_are_reported():
  with pytest.raises(ValueError, match="input.sampling='random'"):
    make_items(fake_source(), sampling="random")
  with pytest.raises(ValueError, match="not divisible by 3 processes"):
    make_items(fake_source(), batch=8, process_count=3)


def test_requested_fields_travel_with_their_image():
  source = fake_source()
  items, vocab = make_items(source, batch=4, fields=("scene", "caption_set"))
  batches, _ = take(items, 6)
  for batch in batches:
    np.testing.assert_array_equal(batch["scene"], batch["image_id"] % 4)
    for image_id, tokens, caption_set in zip(batch["image_id"], batch["tokens"], batch["caption_set"]):
      expected, _, _ = vocab.encode_batch([c.decode() for c in source[image_id]["captions"]], 4)
      np.testing.assert_array_equal(caption_set, np.resize(expected, (5, 4)))  # 3 captions: 0, 1, 2, 0, 1
      assert any((tokens == row).all() for row in caption_set)


def test_unknown_or_missing_fields_are_reported():
  with pytest.raises(ValueError, match=r"unknown field 'colour'; known fields: \['caption_set', 'scene',"):
    make_items(fake_source(), fields=("colour",))
  items, _ = make_items([{k: v for k, v in r.items() if k != "scene"} for r in fake_source()], fields=("scene",))
  with pytest.raises(ValueError, match="no 'scene' feature"):
    items[0]


def test_a_split_the_build_left_empty_or_absent_is_named_before_reading(monkeypatch, tmp_path):
  class Built:
    def __init__(self, *args, **kwargs):
      self.info = types.SimpleNamespace(splits={"train": types.SimpleNamespace(num_examples=9),
                                                "test": types.SimpleNamespace(num_examples=0)})
      self.data_path = tmp_path  # an existing build

    def download_and_prepare(self, **kwargs):
      pass

  monkeypatch.setattr(sources.tfds, "builder", Built)
  config = ml_collections.ConfigDict({"name": "synthetic_rs/small", "data_dir": "", "manual_dir": ""})
  for split in ("test", "val"):
    with pytest.raises(ValueError, match=rf"dataset 'synthetic_rs/small': split '{split}' is empty or absent in the "
                                         r"build \(built splits: train \(9 examples\), test \(0 examples\)\); a build "
                                         r"that skips missing images"):
      sources.open_split(config, split)
