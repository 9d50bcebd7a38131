"""The papers' word vocabulary: building, stopword modes, encoding, the json format."""
import json

import numpy as np
import pytest

from helpers import write_wordpiece_vocab
from rsalign_jax.data.tokenizers import UNK, WordPieceTokenizer, WordVocab, split_words

CAPTIONS = ["Many planes are parked near the terminal .", "some planes are parked in an airport .",
            "the airport has many planes ; planes , planes !"]


def test_split_words_drops_punctuation_and_lowercases():
  assert split_words("The Planes, (Parked) here!") == ["the", "planes", "parked", "here"]


def test_unk_mode_leaves_stopwords_out_so_they_encode_as_unk():
  vocab = WordVocab.build(CAPTIONS, min_count=2, stopwords="unk")
  assert set(vocab.word2idx) == {"planes", "parked", "many", "airport", UNK}
  assert vocab.word2idx["planes"] == 1  # most frequent first
  assert vocab.word2idx[UNK] == vocab.size - 1
  unk = vocab.word2idx[UNK]
  assert vocab.encode("the planes are parked") == [unk, 1, unk, vocab.word2idx["parked"]]


def test_keep_and_drop_modes():
  keep = WordVocab.build(CAPTIONS, min_count=2, stopwords="keep")
  assert "the" in keep.word2idx and "are" in keep.word2idx
  drop = WordVocab.build(CAPTIONS, min_count=2, stopwords="drop")
  assert drop.encode("the planes are parked") == [drop.word2idx["planes"], drop.word2idx["parked"]]


def test_encode_batch_pads_truncates_and_counts():
  vocab = WordVocab.build(CAPTIONS, min_count=1, stopwords="keep")
  tokens, lengths, truncated = vocab.encode_batch(["planes planes planes planes", "", "airport"], max_len=3)
  assert tokens.shape == (3, 3) and tokens.dtype == np.int32
  np.testing.assert_array_equal(lengths, [3, 0, 1])
  np.testing.assert_array_equal(tokens[1], [0, 0, 0])
  assert truncated == 1


def test_save_load_roundtrip_and_paper_format(tmp_path):
  vocab = WordVocab.build(CAPTIONS, min_count=1)
  vocab.save(tmp_path / "v.json")
  loaded = WordVocab.load(tmp_path / "v.json")
  assert loaded.word2idx == vocab.word2idx and loaded.stopwords == "unk"
  paper = {"word2idx": {"plane": 1, UNK: 2}, "idx2word": {"1": "plane", "2": UNK}, "idx": 3}
  (tmp_path / "paper.json").write_text(json.dumps(paper))
  assert WordVocab.load(tmp_path / "paper.json").encode("a plane") == [2, 1]


def test_load_errors_name_the_file(tmp_path):
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(ValueError, match="bad.json: not valid JSON"):
    WordVocab.load(tmp_path / "bad.json")
  (tmp_path / "list.json").write_text("[1, 2]")
  with pytest.raises(ValueError, match="list.json: expected a JSON object"):
    WordVocab.load(tmp_path / "list.json")
  with pytest.raises(ValueError, match="stopwords"):
    WordVocab.build(CAPTIONS, stopwords="remove")


def test_wordpiece_tokenizer_splits_subwords_pads_and_truncates(tmp_path):
  tokenizer = WordPieceTokenizer(write_wordpiece_vocab(tmp_path / "vocab.txt"))
  assert tokenizer.size == 10
  tokens, lengths, truncated = tokenizer.encode_batch(["The planes", "airport planes boats"], max_len=6)
  np.testing.assert_array_equal(tokens[0], [2, 7, 5, 6, 3, 0])  # [CLS] the plane ##s [SEP] [PAD]
  np.testing.assert_array_equal(tokens[1], [2, 8, 9, 5, 6, 3])  # truncated, [SEP] kept last
  np.testing.assert_array_equal(lengths, [5, 6])
  assert truncated == 1


def test_wordpiece_tokenizer_rejects_a_file_that_is_not_a_bert_vocab(tmp_path):
  (tmp_path / "words.txt").write_text("plane\nairport\n")
  with pytest.raises(ValueError, match="not a BERT WordPiece vocab.txt"):
    WordPieceTokenizer(tmp_path / "words.txt")
  with pytest.raises(ValueError, match="cannot read the WordPiece vocab.txt"):
    WordPieceTokenizer(tmp_path / "absent.txt")
