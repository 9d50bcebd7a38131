"""Word-level vocabulary of the RS retrieval papers (AMFMN/HVSA `vocab.py`), built and applied without NLTK data.

Captions are lowercased and split into words and punctuation; the papers' punctuation list is dropped. The
vocabulary keeps words seen at least `min_count` times in the TRAIN captions (the papers counted train+test,
leaking test words), ids from 1 by falling frequency, then `<unk>` as the last id; id 0 is padding. Stopword
handling is selectable:
  * `unk`  (the papers): stopwords are left out of the vocabulary, so at encode time they become `<unk>`;
  * `keep`: stopwords are ordinary words;
  * `drop`: stopwords are removed from captions before encoding.
The json format is the papers' (`word2idx`, `idx2word`, `idx`), so their shipped vocab files load unchanged.
"""
import collections
import gzip
import json
import os
import re

import numpy as np

UNK = "<unk>"
PUNCTUATION = frozenset([",", ".", ":", ";", "?", "(", ")", "[", "]", "&", "!", "*", "@", "#", "$", "%"])
STOPWORD_MODES = ("unk", "keep", "drop")
# NLTK's English stopword list (nltk_data corpora/stopwords/english), which the papers' vocabulary builder drops.
ENGLISH_STOPWORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him his
himself she she's her hers herself it it's its itself they them their theirs themselves what which who whom this
that that'll these those am is are was were be been being have has had having do does did doing a an the and but
if or because as until while of at by for with about against between into through during before after above below
to from up down in out on off over under again further then once here there when where why how all any both each
few more most other some such no nor not only own same so than too very s t can will just don don't should
should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't
haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't
weren weren't won won't wouldn wouldn't
""".split())
_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def split_words(caption):
  """Lowercases and splits a caption into words, dropping the papers' punctuation list."""
  return [w for w in _TOKEN_RE.findall(caption.lower()) if w not in PUNCTUATION]


class WordVocab:
  """Maps captions to word ids (0 = padding, last id = `<unk>`)."""

  def __init__(self, word2idx, stopwords="unk"):
    if stopwords not in STOPWORD_MODES:
      raise ValueError(f"text.stopwords={stopwords!r}: expected one of {STOPWORD_MODES}")
    if UNK not in word2idx:
      raise ValueError(f"vocabulary has no {UNK!r} entry")
    self.word2idx = dict(word2idx)
    self.stopwords = stopwords

  @classmethod
  def build(cls, captions, *, min_count=5, stopwords="unk"):
    """Builds the vocabulary from (train) captions: words with count >= min_count, most frequent first."""
    counts = collections.Counter(w for c in captions for w in split_words(c))
    if stopwords != "keep":
      counts = collections.Counter({w: n for w, n in counts.items() if w not in ENGLISH_STOPWORDS})
    words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
    word2idx = {w: i + 1 for i, w in enumerate(words)}
    word2idx[UNK] = len(words) + 1
    return cls(word2idx, stopwords)

  @property
  def size(self):
    """Number of embedding rows needed: the largest id + 1 (row 0 is padding)."""
    return max(self.word2idx.values()) + 1

  @property
  def unk_id(self):
    """The id of `<unk>` (out-of-vocabulary words, and stopwords in the papers' 'unk' mode)."""
    return self.word2idx[UNK]

  def vocabulary(self):
    """word -> id: what two vocabularies must share to encode alike."""
    return self.word2idx

  def encode(self, caption):
    words = split_words(caption)
    if self.stopwords == "drop":
      words = [w for w in words if w not in ENGLISH_STOPWORDS]
    unk = self.word2idx[UNK]
    return [self.word2idx.get(w, unk) for w in words]

  def encode_batch(self, captions, max_len):
    """Encodes captions to (tokens (N, max_len) int32 zero-padded, lengths (N,) int32, truncated count)."""
    tokens = np.zeros((len(captions), max_len), np.int32)
    lengths = np.zeros((len(captions),), np.int32)
    truncated = 0
    for row, caption in enumerate(captions):
      ids = self.encode(caption)
      truncated += len(ids) > max_len
      ids = ids[:max_len]
      tokens[row, :len(ids)] = ids
      lengths[row] = len(ids)
    return tokens, lengths, truncated

  def save(self, path):
    """Writes then renames, so another process (or a restart) never reads a half-written file."""
    idx2word = {str(i): w for w, i in self.word2idx.items()}
    with open(f"{path}.tmp", "w") as f:
      json.dump({"word2idx": self.word2idx, "idx2word": idx2word, "idx": self.size, "stopwords": self.stopwords}, f)
    os.replace(f"{path}.tmp", path)

  @classmethod
  def load(cls, path, stopwords=None):
    """Loads a vocab json (ours or the papers' `*_splits_vocab.json`)."""
    try:
      with open(path) as f:
        data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("word2idx"), dict):
      raise ValueError(f"{path}: expected a JSON object with a 'word2idx' mapping")
    return cls(data["word2idx"], stopwords or data.get("stopwords", "unk"))


class _TransformersTokenizer:
  """A transformers tokenizer (`self._tokenizer`) whose ids start and end with special tokens: encoded, truncated
  with the end token kept last, 0-padded."""

  @property
  def size(self):
    return len(self._tokenizer)

  @property
  def unk_id(self):
    return self._tokenizer.unk_token_id

  def encode_batch(self, captions, max_len):
    """(tokens (N, max_len) int32 0-padded, lengths (N,) int32 incl. the special tokens, truncated count)."""
    full = self._tokenizer(list(captions), add_special_tokens=True)["input_ids"]
    tokens = np.zeros((len(full), max_len), np.int32)
    lengths = np.zeros((len(full),), np.int32)
    truncated = 0
    for row, ids in enumerate(full):
      if len(ids) > max_len:
        truncated += 1
        ids = ids[:max_len - 1] + ids[-1:]  # keep the end token ([SEP], <|endoftext|>) last
      tokens[row, :len(ids)] = ids
      lengths[row] = len(ids)
    return tokens, lengths, truncated


class WordPieceTokenizer(_TransformersTokenizer):
  """BERT WordPiece ids ([CLS] words [SEP], 0-padded) from a local `vocab.txt`, for BERT/MiniLM text towers.

  Uses transformers' `BertTokenizer(vocab=...)` (lowercasing, as the uncased BERT/MiniLM vocabularies expect).
  It refuses a vocabulary that maps ordinary words to [UNK], the symptom of a tokenizer that ignored its file.
  """

  def __init__(self, vocab_file, *, lowercase=True):
    import transformers  # pylint: disable=g-import-not-at-top  (heavy; only BERT-style towers need it)
    try:
      with open(vocab_file) as f:
        words = [line.rstrip("\n") for line in f]
    except OSError as e:
      raise ValueError(f"text.vocab_file={vocab_file!r}: cannot read the WordPiece vocab.txt ({e})") from None
    missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in words]
    if missing:
      raise ValueError(f"{vocab_file}: not a BERT WordPiece vocab.txt (no {', '.join(missing)} entries)")
    self._tokenizer = transformers.BertTokenizer(vocab=str(vocab_file), do_lower_case=lowercase)
    if len(self._tokenizer) != len(words):
      raise ValueError(f"{vocab_file}: the tokenizer loaded {len(self._tokenizer)} of its {len(words)} entries")
    self._words = words

  def vocabulary(self):
    """The vocab.txt entries in id order."""
    return self._words

  def save(self, path):
    """Writes the vocab.txt (then renames, as `WordVocab.save`)."""
    with open(f"{path}.tmp", "w") as f:
      f.writelines(f"{word}\n" for word in self._words)
    os.replace(f"{path}.tmp", path)



CLIP_START, CLIP_END = "<|startoftext|>", "<|endoftext|>"
# open_clip's SimpleTokenizer reads this many merges of its BPE file: 49,152 - 256 bytes - 2 special tokens.
CLIP_MERGES = 48894


class ClipBpeTokenizer(_TransformersTokenizer):
  """CLIP's byte-level BPE ids (<|startoftext|> caption <|endoftext|>, 0-padded) from local files, for CLIP towers.

  `bpe_file` is one of: an HF `vocab.json` with its `merges.txt` beside it; open_clip's merges-only
  `bpe_simple_vocab_16e6.txt.gz` (or a plain merges.txt), whose vocabulary is built as open_clip's SimpleTokenizer
  builds it (the byte symbols, the same with `</w>`, one entry per merge, then the start and end tokens); or the one
  json `save` writes. Encoding is transformers' `CLIPTokenizer` (lowercase, CLIP's pre-tokenisation; open_clip also
  fixes text with ftfy and unescapes HTML). Truncation keeps the end token last and padding is 0, as open_clip's
  `tokenize`. The end token must have the highest id: CLIP text towers pool at the argmax of the ids.
  """

  def __init__(self, bpe_file):
    import transformers  # pylint: disable=g-import-not-at-top  (heavy; only CLIP text towers need it)
    self._vocab, self._merges = _read_clip_bpe(str(bpe_file))
    missing = [t for t in (CLIP_START, CLIP_END) if t not in self._vocab]
    if missing:
      raise ValueError(f"{bpe_file}: not a CLIP BPE vocabulary (no {', '.join(missing)} entries)")
    if self._vocab[CLIP_END] != max(self._vocab.values()):
      raise ValueError(f"{bpe_file}: {CLIP_END} has id {self._vocab[CLIP_END]}, expected the highest id "
                       f"{max(self._vocab.values())} (CLIP text towers pool at the argmax of the ids)")
    self._tokenizer = transformers.CLIPTokenizer(vocab=self._vocab, merges=[tuple(m.split(" ")) for m in self._merges])
    if len(self._tokenizer) != len(self._vocab):
      raise ValueError(f"{bpe_file}: the tokenizer loaded {len(self._tokenizer)} of its {len(self._vocab)} entries")

  def vocabulary(self):
    """{'vocab': token -> id, 'merges': ['a b', ...] by rank}: what two tokenizers must share to encode alike."""
    return {"vocab": self._vocab, "merges": self._merges}

  def save(self, path):
    """Writes `vocabulary()` as one json (then renames, as `WordVocab.save`)."""
    with open(f"{path}.tmp", "w") as f:
      json.dump(self.vocabulary(), f)
    os.replace(f"{path}.tmp", path)


def _read_clip_bpe(path):
  """(vocab, merges) of a `ClipBpeTokenizer` file."""
  try:
    if path.endswith(".json"):
      with open(path) as f:
        data = json.load(f)
      if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object (an HF CLIP vocab.json: token -> id)")
      if set(data) == {"vocab", "merges"}:
        return data["vocab"], data["merges"]
      return data, _read_merges(os.path.join(os.path.dirname(path), "merges.txt"))
    merges = _read_merges(path)[:CLIP_MERGES]
  except OSError as e:
    raise ValueError(f"text.vocab_file={path!r}: cannot read the CLIP BPE files ({e})") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  symbols = list(_bytes_to_unicode().values())
  tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges] + [CLIP_START, CLIP_END]
  return {token: i for i, token in enumerate(tokens)}, merges


def _read_merges(path):
  """The merges ('a b') of a merges.txt, gzipped or not; a first line naming the '#version' is skipped."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  if lines and "#version" in lines[0]:
    lines = lines[1:]
  merges = [line for line in lines if line]
  bad = next((m for m in merges if len(m.split(" ")) != 2), None)
  if bad is not None:
    raise ValueError(f"{path}: {bad!r} is not a BPE merge (two symbols separated by one space)")
  return merges


def _bytes_to_unicode():
  """byte -> the printable character GPT-2/CLIP byte-level BPE writes for it (openai/CLIP `bytes_to_unicode`)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  others = [b for b in range(256) if b not in printable]
  return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}
