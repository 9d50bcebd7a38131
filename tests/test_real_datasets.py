"""Tests of the real-dataset builders on small fixtures written in each dataset's published layout.

Every builder (rsicd, rsitmd, ucm_captions, sydney_captions, amfmn_splits, image_text_files) is built from files the
tests write into tmp_path; every bad-input path is checked with its message. The real RSICD captions on AID images
(../shared/data/rsicd_aid150) and the real AMFMN split files are used when present.
"""
import io
import json
import pathlib
import time

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from rsalign_jax.data import amfmn_splits
from rsalign_jax.data import image_text_files
from rsalign_jax.data import karpathy
from rsalign_jax.data import rsicd
from rsalign_jax.data import rsitmd
from rsalign_jax.data import sources
from rsalign_jax.data import sydney_captions
from rsalign_jax.data import ucm_captions

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared/data"
RSICD_AID150 = SHARED_DATA / "rsicd_aid150"
AMFMN_SPLITS = SHARED_DATA / "amfmn_splits"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_image(path, fmt, value):
  """A 6x8 RGB image: grey `value` with one red pixel. Returns its pixels."""
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = np.full((6, 8, 3), value, np.uint8)
  pixels[0, 0] = (255, 0, 0)
  Image.fromarray(pixels).save(path, format=fmt)
  return pixels


def _entry(filename, imgid, split, captions, **extra):
  sentids = list(range(5 * imgid, 5 * imgid + len(captions)))
  sentences = [{"tokens": c.split(), "raw": c, "imgid": imgid, "sentid": s} for c, s in zip(captions, sentids)]
  return {"filename": filename, "imgid": imgid, "split": split, "sentences": sentences, "sentids": sentids, **extra}


def _write_karpathy(root, json_name, image_dir, entries, fmt):
  """Writes a Karpathy-layout dataset; returns {filename: pixels}."""
  pixels = {e["filename"]: _write_image(root / image_dir / e["filename"], fmt, 20 * i % 256)
            for i, e in enumerate(entries)}
  (root / json_name).write_text(json.dumps({"images": entries, "dataset": "fixture"}))
  return pixels


def _build(builder_cls, manual_dir, data_dir, config=None):
  builder = builder_cls(config=config, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, try_download_gcs=False))
  return builder


def _read(builder, split):
  source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
  return [source[i] for i in range(len(source))]


def _texts(values):
  return [sources.as_text(v) for v in values]


def _decode(image_bytes):
  with Image.open(io.BytesIO(image_bytes)) as image:
    return np.asarray(image.convert("RGB"))


RSICD_ENTRIES = [
    _entry("airport_1.jpg", 0, "train", ["a1 .", "a2 .", "a3 .", "a4 .", "a5 ."]),
    _entry("beach_2.jpg", 1, "train", ["b1 .", "b2 .", "b3 ."]),
    _entry("00001.jpg", 2, "train", ["n1", "n2", "n3", "n4", "n5", "n6"]),
    _entry("river_3.jpg", 3, "val", ["r1", "  ", "r2", "r3", "r4"]),
    _entry("viaduct_4.jpg", 4, "test", ["v1", "v2", "v3", "v4", "v5"]),
    _entry("port_5.jpg", 5, "test", ["p1", "p2", "p3", "p4", "p5"]),
]


@pytest.fixture
def rsicd_dir(tmp_path):
  root = tmp_path / "RSICD"
  _write_karpathy(root, "dataset_rsicd.json", "RSICD_images", RSICD_ENTRIES, "JPEG")
  return root


def test_every_builder_has_the_feature_names_the_trainer_reads(tmp_path):
  common = {"image", "captions", "image_id", "filename", "keywords"}
  for builder_cls, extra in [(rsicd.Rsicd, {"scene"}), (rsitmd.Rsitmd, {"scene"}),
                             (ucm_captions.UcmCaptions, {"scene"}), (sydney_captions.SydneyCaptions, set()),
                             (amfmn_splits.AmfmnSplits, {"scene"}), (image_text_files.ImageTextFiles, {"label"})]:
    assert set(builder_cls(data_dir=tmp_path).info.features) == common | extra, builder_cls.name
  assert [c.name for c in rsicd.Rsicd.BUILDER_CONFIGS] == ["default", "skip_missing_images"]
  assert [c.name for c in amfmn_splits.AmfmnSplits.BUILDER_CONFIGS] == [
      f"{name}{skip}" for name in ("rsicd", "rsitmd", "ucm", "sydney") for skip in ("", "_skip_missing_images")]
  assert set(amfmn_splits.AmfmnSplits(config="sydney", data_dir=tmp_path).info.features) == common


def test_rsicd_builds_through_sources_with_official_splits_and_repairs(rsicd_dir, tmp_path):
  config = ml_collections.ConfigDict(dict(name="rsicd", data_dir=str(tmp_path / "data"), manual_dir=str(rsicd_dir)))
  train = sources.open_split(config, "train")
  records = [train[i] for i in range(len(train))]
  assert [int(r["image_id"]) for r in records] == [0, 1, 2]
  assert _texts(r["filename"] for r in records) == ["airport_1.jpg", "beach_2.jpg", "00001.jpg"]
  assert [_texts(r["captions"]) for r in records] == [["a1 .", "a2 .", "a3 .", "a4 .", "a5 ."],
                                                      ["b1 .", "b2 .", "b3 .", "b1 .", "b2 ."],
                                                      ["n1", "n2", "n3", "n4", "n5"]]
  assert [int(r["scene"]) for r in records] == [rsicd.SCENE_CLASSES.index("airport"),
                                                rsicd.SCENE_CLASSES.index("beach"), karpathy.NO_SCENE]
  assert records[0]["image"] == (rsicd_dir / "RSICD_images/airport_1.jpg").read_bytes()  # JPEG stored as is
  assert all(len(r["keywords"]) == 0 for r in records)

  builder = tfds.builder("rsicd", data_dir=tmp_path / "data")
  assert {split: info.num_examples for split, info in builder.info.splits.items()} == {
      "train": 3, "val": 1, "test": 2, "train_papers": 3, "val_papers": 1}
  (val,) = _read(builder, "val")
  assert _texts(val["captions"]) == ["r1", "r2", "r3", "r4", "r1"]
  repairs = builder.info.metadata["repairs"]
  assert {split: repairs[split] for split in karpathy.OFFICIAL_SPLITS} == {
      "train": {"padded_to_5": 1, "truncated_to_5": 1}, "val": {"empty_caption_replaced": 1}, "test": {}}
  papers = [int(r["image_id"]) for split in karpathy.PAPERS_SPLITS for r in _read(builder, split)]
  assert sorted(papers) == [0, 1, 2, 3]  # the papers re-split train and val


def test_rsitmd_reencodes_tiff_as_png_and_keeps_keywords(tmp_path):
  entries = [_entry("boat_1.tif", 10, "train", list("abcde"), keywords=["boat", "lake"]),
             _entry("plane_2.tif", 11, "test", list("fghij"), keywords=["plane"])]
  pixels = _write_karpathy(tmp_path / "RSITMD", "dataset_RSITMD.json", "images", entries, "TIFF")
  builder = _build(rsitmd.Rsitmd, tmp_path / "RSITMD", tmp_path / "data")
  (train,), (test,) = _read(builder, "train"), _read(builder, "test")
  assert train["image"].startswith(PNG_SIGNATURE)
  np.testing.assert_array_equal(_decode(train["image"]), pixels["boat_1.tif"])
  assert _texts(train["keywords"]) == ["boat", "lake"] and _texts(test["keywords"]) == ["plane"]
  assert [int(train["image_id"]), int(test["image_id"])] == [10, 11]
  assert builder.info.features["scene"].int2str(int(test["scene"])) == "plane"


def test_ucm_scene_is_the_alphabetical_class_of_100_consecutive_ids(tmp_path):
  entries = [_entry("1.tif", 0, "train", list("abcde")), _entry("151.tif", 150, "val", list("abcde")),
             _entry("2100.tif", 2099, "test", list("abcde"))]
  _write_karpathy(tmp_path / "UCM", "dataset.json", "imgs", entries, "TIFF")
  builder = _build(ucm_captions.UcmCaptions, tmp_path / "UCM", tmp_path / "data")
  scenes = [builder.info.features["scene"].int2str(int(r["scene"])) for s in ("train", "val", "test")
            for r in _read(builder, s)]
  assert scenes == ["agricultural", "airplane", "tenniscourt"]


def test_sydney_has_no_scene_and_builds_its_splits(tmp_path):
  entries = [_entry("1.tif", 0, "train", list("abcde")), _entry("2.tif", 1, "val", list("fghij")),
             _entry("3.tif", 2, "test", list("klmno"))]
  _write_karpathy(tmp_path / "Sydney", "dataset.json", "imgs", entries, "TIFF")
  builder = _build(sydney_captions.SydneyCaptions, tmp_path / "Sydney", tmp_path / "data")
  (test,) = _read(builder, "test")
  assert "scene" not in test and _texts(test["captions"]) == list("klmno")
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {
      "train": 1, "val": 1, "test": 1, "train_papers": 1, "val_papers": 1}


def test_papers_resplit_is_by_image_disjoint_deterministic_and_sized_as_the_papers(tmp_path):
  entries = [_entry(f"{i + 1}.tif", i, "train" if i < 14 else "val" if i < 18 else "test", list("abcde"))
             for i in range(20)]
  _write_karpathy(tmp_path / "UCM", "dataset.json", "imgs", entries, "TIFF")
  splits = []
  for run in range(2):
    builder = _build(ucm_captions.UcmCaptions, tmp_path / "UCM", tmp_path / f"data{run}")
    splits.append([[int(r["image_id"]) for r in _read(builder, split)] for split in karpathy.PAPERS_SPLITS])
  (train, val), again = splits
  assert (len(train), len(val)) == (16, 2) and again == [train, val]
  assert sorted(train + val) == list(range(18)) and train == sorted(train) and val == sorted(val)
  # docs/METHODS.md §1.1: RSICD 9,828 and RSITMD 4,291 training images, p = 0.9 (HVSA) and 0.8 (AMFMN).
  sizes = {(n, p): tuple(map(len, karpathy.papers_split(list(range(n)), p))) for n in (9828, 4291) for p in (0.9, 0.8)}
  assert sizes == {(9828, 0.9): (8845, 983), (9828, 0.8): (7862, 1966),
                   (4291, 0.9): (3861, 430), (4291, 0.8): (3432, 859)}
  assert karpathy.papers_split(list(range(50))) == karpathy.papers_split(list(range(50)))
  assert karpathy.papers_split(list(range(50)), seed=1) != karpathy.papers_split(list(range(50)))


def _write_amfmn(root, train, test, image_dir, fmt):
  """Writes the four split files for train/test lists of (filename, 5 captions) and the images."""
  root.mkdir(parents=True)
  for split, images in (("train", train), ("test", test)):
    (root / f"{split}_caps.txt").write_text("".join(f"{c}\n" for _, captions in images for c in captions))
    repeat = 1 if split == "train" else 5
    (root / f"{split}_filename.txt").write_text("".join(f"{name}\n" * repeat for name, _ in images))
    for i, (name, _) in enumerate(images):
      _write_image(root / image_dir / name, fmt, 30 * i)


def test_amfmn_splits_rsicd_reads_the_papers_split_files(tmp_path):
  train = [("airport_1.jpg", list("abcde")), ("00002.jpg", [".", "f", "g", "h", "i"]), ("beach_3.jpg", list("jklmn"))]
  test = [("river_4.jpg", list("opqrs")), ("viaduct_5.jpg", list("tuvwx"))]
  _write_amfmn(tmp_path / "rsicd", train, test, "RSICD_images", "JPEG")
  builder = _build(amfmn_splits.AmfmnSplits, tmp_path / "rsicd", tmp_path / "data", config="rsicd")
  records = {split: _read(builder, split) for split in ("train", "test")}
  assert [(int(r["image_id"]), sources.as_text(r["filename"])) for s in ("train", "test") for r in records[s]] == [
      (0, "airport_1.jpg"), (1, "00002.jpg"), (2, "beach_3.jpg"), (3, "river_4.jpg"), (4, "viaduct_5.jpg")]
  assert [_texts(r["captions"]) for r in records["train"]] == [captions for _, captions in train]
  assert [int(r["scene"]) for r in records["test"]] == [rsicd.SCENE_CLASSES.index("river"),
                                                        rsicd.SCENE_CLASSES.index("viaduct")]
  assert int(records["train"][1]["scene"]) == karpathy.NO_SCENE
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {
      "train": 3, "test": 2, "train_papers": 2, "val_papers": 1}


def test_amfmn_splits_rsitmd_keeps_blank_caption_lines_and_counts_them(tmp_path):
  train = [("mountain_1.tif", list("abcde")), ("viaduct_2.tif", [""] * 5)]
  _write_amfmn(tmp_path / "rsitmd", train, [("plane_3.tif", list("fghij"))], "images", "TIFF")
  builder = _build(amfmn_splits.AmfmnSplits, tmp_path / "rsitmd", tmp_path / "data", config="rsitmd")
  records = _read(builder, "train")
  assert _texts(records[1]["captions"]) == [""] * 5
  assert records[0]["image"].startswith(PNG_SIGNATURE)
  assert builder.info.metadata["repairs"]["train"] == {"blank_caption_kept": 5}


@pytest.mark.skipif(not AMFMN_SPLITS.is_dir(), reason="../shared/data/amfmn_splits is absent")
def test_real_amfmn_split_files_parse_with_their_documented_quirks():
  splits = amfmn_splits.read_split_files(AMFMN_SPLITS / "rsitmd", pathlib.Path("images"), rsitmd.Rsitmd.scene_of_file)
  assert {s: len(r) for s, r in splits.items()} == {"train": 4291, "test": 452}
  blank = [r.filename for r in splits["train"] if amfmn_splits.BLANK_KEPT in r.repairs]
  assert blank == ["mountain_2378.tif", "railwaystation_3254.tif", "storagetanks_4367.tif", "viaduct_4635.tif"]
  assert sum(r.captions.count("") for r in splits["train"]) == 20
  assert tuple(map(len, karpathy.papers_split(splits["train"]))) == (3861, 430)
  splits = amfmn_splits.read_split_files(AMFMN_SPLITS / "rsicd", pathlib.Path("images"), rsicd.Rsicd.scene_of_file)
  assert {s: len(r) for s, r in splits.items()} == {"train": 9828, "test": 1093}
  assert sum(r.captions.count(".") for r in splits["train"]) == 3


def test_image_text_files_reads_jsonl_and_csv_rows(tmp_path):
  root = tmp_path / "mine"
  pixels = _write_image(root / "imgs/a.png", "PNG", 5)
  _write_image(root / "imgs/b.jpg", "JPEG", 50)
  _write_image(root / "c.tif", "TIFF", 100)
  rows = [{"image": "imgs/a.png", "captions": ["one", "two"]},
          {"image": "imgs/b.jpg", "caption": "b", "label": "beach"},
          {"image": "c.tif", "captions": [str(i) for i in range(7)], "label": 3}]
  (root / "train.jsonl").write_text(json.dumps(rows[0]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[1:]) + "\n")
  (root / "test.csv").write_text('image,captions,label\nimgs/a.png,"[""x"", """", ""y""]",\nc.tif,"[""z""]",river\n')
  builder = _build(image_text_files.ImageTextFiles, root, tmp_path / "data")
  train, test = _read(builder, "train"), _read(builder, "test")
  assert [_texts(r["captions"]) for r in train] == [
      ["one", "two", "one", "two", "one"], ["b"] * 5, ["0", "1", "2", "3", "4"]]
  assert _texts(r["label"] for r in train + test) == ["", "beach", "3", "", "river"]
  assert [int(r["image_id"]) for r in train + test] == [0, 1, 2, 3, 4]
  assert _texts(test[0]["captions"]) == ["x", "y", "x", "y", "x"]
  np.testing.assert_array_equal(_decode(train[0]["image"]), pixels)
  assert builder.info.metadata["repairs"]["train"] == {"padded_to_5": 2, "truncated_to_5": 1}
  assert builder.info.metadata["repairs"]["test"] == {"empty_caption_replaced": 1, "padded_to_5": 2}
  assert "val" not in builder.info.splits


# ------------------------------------------------------------------------------------------------- errors


def _rsicd_json(tmp_path, entries=None, text=None):
  path = tmp_path / "dataset_rsicd.json"
  path.write_text(text if text is not None else json.dumps({"images": entries}))
  return path


@pytest.mark.parametrize("mutate, match", [
    (lambda e: e[1].pop("sentences"),
     r"images\[1\] \(beach_2\.jpg\): missing field 'sentences'; expected a list of \{'raw': caption\} objects"),
    (lambda e: e[0].pop("filename"), r"images\[0\]: missing field 'filename'; expected the image's file name in "
                                     r"RSICD_images/"),
    (lambda e: e[2].update(imgid="2"),
     r"images\[2\] \(00001\.jpg\): field 'imgid' is '2'; expected an integer image id"),
    (lambda e: e[0]["sentences"][2].pop("raw"),
     r"images\[0\] \(airport_1\.jpg\): sentences\[2\]: missing field 'raw'; expected the caption text"),
    (lambda e: e[3].update(split="restval"),
     r"images\[3\] \(river_3\.jpg\): split 'restval' is not one of \['train', 'val', 'test'\]"),
    (lambda e: e[4].update(imgid=0),
     r"images\[4\] \(viaduct_4\.jpg\): imgid 0 repeats images\[0\]; ids must be unique"),
    (lambda e: e[5].update(sentences=[{"raw": ""}, {"raw": " "}]),
     r"images\[5\] \(port_5\.jpg\): no non-empty caption; every image needs at least one"),
])
def test_karpathy_json_errors_name_the_file_image_and_field(tmp_path, mutate, match):
  entries = json.loads(json.dumps(RSICD_ENTRIES))
  mutate(entries)
  with pytest.raises(ValueError, match=r"dataset_rsicd\.json: " + match):
    karpathy.read_karpathy_json(_rsicd_json(tmp_path, entries), tmp_path / "RSICD_images")


def test_karpathy_json_file_errors(tmp_path):
  images = tmp_path / "RSICD_images"
  with pytest.raises(ValueError, match=r"dataset_rsicd\.json: malformed JSON at line 2, column 14: Expecting value"):
    karpathy.read_karpathy_json(_rsicd_json(tmp_path, text='{"images":\n  [{"a": 1}, ]}'), images)
  with pytest.raises(ValueError, match=r"dataset_rsicd\.json: expected a JSON object with an 'images' list"):
    karpathy.read_karpathy_json(_rsicd_json(tmp_path, text='{"annotations": []}'), images)
  with pytest.raises(FileNotFoundError, match=r"dataset_RSITMD\.json: file not found"):
    karpathy.read_karpathy_json(tmp_path / "dataset_RSITMD.json", images)
  entries = [_entry("boat_1.tif", 0, "train", list("abcde"))]
  with pytest.raises(ValueError, match=r"\(boat_1\.tif\): missing field 'keywords'; expected a list of keyword "
                                       r"strings"):
    karpathy.read_karpathy_json(_rsicd_json(tmp_path, entries), images, with_keywords=True)
  entries[0]["keywords"] = ["boat", 3]
  with pytest.raises(ValueError, match=r"field 'keywords' is \['boat', 3\]; expected a list of strings"):
    karpathy.read_karpathy_json(_rsicd_json(tmp_path, entries), images, with_keywords=True)


def test_scene_errors_name_the_image(tmp_path):
  _write_karpathy(tmp_path / "RSICD", "dataset_rsicd.json", "RSICD_images",
                  [_entry("lake_1.jpg", 0, "train", list("abcde"))], "JPEG")
  with pytest.raises(ValueError, match=r"images\[0\] \(lake_1\.jpg\): file name prefix 'lake' is not one of the 30 "
                                       r"classes"):
    _build(rsicd.Rsicd, tmp_path / "RSICD", tmp_path / "data")
  _write_karpathy(tmp_path / "UCM", "dataset.json", "imgs", [_entry("1.tif", 2100, "train", list("abcde"))], "TIFF")
  with pytest.raises(ValueError, match=r"images\[0\] \(1\.tif\): imgid 2100 is outside 0\.\.2099, so its UC Merced "
                                       r"class \(100 consecutive ids per class\) is unknown"):
    _build(ucm_captions.UcmCaptions, tmp_path / "UCM", tmp_path / "data")


def test_missing_images_fail_with_count_and_names_or_are_skipped_and_counted(rsicd_dir, tmp_path):
  for name in ("airport_1.jpg", "beach_2.jpg", "00001.jpg", "river_3.jpg", "viaduct_4.jpg"):
    (rsicd_dir / "RSICD_images" / name).unlink()
  (rsicd_dir / "dataset_rsicd.json").write_text(json.dumps({"images": RSICD_ENTRIES + [
      _entry("school_7.jpg", 7, "train", list("abcde"))]}))
  with pytest.raises(FileNotFoundError, match=(
      r"rsicd: 6 images named in the dataset files are missing under .*RSICD; first 5: "
      r"\['RSICD_images/airport_1\.jpg', "
      r"'RSICD_images/beach_2\.jpg', 'RSICD_images/00001\.jpg', 'RSICD_images/school_7\.jpg', "
      r"'RSICD_images/river_3\.jpg'\]\. Add them, or skip them \(counted in the dataset's metadata\) with "
      r"--config\.dataset\.name=rsicd/skip_missing_images$")):
    _build(rsicd.Rsicd, rsicd_dir, tmp_path / "data")
  builder = _build(rsicd.Rsicd, rsicd_dir, tmp_path / "data", config="skip_missing_images")
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {"test": 1}
  assert builder.info.metadata["repairs"]["train"] == {"missing_image_skipped": 4}
  assert builder.info.metadata["repairs"]["val"] == {"missing_image_skipped": 1}


def test_corrupt_image_and_missing_manual_dir_errors(rsicd_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"^rsicd: manual_dir .*absent does not exist or is empty; expected "
                                              r"dataset_rsicd\.json \(Karpathy format\) and RSICD_images/ in "
                                              r"manual_dir\. Set --config\.dataset\.manual_dir"):
    _build(rsicd.Rsicd, tmp_path / "absent", tmp_path / "data")
  (rsicd_dir / "RSICD_images/beach_2.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(ValueError, match=r"RSICD_images/beach_2\.jpg: unreadable image \(cannot identify image file"):
    _build(rsicd.Rsicd, rsicd_dir, tmp_path / "data")
  truncated = rsicd_dir / "RSICD_images/airport_1.jpg"
  truncated.write_bytes(truncated.read_bytes()[:-40])
  with pytest.raises(ValueError, match=r"RSICD_images/airport_1\.jpg: unreadable image \(Truncated File Read\)"):
    karpathy.read_image(truncated)


def _amfmn_dir(tmp_path):
  root = tmp_path / "split_files"
  _write_amfmn(root, [("airport_1.jpg", list("abcde")), ("beach_2.jpg", list("fghij"))],
               [("river_3.jpg", list("klmno")), ("viaduct_4.jpg", list("pqrst"))], "images", "JPEG")
  return root


@pytest.mark.parametrize("file, text, match", [
    ("test_filename.txt", "river_3.jpg\n" * 5 + "viaduct_4.jpg\n" * 2 + "port_5.jpg\n" + "viaduct_4.jpg\n" * 2,
     r"test_filename\.txt:8: 'port_5\.jpg' differs from 'viaduct_4\.jpg' on line 6; expected 5 identical lines per "
     r"image"),
    ("test_filename.txt", "river_3.jpg\n" * 7,
     r"test_filename\.txt: 7 lines is not a multiple of 5; expected 5 identical lines per image"),
    ("train_filename.txt", "airport_1.jpg\n\nbeach_2.jpg\n",
     r"train_filename\.txt:2: empty line; expected an image file name"),
    ("train_caps.txt", "x\n" * 9,
     r"train_caps\.txt has 9 captions but .*train_filename\.txt names 2 images; expected 5 captions per image \(10\)"),
    ("test_caps.txt", "x\n" * 11,
     r"test_caps\.txt has 11 captions but .*test_filename\.txt names 2 images; expected 5 captions per image \(10\)"),
])
def test_amfmn_split_file_errors_name_the_file_and_line(tmp_path, file, text, match):
  root = _amfmn_dir(tmp_path)
  (root / file).write_text(text)
  with pytest.raises(ValueError, match=match):
    amfmn_splits.read_split_files(root, root / "images", rsicd.Rsicd.scene_of_file)


def test_amfmn_builder_needs_the_four_files_and_an_image_folder(tmp_path):
  root = _amfmn_dir(tmp_path)
  (root / "images").rename(root / "imgs")
  with pytest.raises(FileNotFoundError, match=r"split_files: no image folder; amfmn_splits/rsicd expects the "
                                              r"AMFMN/HVSA split files \(.*\) and images/ or RSICD_images/ in "
                                              r"manual_dir"):
    _build(amfmn_splits.AmfmnSplits, root, tmp_path / "data", config="rsicd")
  (root / "test_caps.txt").unlink()
  with pytest.raises(FileNotFoundError, match=r"split_files: missing test_caps\.txt; amfmn_splits/rsitmd expects the "
                                              r"AMFMN/HVSA split files \(train_caps\.txt, train_filename\.txt, "
                                              r"test_caps\.txt, test_filename\.txt\) and images/ in manual_dir"):
    _build(amfmn_splits.AmfmnSplits, root, tmp_path / "data", config="rsitmd")


@pytest.mark.parametrize("line, match", [
    ('{"image": "a.png", "captions": ["x"]', r"train\.jsonl:2: malformed JSON at column 37"),
    ('["a.png", "x"]', r"train\.jsonl:2: expected a JSON object, got \['a\.png', 'x'\]"),
    ('{"captions": ["x"]}', r"train\.jsonl:2: field 'image' is None; expected an image path relative to"),
    ('{"image": "/abs/a.png", "caption": "x"}', r"train\.jsonl:2: field 'image' is '/abs/a\.png'; expected an image "
                                                r"path relative to"),
    ('{"image": "a.png", "caption": "x", "captions": ["y"]}',
     r"train\.jsonl:2: both 'caption' and 'captions'; give one"),
    ('{"image": "a.png"}', r"train\.jsonl:2: missing field 'captions' \(a list of strings\) or 'caption' \(a string\)"),
    ('{"image": "a.png", "captions": []}', r"train\.jsonl:2: field 'captions' is \[\]; expected a non-empty list of "
                                           r"strings"),
    ('{"image": "a.png", "captions": "x"}', r"train\.jsonl:2: field 'captions' is 'x'; expected a non-empty list"),
    ('{"image": "a.png", "caption": 3}', r"train\.jsonl:2: field 'caption' is 3; expected a string"),
    ('{"image": "a.png", "captons": ["x"]}', r"train\.jsonl:2: unknown field\(s\) \['captons'\]; expected image, "
                                             r"captions or caption, and optionally label"),
    ('{"image": "a.png", "caption": "x", "label": [1]}', r"train\.jsonl:2: field 'label' is \[1\]; expected a string "
                                                         r"or an integer"),
    ('{"image": "a.png", "captions": ["", " "]}', r"train\.jsonl:2: no non-empty caption"),
])
def test_image_text_files_jsonl_errors_name_file_line_and_field(tmp_path, line, match):
  (tmp_path / "train.jsonl").write_text('{"image": "ok.png", "caption": "fine"}\n' + line + "\n")
  with pytest.raises(ValueError, match=match):
    image_text_files.read_split_files(tmp_path)


@pytest.mark.parametrize("text, match", [
    ("image,caption,extra\na.png,x,1\n",
     r"val\.csv:1: header \['image', 'caption', 'extra'\]; expected the columns image, caption or captions"),
    ("image,caption,captions\na.png,x,[]\n", r"val\.csv:1: header"),
    ("image,captions\na.png,[\"x\"]\nb.png,not json\n",
     r"val\.csv:3: column 'captions' is not a JSON list of strings \(Expecting value\)"),
    ("image,caption\na.png,x\nb.png,y,z\n", r"val\.csv:3: expected 2 columns, as in the header \['image', 'caption'\]"),
    ("image,caption,label\na.png,x\n", r"val\.csv:2: expected 3 columns"),
])
def test_image_text_files_csv_errors_name_file_and_line(tmp_path, text, match):
  (tmp_path / "val.csv").write_text(text)
  with pytest.raises(ValueError, match=match):
    image_text_files.read_split_files(tmp_path)


def test_image_text_files_split_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no split file; expected train\.jsonl or train\.csv"):
    image_text_files.read_split_files(tmp_path)
  (tmp_path / "test.jsonl").write_text("")
  (tmp_path / "test.csv").write_text("image,caption\n")
  with pytest.raises(ValueError, match=r"both test\.jsonl and test\.csv; keep one file per split"):
    image_text_files.read_split_files(tmp_path)


# ------------------------------------------------------------------------------------------------- real data


@pytest.mark.skipif(not RSICD_AID150.is_dir(), reason="../shared/data/rsicd_aid150 is absent")
def test_rsicd_builds_from_rsicd_aid150_with_the_json_split_counts(tmp_path):
  images = json.loads((RSICD_AID150 / "dataset_rsicd.json").read_text())["images"]
  expected = {split: sum(image["split"] == split for image in images) for split in karpathy.OFFICIAL_SPLITS}
  assert expected == {"train": 7957, "val": 1027, "test": 1027}
  start = time.perf_counter()
  builder = _build(rsicd.Rsicd, RSICD_AID150, tmp_path / "data")
  print(f"rsicd from rsicd_aid150: {len(images)} images built in {time.perf_counter() - start:.1f} s")
  counts = {split: info.num_examples for split, info in builder.info.splits.items()}
  assert counts == {**expected, "train_papers": 8085, "val_papers": 899}
  assert builder.info.metadata["repairs"] == {split: {} for split in counts}
  test = builder.as_data_source("test", decoders={"image": tfds.decode.SkipDecoding()})
  first_test = next(image for image in images if image["split"] == "test")
  assert sources.as_text(test[0]["filename"]) == first_test["filename"]
  assert int(test[0]["image_id"]) == first_test["imgid"]
  assert _texts(test[0]["captions"]) == [s["raw"] for s in first_test["sentences"]]
  assert test[0]["image"] == (RSICD_AID150 / "RSICD_images" / first_test["filename"]).read_bytes()


@pytest.mark.skipif(not (RSICD_AID150.is_dir() and AMFMN_SPLITS.is_dir()), reason="../shared/data is absent")
def test_amfmn_rsicd_split_files_build_on_rsicd_aid150_images_skipping_the_absent_ones(tmp_path):
  manual_dir = tmp_path / "rsicd_precomp"
  manual_dir.mkdir()
  for name in amfmn_splits.SPLIT_FILES:
    (manual_dir / name).symlink_to(AMFMN_SPLITS / "rsicd" / name)
  (manual_dir / "RSICD_images").symlink_to(RSICD_AID150 / "RSICD_images")
  with pytest.raises(FileNotFoundError, match=r"amfmn_splits/rsicd: 910 images named in the dataset files are "
                                              r"missing"):
    _build(amfmn_splits.AmfmnSplits, manual_dir, tmp_path / "data", config="rsicd")
  builder = _build(amfmn_splits.AmfmnSplits, manual_dir, tmp_path / "data", config="rsicd_skip_missing_images")
  # The 844 train and 66 test images absent from rsicd_aid150 are its missing numeric-named RSICD images; the rest
  # are the json's train + val (8,984) and test (1,027) images.
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {
      "train": 8984, "test": 1027, "train_papers": 8085, "val_papers": 899}
  assert builder.info.metadata["repairs"]["train"] == {"missing_image_skipped": 844}
  assert builder.info.metadata["repairs"]["test"] == {"missing_image_skipped": 66}
