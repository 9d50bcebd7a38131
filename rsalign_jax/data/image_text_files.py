"""Your own image-caption data: one JSON-lines or CSV file per split, one row per image, images next to them.

`manual_dir` holds `train.jsonl` (or `train.csv`), and optionally `val` and `test` files of the same kind, and the
images. A JSON-lines row is an object
    {"image": "relative/path.jpg", "captions": ["...", "..."], "label": "beach"}
with `caption` (one string) instead of `captions` allowed and `label` optional. A CSV file has a header row with the
columns `image`, `caption` or `captions` (a JSON list of strings), and optionally `label`. Blank lines of a
JSON-lines file are skipped. Paths are relative to `manual_dir`.

Every image gets exactly 5 captions, by cycling its own captions when it has fewer and keeping the first 5 when it
has more; empty captions are replaced the same way (see `karpathy`, which also counts each repair). `label` is kept
as text (a ClassLabel would need the class list before the files are read); "" when absent. `image_id` numbers the
images in file order: train, then val, then test. Splits: those with a file, plus `train_papers`/`val_papers`, the
papers' re-split of train and val (see `karpathy.papers_split`).
"""
import csv
import io
import json
import pathlib
import reprlib

import tensorflow_datasets as tfds

from rsalign_jax.data import karpathy

FIELDS = ("image", "captions", "caption", "label")
FORMATS = ("jsonl", "csv")


def _jsonl_rows(path):
  """(line number, row object) for each non-blank line."""
  for number, line in enumerate(karpathy.read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{number}: malformed JSON at column {e.colno}: {e.msg}") from None
    if not isinstance(row, dict):
      raise ValueError(f"{path}:{number}: expected a JSON object, got {reprlib.repr(row)}")
    yield number, row


def _csv_rows(path):
  """(line number, row object) for each CSV row; a `captions` cell is parsed as a JSON list."""
  reader = csv.DictReader(io.StringIO(karpathy.read_text(path), newline=""))
  columns = reader.fieldnames or []
  unknown = [c for c in columns if c not in FIELDS]
  if unknown or "image" not in columns or ("caption" in columns) == ("captions" in columns):
    raise ValueError(f"{path}:1: header {columns}; expected the columns image, caption or captions, and optionally "
                     f"label")
  for row in reader:
    number = reader.line_num
    if None in row or None in row.values():
      raise ValueError(f"{path}:{number}: expected {len(columns)} columns, as in the header {columns}")
    if "captions" in row:
      try:
        row["captions"] = json.loads(row["captions"])
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: column 'captions' is not a JSON list of strings ({e.msg})") from None
    if not row.get("label"):
      row.pop("label", None)
    yield number, row


def _row_record(row, where, manual_dir, image_id):
  unknown = sorted(set(row) - set(FIELDS))
  if unknown:
    raise ValueError(f"{where}: unknown field(s) {unknown}; expected image, captions or caption, and optionally label")
  image = row.get("image")
  if not isinstance(image, str) or not image or pathlib.PurePath(image).is_absolute():
    raise ValueError(f"{where}: field 'image' is {reprlib.repr(image)}; expected an image path relative to "
                     f"{manual_dir}")
  if "caption" in row and "captions" in row:
    raise ValueError(f"{where}: both 'caption' and 'captions'; give one")
  if "captions" in row:
    texts = row["captions"]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
      raise ValueError(f"{where}: field 'captions' is {reprlib.repr(texts)}; expected a non-empty list of strings")
  elif "caption" in row:
    if not isinstance(row["caption"], str):
      raise ValueError(f"{where}: field 'caption' is {reprlib.repr(row['caption'])}; expected a string")
    texts = [row["caption"]]
  else:
    raise ValueError(f"{where}: missing field 'captions' (a list of strings) or 'caption' (a string)")
  label = row.get("label", "")
  if not isinstance(label, (str, int)) or isinstance(label, bool):
    raise ValueError(f"{where}: field 'label' is {reprlib.repr(label)}; expected a string or an integer")
  captions, repairs = karpathy.five_captions(texts, where)
  return karpathy.Record(manual_dir / image, image, image_id, captions, (), {"label": str(label)}, repairs)


def split_files(manual_dir):
  """{split: its file} for the official splits that have one; an error when a split has two or none has any."""
  files = {}
  for split in karpathy.OFFICIAL_SPLITS:
    found = [manual_dir / f"{split}.{fmt}" for fmt in FORMATS if (manual_dir / f"{split}.{fmt}").is_file()]
    if len(found) > 1:
      raise ValueError(f"{manual_dir}: both {found[0].name} and {found[1].name}; keep one file per split")
    if found:
      files[split] = found[0]
  if not files:
    raise FileNotFoundError(f"{manual_dir}: no split file; expected train.jsonl or train.csv (and optionally val and "
                            f"test files)")
  return files


def read_split_files(manual_dir):
  """Reads every split file of `manual_dir` into {split: [Record]}."""
  manual_dir = pathlib.Path(manual_dir)
  splits, image_id = {}, 0
  for split, path in split_files(manual_dir).items():
    rows = _jsonl_rows(path) if path.suffix == ".jsonl" else _csv_rows(path)
    splits[split] = []
    for number, row in rows:
      splits[split].append(_row_record(row, f"{path}:{number}", manual_dir, image_id))
      image_id += 1
  return splits


class ImageTextFiles(karpathy.CaptionDatasetBuilder):
  """Your own data from JSON-lines/CSV split files; registered by tfds as `image_text_files`."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Set dataset.manual_dir to a folder holding train.jsonl or train.csv (optionally val and test files too) and the
  images they name by relative path. JSON lines: {"image": "a/b.jpg", "captions": ["...", ...], "label": "..."}
  ("caption": "..." for one caption; label optional). CSV: header image,caption|captions[,label].
  """

  def _label_features(self):
    return {"label": tfds.features.Text()}

  def _read_splits(self, manual_dir):
    return read_split_files(manual_dir)
