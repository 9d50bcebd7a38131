"""The papers' word vocabulary (building, stopword modes, encoding, the json format), BERT WordPiece and CLIP BPE."""
import gzip
import json

import numpy as np
import pytest

from helpers import write_wordpiece_vocab
from rsalign_jax.data.tokenizers import UNK, ClipBpeTokenizer, WordPieceTokenizer, WordVocab, split_words
from rsalign_jax.weights import clip as clip_weights

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


CLIP_WORDS = ("many", "planes", "are", "parked", "near", "the", "airport", "terminal", "green", "river", "bridge",
              "trees", "with", "baseball", "fields", "buildings", "runway", "white")


def write_clip_bpe(folder, words=CLIP_WORDS):
  """A tiny CLIP BPE as HF's vocab.json + merges.txt and as open_clip's merges-only bpe.txt.gz: the byte symbols, the
  same with </w>, the merges joining each word left to right, then <|startoftext|> and <|endoftext|>."""
  from transformers.convert_slow_tokenizer import bytes_to_unicode  # pylint: disable=g-import-not-at-top
  symbols = list(bytes_to_unicode().values())
  merges = []
  for word in words:
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
      if f"{parts[0]} {parts[1]}" not in merges:
        merges.append(f"{parts[0]} {parts[1]}")
      parts = [parts[0] + parts[1], *parts[2:]]
  tokens = [*symbols, *(s + "</w>" for s in symbols), *(m.replace(" ", "") for m in merges), "<|startoftext|>",
            "<|endoftext|>"]
  (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  with gzip.open(folder / "bpe.txt.gz", "wt", encoding="utf-8") as f:
    f.write('"bpe_simple_vocab_16e6.txt#version: 0.2\n' + "\n".join(merges) + "\n")
  return folder


def test_clip_bpe_reads_hf_files_open_clip_merges_and_its_own_file_alike(tmp_path):
  folder = write_clip_bpe(tmp_path)
  hf = ClipBpeTokenizer(folder / "vocab.json")
  open_clip = ClipBpeTokenizer(folder / "bpe.txt.gz")
  hf.save(tmp_path / "clip_bpe.json")
  saved = ClipBpeTokenizer(tmp_path / "clip_bpe.json")
  assert open_clip.vocabulary() == hf.vocabulary() == saved.vocabulary()
  vocab = hf.vocabulary()["vocab"]
  assert hf.size == len(vocab) and hf.unk_id == vocab["<|endoftext|>"] == hf.size - 1
  tokens, lengths, truncated = saved.encode_batch(["The PLANES, near the plane"], max_len=11)
  want = [vocab[t] for t in ("<|startoftext|>", "the</w>", "planes</w>", ",</w>", "near</w>", "the</w>", "plan",
                             "e</w>", "<|endoftext|>")]  # 'plane' is no word of the merges: two pieces
  np.testing.assert_array_equal(tokens[0], want + [0, 0])
  assert lengths.tolist() == [9] and truncated == 0


def test_clip_bpe_truncation_keeps_the_end_token_and_pads_with_zero(tmp_path):
  tokenizer = ClipBpeTokenizer(write_clip_bpe(tmp_path) / "vocab.json")
  vocab = tokenizer.vocabulary()["vocab"]
  tokens, lengths, truncated = tokenizer.encode_batch(["many planes parked near the river", ""], max_len=4)
  np.testing.assert_array_equal(tokens, [[vocab["<|startoftext|>"], vocab["many</w>"], vocab["planes</w>"],
                                          vocab["<|endoftext|>"]],
                                         [vocab["<|startoftext|>"], vocab["<|endoftext|>"], 0, 0]])
  assert tokens.dtype == np.int32 and lengths.tolist() == [4, 2] and truncated == 1


def test_clip_bpe_rejects_files_that_are_not_clip_bpe(tmp_path):
  folder = write_clip_bpe(tmp_path)
  vocab = json.loads((folder / "vocab.json").read_text())
  (folder / "merges.txt").unlink()
  with pytest.raises(ValueError, match="cannot read the CLIP BPE files"):
    ClipBpeTokenizer(folder / "vocab.json")
  write_clip_bpe(folder)
  (folder / "vocab.json").write_text(json.dumps({k: v for k, v in vocab.items() if k != "<|endoftext|>"}))
  with pytest.raises(ValueError, match=r"not a CLIP BPE vocabulary \(no <\|endoftext\|> entries\)"):
    ClipBpeTokenizer(folder / "vocab.json")
  swapped = {**vocab, "<|endoftext|>": 0, "!": vocab["<|endoftext|>"]}
  (folder / "vocab.json").write_text(json.dumps(swapped))
  with pytest.raises(ValueError, match=r"<\|endoftext\|> has id 0, expected the highest id"):
    ClipBpeTokenizer(folder / "vocab.json")
  (folder / "merges.txt").write_text("#version: 0.2\np l a\n")
  with pytest.raises(ValueError, match="merges.txt: 'p l a' is not a BPE merge"):
    ClipBpeTokenizer(folder / "merges.txt")
  (folder / "list.json").write_text("[1, 2]")
  with pytest.raises(ValueError, match="list.json: expected a JSON object"):
    ClipBpeTokenizer(folder / "list.json")


def test_packaged_clip_bpe_gives_clips_token_ids():
  try:
    bpe = clip_weights.packaged_bpe()
  except FileNotFoundError:
    pytest.skip("open-clip-torch not installed (python -m rsalign_jax.weights fetch)")
  tokenizer = ClipBpeTokenizer(bpe)
  tokens, lengths, _ = tokenizer.encode_batch(["Many planes are parked near the terminal."], max_len=77)
  # open_clip's SimpleTokenizer on this caption (open_clip 3.3.0's tokenize).
  assert tokens[0, :lengths[0]].tolist() == [49406, 1346, 12581, 631, 16487, 2252, 518, 11816, 269, 49407]
  assert tokenizer.size == 49408 and not tokens[0, lengths[0]:].any()
