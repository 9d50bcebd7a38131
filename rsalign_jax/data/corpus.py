"""Image-caption corpora in the formats they are downloaded in (img2dataset output), read in place with random access.

`dataset.corpus = "webdataset:GLOB"` (uncompressed tar shards of `KEY.jpg` with `KEY.txt` or `KEY.json`) or
`"parquet:GLOB"` (rows with a caption column and image bytes or local image paths), with comma-separated globs for
several, makes the training split read the corpus (`sources.open_split`). Each shard is scanned once into a small
index file in the index directory (per pair: where its image lies and its captions) and rescanned when the shard
changes. The corpus is then a random-access source like a tfds split, so the trainer's seeded order, its rows per
process and its resumable loader state apply unchanged.

The scan decodes every image once (JPEGs at reduced scale: all their data is read, little is computed). Bad shards
(unreadable, truncated, corrupt) and bad pairs (undecodable image, missing or empty caption) are counted and logged
with their files: `on_bad='skip'` leaves them out (a damaged shard keeps its pairs before the damage), 'fail' stops
at the first with an error naming it. `caption_column` / `image_column` name the member extensions (webdataset) or
the columns (parquet); '' picks the first present of CAPTION_KEYS / IMAGE_KEYS. A `.json` caption member holds a
`caption` string or a `captions` list (img2dataset writes `caption`); a parquet caption is a string or a list of
strings; a parquet image is bytes, a Hugging Face image struct (`bytes`, `path`) or a path relative to its file.
"""
import collections
import concurrent.futures
import dataclasses
import glob
import hashlib
import io
import json
import os
import tarfile
import threading

import numpy as np
import PIL.Image

from rsalign_jax.runtime import metric_writer
from rsalign_jax.runtime import progress

log = metric_writer.log

FORMATS = ("webdataset", "parquet")
ON_BAD = ("skip", "fail")
CAPTION_KEYS = {"webdataset": ("txt", "json"), "parquet": ("caption", "text")}
IMAGE_KEYS = {"webdataset": ("jpg", "jpeg", "png", "webp"), "parquet": ("jpg", "image", "png", "webp", "path", "url")}
INDEX_VERSION = 1
_CHECK_SIZE = (64, 64)  # JPEGs are checked at the smallest DCT scale covering this size
_OPEN_FILES = 16  # shard files each reading thread keeps open
_ROW_GROUPS = 2  # parquet row groups' image columns each reading thread keeps
_REPORT_LINES = 20  # bad shards and pairs logged one per line


class BadPair(Exception):
  """A pair the scan leaves out (or stops at); the message is the reason."""


@dataclasses.dataclass(frozen=True)
class Options:
  """What a shard's index depends on besides the shard itself."""
  format: str
  caption_column: str = ""
  image_column: str = ""


def parse_spec(spec):
  """'format:glob[,glob...]' -> (format, sorted files)."""
  fmt, colon, patterns = spec.partition(":")
  if not colon or fmt not in FORMATS or not patterns.strip(","):
    raise ValueError(f"dataset.corpus={spec!r}: expected 'webdataset:GLOB' or 'parquet:GLOB' (comma-separated globs)")
  files = sorted({path for pattern in patterns.split(",") if pattern.strip()
                  for path in glob.glob(os.path.expanduser(pattern.strip())) if os.path.isfile(path)})
  if not files:
    raise FileNotFoundError(f"dataset.corpus={spec!r}: no file matches {patterns!r}")
  return fmt, files


def _pyarrow():
  """(pyarrow, pyarrow.parquet), or a one-line error naming the extra that installs them."""
  try:
    import pyarrow  # pylint: disable=g-import-not-at-top  (optional dependency)
    import pyarrow.parquet  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("a parquet corpus needs pyarrow: pip install 'rsalign_jax[corpus]'") from None
  return pyarrow, pyarrow.parquet


def _one_line(error):
  return " ".join(str(error).split()) or type(error).__name__


def check_image(data, what="image"):
  """Decodes encoded image bytes (JPEG at reduced scale) or raises BadPair saying why they do not decode."""
  try:
    with PIL.Image.open(io.BytesIO(data)) as image:
      image.draft("RGB", _CHECK_SIZE)
      image.load()
  except PIL.UnidentifiedImageError:
    raise BadPair(f"undecodable {what} (not an image format PIL reads)") from None
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds for bad data)
    raise BadPair(f"undecodable {what} ({_one_line(e)})") from None


def _clean_captions(captions):
  captions = [c.strip() for c in captions if c.strip()]
  if not captions:
    raise BadPair("empty caption")
  return captions


def _value_captions(value, what):
  """The captions of a JSON or parquet value: a string, or a list of strings."""
  if isinstance(value, str):
    return _clean_captions([value])
  if isinstance(value, list) and all(isinstance(c, str) for c in value):
    return _clean_captions(value)
  if value is None:
    raise BadPair("no caption (null)")
  raise BadPair(f"{what} is {type(value).__name__}; expected a string or a list of strings")


def _member_captions(data, ext):
  """The captions of a tar caption member: `.json` with `captions` or `caption`, else one UTF-8 caption."""
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError:
    raise BadPair(f"caption .{ext} is not UTF-8 text") from None
  if ext != "json":
    return _clean_captions([text])
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise BadPair(f"caption .json is not valid JSON ({e.msg})") from None
  if not isinstance(value, dict) or not ({"caption", "captions"} & value.keys()):
    raise BadPair("caption .json has no 'caption' or 'captions' key")
  return _value_captions(value.get("captions", value.get("caption")), "caption .json value")


def _pick(chosen, keys, present):
  """The chosen key, else the first of `keys` in `present`; None when absent."""
  if chosen:
    return chosen if chosen in present else None
  return next((key for key in keys if key in present), None)


def _split_name(name):
  """'dir/000123.jpg' -> ('dir/000123', 'jpg'): a webdataset key is the path up to the first dot of the file name."""
  directory, _, base = name.rpartition("/")
  stem, _, ext = base.partition(".")
  return f"{directory}/{stem}" if directory else stem, ext.lower()


def _tar_members(f, size):
  """([(name, offset, size)] of the tar's regular files in order, the damage or None): a complete archive ends with
  two zero blocks; tarfile itself stops silently at a bad or missing header after the first."""
  members = []
  try:
    with tarfile.open(fileobj=f, mode="r:") as tar:
      for member in tar:
        if member.offset_data + member.size > size:
          return members, f"truncated in member {member.name!r} (at byte {size})"
        if member.isfile():
          members.append((member.name, member.offset_data, member.size))
      end = tar.offset
  except tarfile.TarError as e:
    return members, f"unreadable tar after {len(members)} members ({_one_line(e)})"
  f.seek(end)
  if f.read(2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE):
    return members, f"truncated or corrupt at byte {end} (no end-of-archive marker after {len(members)} members)"
  return members, None


def scan_tar(shard, options):
  """The index of one tar shard: its samples (consecutive members sharing a key) with their image spans and captions."""
  pairs, bad = [], []
  with open(shard, "rb") as f:
    if f.read(2) == b"\x1f\x8b":
      return {"pairs": [], "bad": [], "error": "gzip-compressed tar; expected an uncompressed .tar (read in place)"}
    f.seek(0)
    members, error = _tar_members(f, os.path.getsize(shard))
    samples = []
    for name, offset, size in members:
      key, ext = _split_name(name)
      if not ext:
        continue
      if not samples or samples[-1][0] != key:
        samples.append((key, {}))
      samples[-1][1][ext] = (offset, size)
    for key, parts in samples:
      try:
        pairs.append([key, _tar_captions(f, parts, options), list(_tar_image(f, parts, options))])
      except BadPair as e:
        bad.append([key, str(e)])
  return {"pairs": pairs, "bad": bad, "error": error}


def _read_span(f, span):
  f.seek(span[0])
  return f.read(span[1])


def _tar_captions(f, parts, options):
  ext = _pick(options.caption_column, CAPTION_KEYS["webdataset"], parts)
  if ext is None:
    expected = f".{options.caption_column}" if options.caption_column else "a .txt or .json"
    raise BadPair(f"no caption member (expected {expected})")
  return _member_captions(_read_span(f, parts[ext]), ext)


def _tar_image(f, parts, options):
  ext = _pick(options.image_column, IMAGE_KEYS["webdataset"], parts)
  if ext is None:
    expected = f".{options.image_column}" if options.image_column else "a .jpg, .jpeg, .png or .webp"
    raise BadPair(f"no image member (expected {expected})")
  check_image(_read_span(f, parts[ext]), f".{ext}")
  return parts[ext]


def _column(chosen, keys, names, what, shard):
  column = _pick(chosen, keys, names)
  if column is None:
    expected = repr(chosen) if chosen else " or ".join(keys)
    raise ValueError(f"{shard}: no {what} column {expected} (columns: {', '.join(names)}); set "
                     f"dataset.{what}_column")
  return column


def scan_parquet(shard, options):
  """The index of one parquet shard: per row, its image's location (row group, row) or path, and its captions."""
  pa, pq = _pyarrow()
  try:
    parquet = pq.ParquetFile(shard)
  except (pa.ArrowException, OSError) as e:
    return {"pairs": [], "bad": [], "error": f"unreadable parquet file ({_one_line(e)})"}
  names = parquet.schema_arrow.names
  caption = _column(options.caption_column, CAPTION_KEYS["parquet"], names, "caption", shard)
  image = _column(options.image_column, IMAGE_KEYS["parquet"], names, "image", shard)
  key = "key" if "key" in names else None
  pairs, bad, error, first_row = [], [], None, 0
  with parquet:
    for group in range(parquet.num_row_groups):
      try:
        table = parquet.read_row_group(group, columns=list(dict.fromkeys(filter(None, (caption, image, key)))))
      except (pa.ArrowException, OSError) as e:
        error = f"row group {group} unreadable ({_one_line(e)})"
        break
      rows = range(first_row, first_row + table.num_rows)
      keys = map(str, table.column(key).to_pylist()) if key else map(str, rows)
      for row, name, captions, value in zip(range(table.num_rows), keys, table.column(caption).to_pylist(),
                                            table.column(image).to_pylist()):
        try:
          pairs.append([name, _value_captions(captions, f"column {caption!r}"),
                        _parquet_image(value, shard, [group, row])])
        except BadPair as e:
          bad.append([name, str(e)])
      first_row += table.num_rows
  return {"pairs": pairs, "bad": bad, "error": error, "image_column": image}


def _parquet_image(value, shard, location):
  """`location` for image bytes in the file, or the absolute path of an image file (checked either way)."""
  if isinstance(value, dict):  # a Hugging Face datasets image
    value = value.get("bytes") or value.get("path")
  if isinstance(value, bytes):
    check_image(value)
    return location
  if not isinstance(value, str) or not value:
    raise BadPair("no image (empty image value)")
  path = os.path.join(os.path.dirname(os.path.abspath(shard)), value.removeprefix("file://"))
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise BadPair(f"image file {value!r} unreadable ({e.strerror})") from None
  check_image(data, f"image file {value!r}")
  return path


def _index_path(index_dir, shard, options):
  key = json.dumps([os.path.realpath(shard), dataclasses.asdict(options), INDEX_VERSION])
  return os.path.join(index_dir, f"{os.path.basename(shard)}.{hashlib.sha256(key.encode()).hexdigest()[:16]}.json")


def _stamp(shard):
  stat = os.stat(shard)
  return [stat.st_size, stat.st_mtime_ns]


def _read_index(path, stamp):
  """The index file's content if it was written for this version of the shard, else None."""
  try:
    with open(path) as f:
      index = json.load(f)
  except (OSError, ValueError):
    return None
  return index if isinstance(index, dict) and index.get("stamp") == stamp else None


def _write_index(path, index):
  """Written whole under a temporary name and renamed, so processes scanning at once never read half a file."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  temporary = f"{path}.{os.getpid()}.tmp"
  with open(temporary, "w") as f:
    json.dump(index, f)
  os.replace(temporary, path)


def shard_indexes(files, options, index_dir):
  """The index of each shard: read from `index_dir`, or scanned (shards in parallel) and written there."""
  paths = [_index_path(index_dir, shard, options) for shard in files]
  stamps = [_stamp(shard) for shard in files]
  indexes = [_read_index(path, stamp) for path, stamp in zip(paths, stamps)]
  missing = [i for i, index in enumerate(indexes) if index is None]
  if missing:
    log("indexing %d of %d %s shards into %s", len(missing), len(files), options.format, index_dir)
    scan = scan_tar if options.format == "webdataset" else scan_parquet
    with progress.Progress(f"indexing {options.format} shards", len(missing)) as bar, \
        concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:  # PIL and file reads release the GIL
      for i, index in zip(missing, pool.map(lambda i: scan(files[i], options), missing)):
        indexes[i] = {"stamp": stamps[i], **index}
        _write_index(paths[i], indexes[i])
        bar.update()
  return indexes


@dataclasses.dataclass(frozen=True)
class Report:
  """What the scan of a corpus found: the pairs kept, and the bad shards and pairs with their file and reason."""
  shards: int
  pairs: int
  bad_shards: tuple  # (shard, reason)
  bad_pairs: tuple  # (shard, pair key, reason)

  @classmethod
  def of(cls, files, indexes):
    return cls(len(files), sum(len(index["pairs"]) for index in indexes),
               tuple((shard, index["error"]) for shard, index in zip(files, indexes) if index["error"]),
               tuple((shard, key, reason) for shard, index in zip(files, indexes) for key, reason in index["bad"]))

  def problems(self):
    """One line per bad shard and bad pair, in file order."""
    lines = [(shard, 0, f"{shard}: pair {key!r}: {reason}") for shard, key, reason in self.bad_pairs]
    lines += [(shard, 1, f"{shard}: {reason}") for shard, reason in self.bad_shards]
    return [line for _, _, line in sorted(lines, key=lambda line: line[:2])]


def _log_report(spec, report, problems, index_dir):
  left_out = (f"; left out (dataset.on_bad='skip'): {len(report.bad_shards)} bad shard(s), {len(report.bad_pairs)} "
              f"bad pair(s)" if problems else "")
  log("corpus %s: %d pairs from %d shards%s", spec, report.pairs, report.shards, left_out)
  for line in problems[:_REPORT_LINES]:
    log("  left out: %s", line)
  if len(problems) > _REPORT_LINES:
    log("  ... and %d more (listed in the index files in %s)", len(problems) - _REPORT_LINES, index_dir)


def open_corpus(spec, *, index_dir, caption_column="", image_column="", on_bad="skip"):
  """The corpus `spec` ('webdataset:GLOB' or 'parquet:GLOB') as a `CorpusSource`, its shards indexed into
  `index_dir` on first use; bad shards and pairs are logged and left out (on_bad='skip') or an error ('fail')."""
  if on_bad not in ON_BAD:
    raise ValueError(f"dataset.on_bad={on_bad!r}: expected one of {ON_BAD}")
  fmt, files = parse_spec(spec)
  if fmt == "parquet":
    _pyarrow()
  indexes = shard_indexes(files, Options(fmt, caption_column, image_column), index_dir)
  report = Report.of(files, indexes)
  problems = report.problems()
  if on_bad == "fail" and problems:
    raise ValueError(f"{problems[0]}; dataset.on_bad='fail' (set 'skip' to leave bad shards and pairs out)")
  _log_report(spec, report, problems, index_dir)
  if not report.pairs:
    raise ValueError(f"dataset.corpus={spec!r}: no readable pair in {len(files)} shard(s)"
                     + (f" (first problem: {problems[0]})" if problems else ""))
  return CorpusSource(fmt, files, indexes, report)


class _ThreadCache(threading.local):
  """Each thread's least-recently-used open files or row groups: no locks, and what a thread evicts only it used."""

  def __init__(self, size):
    super().__init__()
    self.size, self.items = size, collections.OrderedDict()

  def get(self, key, make):
    value = self.items.pop(key, None)
    value = make() if value is None else value
    self.items[key] = value
    if len(self.items) > self.size:
      evicted = self.items.popitem(last=False)[1]
      if hasattr(evicted, "close"):
        evicted.close()
    return value


class CorpusSource:
  """Random-access records {image (encoded bytes), captions, image_id, filename} of an indexed corpus, numbered in
  shard order. Picklable for grain workers: open files are per thread of each process."""

  def __init__(self, fmt, shards, indexes, report):
    self.format, self.shards, self.report = fmt, list(shards), report
    names, captions, counts, shard_of, locations, paths = [], [], [], [], [], []
    self._image_columns = [index.get("image_column") for index in indexes]
    for s, index in enumerate(indexes):
      for name, texts, location in index["pairs"]:
        names.append(name)
        captions.extend(texts)
        counts.append(len(texts))
        shard_of.append(s)
        locations.append((-1, -1) if isinstance(location, str) else location)
        paths.append(location if isinstance(location, str) else "")
    self._names, self._captions = names, captions
    self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    self._shard = np.asarray(shard_of, np.int32)
    self._locations = np.asarray(locations, np.int64).reshape(-1, 2)
    self._paths = paths if any(paths) else None
    self._caches()

  def _caches(self):
    self._files = _ThreadCache(_OPEN_FILES)
    self._row_groups = _ThreadCache(_ROW_GROUPS)

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ("_files", "_row_groups")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._caches()

  def __len__(self):
    return len(self._names)

  def __repr__(self):
    return f"CorpusSource({self.format}, shards={len(self.shards)}, pairs={len(self)})"

  def filename(self, position):
    return f"{os.path.basename(self.shards[self._shard[position]])}/{self._names[position]}"

  def caption_index(self):
    """(captions, record of each caption, image ids, filenames) from the index, without reading any image."""
    record = np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self._starts))
    return (self._captions, record, np.arange(len(self), dtype=np.int64),
            [self.filename(position) for position in range(len(self))])

  def __getitem__(self, position):
    position = int(position)
    if not 0 <= position < len(self):
      raise IndexError(f"record {position} of a corpus of {len(self)} pairs")
    return {"image": self._image(position), "captions": self._captions[self._starts[position]:
                                                                       self._starts[position + 1]],
            "image_id": position, "filename": self.filename(position)}

  def _image(self, position):
    shard = int(self._shard[position])
    if self._paths is not None and self._paths[position]:
      with open(self._paths[position], "rb") as f:
        return f.read()
    first, second = (int(v) for v in self._locations[position])
    if self.format == "parquet":
      value = self._row_group(shard, first)[second].as_py()
      return value["bytes"] if isinstance(value, dict) else value
    path = self.shards[shard]
    data = os.pread(self._files.get(path, lambda: open(path, "rb", buffering=0)).fileno(), second, first)
    if len(data) != second:
      raise OSError(f"{path}: shorter than when it was indexed; delete its index file to rescan it")
    return data

  def _row_group(self, shard, group):
    """The image column of one row group of a parquet shard (an arrow array)."""
    def read():
      _, pq = _pyarrow()
      path = self.shards[shard]
      parquet = self._files.get(path, lambda: pq.ParquetFile(path))
      return parquet.read_row_group(group, columns=[self._image_columns[shard]]).column(0)
    return self._row_groups.get((shard, group), read)
