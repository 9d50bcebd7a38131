"""Corpora read in place (`rsalign_jax.data.corpus`): webdataset tar shards and parquet files the tests write, read
as a random-access source over 2 simulated processes, resumed after a kill, with bad shards and images reported."""
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import ml_collections
import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import disabled, runlocal_config
from rsalign_jax.data import corpus, pipeline, sources
from rsalign_jax.data.sources import CaptionIndex
from rsalign_jax.data.tokenizers import WordVocab

PP = "decode|resize(8)"
WORDS = ("river", "field", "road", "roof", "tree", "lake")


def shade(i):
  return (i * 5) % 250


def jpeg(i, size=16):
  buf = io.BytesIO()
  PIL.Image.fromarray(np.full((size, size, 3), shade(i), np.uint8)).save(buf, "JPEG", quality=95)
  return buf.getvalue()


def caption(i):
  """Unique per pair (its number in words), from a small vocabulary (a runlocal vocabulary keeps words seen 5 times)."""
  return f"{WORDS[i % 6]} {WORDS[i // 6 % 6]} {WORDS[i // 36 % 6]}"


PAIR_OF_CAPTION = {caption(i): i for i in range(6**3)}


def write_tar(path, members, cut=None):
  """A tar of (name, bytes) members; `cut` bytes from its end removed (a truncated download)."""
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  if cut:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - cut])
  return path


def pair_members(i, kind="txt"):
  """The members of pair i as img2dataset writes them: KEY.jpg, KEY.txt or KEY.json (caption and metadata)."""
  key = f"{i:09d}"
  text = (caption(i).encode() if kind == "txt" else
          json.dumps({"caption": caption(i), "key": key, "status": "success"}).encode())
  return [(f"{key}.jpg", jpeg(i)), (f"{key}.{kind}", text)]


def write_webdataset(folder, pairs=48, per_shard=16):
  folder.mkdir(exist_ok=True)
  for shard in range(pairs // per_shard):
    kind = ("txt", "json")[shard % 2]
    members = [m for i in range(shard * per_shard, (shard + 1) * per_shard) for m in pair_members(i, kind)]
    write_tar(folder / f"{shard:05d}.tar", members)
  return f"webdataset:{folder}/*.tar"


def write_parquet(folder, pairs=48, per_file=16, paths=False):
  """Parquet files with img2dataset's columns (key, caption, jpg bytes; 4-row groups), or image paths instead."""
  folder.mkdir(exist_ok=True)
  for shard in range(pairs // per_file):
    numbers = range(shard * per_file, (shard + 1) * per_file)
    columns = {"key": [f"{i:09d}" for i in numbers], "caption": [caption(i) for i in numbers]}
    if paths:
      (folder / "images").mkdir(exist_ok=True)
      for i in numbers:
        (folder / "images" / f"{i}.jpg").write_bytes(jpeg(i))
      columns["path"] = [f"images/{i}.jpg" for i in numbers]
    else:
      columns["jpg"] = [jpeg(i) for i in numbers]
    pq.write_table(pa.table(columns), folder / f"{shard:05d}.parquet", row_group_size=4)
  return f"parquet:{folder}/*.parquet"


CORPORA = {"webdataset": write_webdataset, "parquet": write_parquet,
           "parquet_paths": lambda folder: write_parquet(folder, paths=True)}


@pytest.fixture(params=sorted(CORPORA))
def corpus_spec(request, tmp_path):
  return CORPORA[request.param](tmp_path / "corpus")


def open_corpus(spec, tmp_path, **options):
  return corpus.open_corpus(spec, index_dir=str(tmp_path / "index"), **options)


def pair_number(record):
  return PAIR_OF_CAPTION[record["captions"][0]]


def make_items(source, *, process_index=0, process_count=1, batch=8, seed=5):
  index = CaptionIndex.read(source)
  vocab = WordVocab.build(index.captions, min_count=1, stopwords="keep")
  tokens, lengths, _ = vocab.encode_batch(index.captions, 4)
  return pipeline.TrainItems(source, index, tokens, lengths, sampling="per_caption", global_batch_size=batch,
                             process_index=process_index, process_count=process_count, seed=seed, name="corpus")


def take(items, n, state=None):
  iterator = iter(pipeline.make_train_loader(items, pp_spec=PP, seed=5))
  if state is not None:
    iterator.set_state(state)
  return [next(iterator) for _ in range(n)], iterator.get_state()


def test_records_hold_each_pairs_image_and_caption(corpus_spec, tmp_path):
  source = open_corpus(corpus_spec, tmp_path)
  assert len(source) == 48 and source.report.pairs == 48 and not source.report.bad_pairs
  for position in (0, 17, 47):
    record = source[position]
    assert record["captions"] == [caption(position)] and record["image_id"] == position
    with PIL.Image.open(io.BytesIO(record["image"])) as image:
      assert abs(np.asarray(image).mean() - shade(position)) < 2
  index = CaptionIndex.read(source)
  assert index.captions == [caption(i) for i in range(48)] and index.num_images == 48
  assert index.filenames[17] == "00001." + ("tar/000000017" if corpus_spec.startswith("webdataset") else
                                            "parquet/000000017")


def test_json_captions_lists_and_a_chosen_caption_member(tmp_path):
  members = [("a.jpg", jpeg(1)), ("a.json", json.dumps({"captions": ["one", " two "]}).encode()),
             ("a.txt", b"plain"), ("b.png", jpeg(2)), ("b.json", json.dumps({"caption": "three"}).encode())]
  write_tar(tmp_path / "s.tar", members)
  source = open_corpus(f"webdataset:{tmp_path}/s.tar", tmp_path, caption_column="json")
  assert [source[i]["captions"] for i in range(2)] == [["one", "two"], ["three"]]
  assert open_corpus(f"webdataset:{tmp_path}/s.tar", tmp_path)[0]["captions"] == ["plain"]  # .txt comes first


def test_two_processes_read_each_pair_once_per_epoch(corpus_spec, tmp_path):
  source = open_corpus(corpus_spec, tmp_path)
  steps = 48 // 8
  read = []
  for process in (0, 1):
    batches, _ = take(make_items(source, process_index=process, process_count=2), steps)
    ids = np.concatenate([b["image_id"] for b in batches])
    for batch in batches:  # each row's image is its pair's
      assert np.all(np.abs(batch["image"].mean(axis=(1, 2, 3)) - [shade(i) for i in batch["image_id"]]) < 2)
    read.append(ids.tolist())
  assert len(read[0]) == len(read[1]) == 24 and not set(read[0]) & set(read[1])
  assert sorted(read[0] + read[1]) == list(range(48))
  whole, _ = take(make_items(source), steps)  # the two processes' rows are the rows of the one-process batches
  np.testing.assert_array_equal(np.stack([b["image_id"] for b in whole]),
                                np.concatenate([np.reshape(ids, (steps, 4)) for ids in read], axis=1))


CHILD = """
import os, sys, time
sys.path.insert(0, {tests!r})
import test_corpus_sources as t
items = t.make_items(t.corpus.open_corpus({spec!r}, index_dir={index!r}))
iterator = iter(t.pipeline.make_train_loader(items, pp_spec=t.PP, seed=5))
for step in range(1, 1000):
  next(iterator)
  if step == {k}:  # the loader state a checkpoint saves, written whole; the parent kills this process after it
    with open({state!r} + ".tmp", "wb") as f:
      f.write(iterator.get_state())
    os.replace({state!r} + ".tmp", {state!r})
  time.sleep(0.05)
"""


def test_a_killed_run_resumes_at_the_exact_next_batch(corpus_spec, tmp_path):
  """A process reading the corpus is killed after saving its loader state at batch k; this process, opening the
  corpus from the index files the killed one wrote and restoring that state, reads the batches of an uninterrupted
  run."""
  state_file, k = tmp_path / "loader_state.json", 3
  child = subprocess.Popen([sys.executable, "-c", CHILD.format(
      tests=os.path.dirname(__file__), spec=corpus_spec, index=str(tmp_path / "index"), k=k, state=str(state_file))])
  try:
    deadline = time.monotonic() + 120
    while not state_file.exists() and child.poll() is None and time.monotonic() < deadline:
      time.sleep(0.1)
    assert state_file.exists(), f"the child exited with {child.returncode} before saving its state"
  finally:
    child.send_signal(signal.SIGKILL)
    child.wait()
  straight, _ = take(make_items(open_corpus(corpus_spec, tmp_path)), k + 4)
  resumed, _ = take(make_items(open_corpus(corpus_spec, tmp_path)), 4, state_file.read_bytes())
  for a, b in zip(straight[k:], resumed):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def write_bad_webdataset(folder):
  """Shard 0 intact; shard 1 with a corrupt JPEG, a truncated JPEG and a pair without caption; shard 2 truncated
  inside its third pair; shard 3 not a tar."""
  folder.mkdir()
  write_tar(folder / "0.tar", [m for i in range(4) for m in pair_members(i)])
  corrupt = [("000000004.jpg", b"\xff\xd8 not a jpeg"), ("000000004.txt", b"corrupt")]
  truncated = [("000000005.jpg", jpeg(5)[:-40]), ("000000005.txt", b"truncated")]
  write_tar(folder / "1.tar", corrupt + truncated + pair_members(6) + [("000000007.jpg", jpeg(7))])
  cut = write_tar(folder / "2.tar", [m for i in range(8, 11) for m in pair_members(i)])
  data = cut.read_bytes()
  cut.write_bytes(data[:data.index(jpeg(10)) + 100])
  (folder / "3.tar").write_bytes(b"not a tar at all" * 64)
  return f"webdataset:{folder}/*.tar"


def test_bad_shards_and_images_are_counted_logged_and_left_out(tmp_path, monkeypatch):
  lines = []
  monkeypatch.setattr(corpus, "log", lambda message, *args: lines.append(message % args))
  source = open_corpus(write_bad_webdataset(tmp_path / "bad"), tmp_path)
  assert [pair_number(source[i]) for i in range(len(source))] == [0, 1, 2, 3, 6, 8, 9]
  report = source.report
  assert [(os.path.basename(s), k) for s, k, _ in report.bad_pairs] == [
      ("1.tar", "000000004"), ("1.tar", "000000005"), ("1.tar", "000000007")]
  assert report.bad_pairs[0][2] == "undecodable .jpg (not an image format PIL reads)"
  assert report.bad_pairs[1][2].lower().startswith("undecodable .jpg (truncated")
  assert "no caption member" in report.bad_pairs[2][2]
  assert [os.path.basename(s) for s, _ in report.bad_shards] == ["2.tar", "3.tar"]
  summary = next(line for line in lines if line.startswith("corpus "))
  assert "7 pairs from 4 shards; left out (dataset.on_bad='skip'): 2 bad shard(s), 3 bad pair(s)" in summary
  assert [line for line in lines if line.startswith("  left out: ")] == [f"  left out: {p}" for p in report.problems()]
  problems = [line.split(": ")[1] for line in report.problems()]
  assert problems[:4] == ["pair '000000004'", "pair '000000005'", "pair '000000007'", "truncated in member "
                          f"'000000010.jpg' (at byte {os.path.getsize(tmp_path / 'bad' / '2.tar')})"]
  assert problems[4].startswith("unreadable tar after 0 members (")


def test_bad_parquet_files_and_images_are_counted_and_left_out(tmp_path):
  folder = tmp_path / "bad"
  write_parquet(folder, pairs=8, per_file=4)
  table = pq.read_table(folder / "00000.parquet")
  images = table.column("jpg").to_pylist()
  images[2] = images[2][:len(images[2]) // 2]
  pq.write_table(table.set_column(2, "jpg", pa.array(images, pa.binary())), folder / "00000.parquet",
                 row_group_size=4)
  data = (folder / "00001.parquet").read_bytes()
  (folder / "00001.parquet").write_bytes(data[:len(data) - 30])  # the footer is gone
  source = open_corpus(f"parquet:{folder}/*.parquet", tmp_path)
  assert [pair_number(source[i]) for i in range(len(source))] == [0, 1, 3]
  assert [(os.path.basename(s), k) for s, k, _ in source.report.bad_pairs] == [("00000.parquet", "000000002")]
  assert [os.path.basename(s) for s, _ in source.report.bad_shards] == ["00001.parquet"]
  assert source.report.bad_shards[0][1].startswith("unreadable parquet file")
  with pytest.raises(ValueError, match=rf"^{re.escape(str(folder))}/00000.parquet: pair '000000002': undecodable "
                                       r"image \(.*\); dataset.on_bad='fail'"):
    open_corpus(f"parquet:{folder}/*.parquet", tmp_path, on_bad="fail")


def test_fail_mode_stops_at_the_first_bad_pair_or_shard_in_one_line(tmp_path):
  spec = write_bad_webdataset(tmp_path / "bad")
  with pytest.raises(ValueError) as error:
    open_corpus(spec, tmp_path, on_bad="fail")
  message = str(error.value)
  assert "\n" not in message and message.startswith(f"{tmp_path}/bad/1.tar: pair '000000004': undecodable .jpg")
  assert message.endswith("; dataset.on_bad='fail' (set 'skip' to leave bad shards and pairs out)")
  os.remove(tmp_path / "bad" / "1.tar")
  with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path))}/bad/2.tar: truncated in member "
                                       r"'000000010.jpg' \(at byte "):
    open_corpus(spec, tmp_path, on_bad="fail")


def test_the_index_is_built_once_and_rebuilt_when_a_shard_changes(tmp_path, monkeypatch):
  spec = write_webdataset(tmp_path / "corpus")
  open_corpus(spec, tmp_path)
  assert len(os.listdir(tmp_path / "index")) == 3
  scanned = []
  scan = corpus.scan_tar
  monkeypatch.setattr(corpus, "scan_tar", lambda shard, options: scanned.append(shard) or scan(shard, options))
  assert len(open_corpus(spec, tmp_path)) == 48 and not scanned
  write_tar(tmp_path / "corpus" / "00001.tar", [m for i in range(16, 20) for m in pair_members(i)])
  assert len(open_corpus(spec, tmp_path)) == 36 and [os.path.basename(s) for s in scanned] == ["00001.tar"]


def test_mistakes_in_the_options_are_named(tmp_path):
  spec = write_parquet(tmp_path / "corpus", pairs=4, per_file=4)
  with pytest.raises(ValueError, match=r"^dataset.corpus='tar:x': expected 'webdataset:GLOB' or 'parquet:GLOB'"):
    open_corpus("tar:x", tmp_path)
  with pytest.raises(FileNotFoundError, match=rf"^dataset.corpus='webdataset:{re.escape(str(tmp_path))}/none/\*.tar': "
                                              r"no file"):
    open_corpus(f"webdataset:{tmp_path}/none/*.tar", tmp_path)
  with pytest.raises(ValueError, match=r"^dataset.on_bad='drop': expected one of \('skip', 'fail'\)"):
    open_corpus(spec, tmp_path, on_bad="drop")
  with pytest.raises(ValueError, match=r"00000.parquet: no caption column 'title' \(columns: key, caption, jpg\); "
                                       r"set dataset.caption_column$"):
    open_corpus(spec, tmp_path, caption_column="title")


def test_a_parquet_corpus_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
  spec = write_parquet(tmp_path / "corpus", pairs=4, per_file=4)
  monkeypatch.setitem(sys.modules, "pyarrow", None)
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  with pytest.raises(ImportError, match=r"^a parquet corpus needs pyarrow: pip install 'rsalign_jax\[corpus\]'$"):
    open_corpus(spec, tmp_path)


def test_the_training_split_reads_the_corpus_and_val_test_the_dataset(tmp_path):
  spec = write_webdataset(tmp_path / "corpus")
  config = ml_collections.ConfigDict(dict(name="synthetic_rs/tiny", data_dir=str(tmp_path / "tfds"), manual_dir="",
                                          train_split="train", val_split="val", test_split="test", corpus=spec))
  source = sources.open_split(config, "train")
  assert isinstance(source, corpus.CorpusSource) and len(source) == 48
  assert os.listdir(tmp_path / "tfds" / "corpus_index")
  config.captions = "metadata_prompt"
  with pytest.raises(ValueError, match="dataset.captions='metadata_prompt': dataset 'webdataset:"):
    sources.open_split(config, "train")


def test_a_runlocal_training_run_on_a_webdataset_corpus(tmp_path_factory):
  from rsalign_jax import train  # pylint: disable=g-import-not-at-top  (after conftest's device flags)
  folder = tmp_path_factory.mktemp("corpus")
  spec = write_webdataset(folder / "shards", pairs=64)
  config = runlocal_config(tmp_path_factory, **{"dataset.corpus": spec}, **disabled("random_init", "val_gallery"))
  assert train.train_and_evaluate(config, str(folder / "workdir"))["total_steps"] == 4
  assert "4" in os.listdir(folder / "workdir" / "checkpoints")
  # 64 pairs of batch 16 (the synthetic train split has 64 x 5 captions), and a vocabulary of the corpus' words
  assert json.loads((folder / "workdir" / "inputs.json").read_text())["steps_per_epoch"] == 4
  assert set(WORDS) <= json.loads((folder / "workdir" / "vocab.json").read_text())["word2idx"].keys()
