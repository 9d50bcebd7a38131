"""Tests of the procedural `synthetic_rs` benchmark: generator, captions and tfds builder."""

import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from rsalign_jax.data.synthetic_rs import SCENE_CLASSES, SyntheticRs, generate_example
from rsalign_jax.data.synthetic_rs import captions, scenes

_NUMBERS = {word: count for count, word in enumerate(captions.NUMBER_WORDS)}
_COLOURS = {word: name for name, words in captions.COLOUR_WORDS.items() for word in words}
_SIZES = {word for words in captions.SIZE_WORDS.values() for word in words}
_NOUN_KINDS = {}
for _kind, _noun in captions.NOUNS.items():
  for _phrase in _noun.singular + _noun.plural:
    _NOUN_KINDS.setdefault(tuple(_phrase.split()), set()).add(_kind)
_REGION_PHRASES = sorted(((phrase, region) for region, phrases in captions.REGION_PHRASES.items()
                          for phrase in phrases), key=lambda item: -len(item[0]))


def _index_of_each_scene(split="train", seed=0):
  indices = {}
  index = 0
  while len(indices) < len(SCENE_CLASSES):
    indices.setdefault(scenes.sample_scene(seed, split, index), index)
    index += 1
  return indices


def _noun_kinds_at(tokens, start):
  for length in (4, 3, 2, 1):
    kinds = _NOUN_KINDS.get(tuple(tokens[start:start + length]))
    if kinds:
      return kinds
  return set()


def _count_and_colour_claims(caption):
  """(count or None, colour or None, noun kinds) for each number/colour word before a noun."""
  tokens = caption.split()
  claims = []
  for i, token in enumerate(tokens):
    if token not in _NUMBERS and token not in _COLOURS:
      continue
    count, colour, j = _NUMBERS.get(token), _COLOURS.get(token), i + 1
    while j < len(tokens) and (tokens[j] in _SIZES or tokens[j] in _COLOURS):
      colour = _COLOURS.get(tokens[j], colour)
      j += 1
    kinds = _noun_kinds_at(tokens, j)
    if kinds:
      claims.append((count, colour, kinds))
  return claims


def _region_claims(caption):
  claims = []
  for phrase, region in _REGION_PHRASES:
    if re.search(rf"\b{phrase}\b", caption):
      claims.append(region)
      caption = re.sub(rf"\b{phrase}\b", "|", caption)
  return claims


def test_same_arguments_give_identical_examples():
  first = generate_example(3, "val", 17, 64)
  second = generate_example(3, "val", 17, 64)
  assert first["image"].tobytes() == second["image"].tobytes()
  assert {k: v for k, v in first.items() if k != "image"} == {k: v for k, v in second.items() if k != "image"}


def test_different_index_or_seed_gives_different_images():
  reference = generate_example(0, "train", 5, 32)["image"]
  assert not np.array_equal(reference, generate_example(0, "train", 6, 32)["image"])
  assert not np.array_equal(reference, generate_example(1, "train", 5, 32)["image"])
  assert not np.array_equal(reference, generate_example(0, "test", 5, 32)["image"])


def test_everything_but_pixels_is_independent_of_image_size():
  small = generate_example(0, "test", 9, 32)
  large = generate_example(0, "test", 9, 96)
  assert small["image"].shape == (32, 32, 3) and large["image"].shape == (96, 96, 3)
  assert {k: v for k, v in small.items() if k != "image"} == {k: v for k, v in large.items() if k != "image"}


def test_unknown_split_is_rejected():
  with pytest.raises(ValueError, match="split"):
    generate_example(0, "validation", 0, 32)


@pytest.mark.parametrize("scene", SCENE_CLASSES)
def test_every_scene_class_generates_a_textured_image_and_valid_record(scene):
  example = generate_example(0, "train", _index_of_each_scene()[scene], 64)
  image = example["image"]
  assert image.shape == (64, 64, 3) and image.dtype == np.uint8
  assert image.std() > 8.0
  assert example["scene"] == scene
  assert len(example["captions"]) == captions.NUM_CAPTIONS
  for caption in example["captions"]:
    assert caption == caption.lower() and caption.endswith(" .") and "  " not in caption
    assert any(noun in caption for noun in captions.SCENE_NOUNS[scene]), caption
  assert 1 <= len(example["keywords"]) <= 5
  gsd_min, gsd_max = scenes.SENSORS[example["sensor"]]
  assert gsd_min <= example["gsd"] <= gsd_max
  assert re.fullmatch(r"20(1[5-9]|2[0-4])-\d\d-\d\d", example["date"])
  assert -90 <= example["lat"] <= 90 and -180 <= example["lon"] <= 180


def test_at_least_15_scene_classes_balanced_in_every_block_but_shuffled():
  num_classes = len(SCENE_CLASSES)
  assert num_classes >= 15 and len(set(SCENE_CLASSES)) == num_classes
  blocks = [[scenes.sample_scene(0, "test", block * num_classes + i) for i in range(num_classes)]
            for block in range(4)]
  assert all(sorted(block) == sorted(SCENE_CLASSES) for block in blocks)
  assert blocks[0] != blocks[1]


def test_counts_colours_and_positions_in_captions_are_true_of_the_layout():
  checked = 0
  for index in range(250):
    example = generate_example(0, "train", index, 32, with_layout=True)
    groups = example["layout"].groups
    for caption in example["captions"]:
      for count, colour, kinds in _count_and_colour_claims(caption):
        assert any(g.kind in kinds and count in (None, g.count) and colour in (None, g.colour) for g in groups), (
            caption, groups)
        checked += 1
      for region in _region_claims(caption):
        assert region in {g.region for g in groups}, (caption, groups)
        checked += 1
  assert checked > 500


def test_captions_are_near_duplicates_with_rsicd_like_repetition():
  examples = [generate_example(0, "val", i, 32) for i in range(200)]
  repeated = np.mean([len(set(e["captions"])) < captions.NUM_CAPTIONS for e in examples])
  assert 0.15 < repeated < 0.45
  informative = np.mean([any(_count_and_colour_claims(c)) or bool(_region_claims(c))
                         for e in examples for c in e["captions"]])
  assert informative > 0.5


def test_dihedral_transform_of_points_matches_the_image_transform():
  size = 8
  for quarter_turns in range(4):
    for flip in (False, True):
      image = np.zeros((size, size))
      image[1, 6] = 1.0  # x = 6, y = 1
      image = np.rot90(image, quarter_turns)
      image = image[:, ::-1] if flip else image
      y, x = np.argwhere(image)[0]
      moved = scenes._dihedral_point(((6 + 0.5) / size, (1 + 0.5) / size), quarter_turns, flip)
      np.testing.assert_allclose(moved, ((x + 0.5) / size, (y + 0.5) / size))


def test_tiny_config_builds_and_reads_back_with_data_source(tmp_path):
  builder = SyntheticRs(config="tiny", data_dir=tmp_path, file_format="array_record")
  builder.download_and_prepare()
  config = builder.builder_config
  filenames = []
  for split, size in config.split_sizes.items():
    source = tfds.data_source("synthetic_rs/tiny", data_dir=tmp_path, split=split)
    records = [source[i] for i in range(len(source))]
    assert len(records) == size
    assert sorted(r["image_id"] for r in records) == list(range(size))
    for record in records:
      assert record["image"].shape == (32, 32, 3) and record["image"].dtype == np.uint8
      assert len(record["captions"]) == captions.NUM_CAPTIONS
      scene = SCENE_CLASSES[record["scene"]]
      assert record["filename"].decode().startswith(f"{scene}_")
      expected = generate_example(config.seed, split, int(record["image_id"]), config.image_size)
      np.testing.assert_array_equal(record["image"], expected["image"])
      assert [c.decode() for c in record["captions"]] == expected["captions"]
      filenames.append(record["filename"])
  assert len(set(filenames)) == len(filenames)
