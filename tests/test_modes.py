"""`main --mode=eval|export|search` and several seeds, on a runlocal HVSA run of the tiny synthetic benchmark (one
training run shared by the module) and on a bag-of-words oracle model, on 8 virtual CPU devices."""
import importlib.util
import io
import json
import shutil
import struct
import sys
import types
from typing import Any

import flax.linen as nn
from absl import app
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from tensorboardX.proto import event_pb2

from helpers import CONFIGS, disabled, run_main, runlocal_config, with_querybank
from rsalign_jax import experiment
from rsalign_jax.evaluation import metrics as metrics_lib
from rsalign_jax.evaluation.evaluators import hash_retrieval
from rsalign_jax.evaluation.evaluators import querybank as querybank_evaluator
from rsalign_jax.similarity import cosine_similarity
from rsalign_jax.models import base as model_base
from rsalign_jax.modes import ensemble, evaluate, export, search
from rsalign_jax.modes import seeds as seeds_lib
from rsalign_jax.modes import trained as trained_lib
from rsalign_jax.runtime import checkpointing
from rsalign_jax.serving import embedding, hash_index


@pytest.fixture
def run(hvsa_run):
  """(config, workdir, results) of the session's runlocal HVSA run (4 steps, val at step 4)."""
  return hvsa_run


def test_eval_recomputes_the_trainers_test_numbers(run, capsys):
  config, workdir, results = run
  capsys.readouterr()
  result = evaluate.evaluate(config, str(workdir))
  assert result["metrics"] == results["test"]  # exactly: same evaluator, towers and checkpoint
  assert result["checkpoint"] == results["tested_checkpoint"] == "best val (step 4)"
  printed = capsys.readouterr().out
  assert f"| hvsa (best val (step 4)) | {results['test']['i2t_R1']:.2f} |" in printed
  assert json.loads((workdir / "eval_test.json").read_text())["metrics"] == results["test"]
  assert (workdir / "eval_test.md").read_text().strip() == result["table"]


def test_checkpoint_choice_and_missing_checkpoints(run, tmp_path):
  config, workdir, _ = run
  last = trained_lib.load(config, str(workdir), "last")
  assert (last.checkpoint, last.step) == ("last", 4)
  assert trained_lib.load(config, str(workdir), str(workdir / "checkpoints" / "2")).step == 2
  with pytest.raises(FileNotFoundError, match="no such directory; train first with --mode=train"):
    trained_lib.find_checkpoint(config, str(tmp_path / "absent"))
  with pytest.raises(FileNotFoundError, match="no checkpoint in .*/checkpoints or .*/best"):
    trained_lib.find_checkpoint(config, str(tmp_path))
  with pytest.raises(FileNotFoundError, match="expected 'best', 'last', a checkpoint directory"):
    trained_lib.find_checkpoint(config, str(workdir), str(tmp_path))
  with pytest.raises(FileNotFoundError, match="--checkpoint=best: .* holds no checkpoint"):
    trained_lib.find_checkpoint(config, str(tmp_path), "best")


def test_export_writes_the_embeddings_the_metrics_come_from(run, tmp_path):
  config, workdir, results = run
  manifest = export.export(config, str(workdir), output_dir=str(tmp_path / "export"))
  images = np.load(tmp_path / "export" / "image_embeddings.npy")
  captions = np.load(tmp_path / "export" / "caption_embeddings.npy")
  assert images.shape == (16, 32) and captions.shape == (80, 32) and images.dtype == np.float32
  assert manifest["checkpoint"] == "best val (step 4)" and len(manifest["images"]["filename"]) == 16
  assert manifest["score"] == "inner_product"  # HVSA scores by cosine: the rows are L2-normalised
  np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(captions, axis=1), 1.0, rtol=1e-6)
  assert len(manifest["captions"]["text"]) == 80 and manifest["captions"]["image_row"][:6] == [0] * 5 + [1]
  sim = np.asarray(cosine_similarity(images, captions))
  assert metrics_lib.retrieval_metrics(sim, np.asarray(manifest["captions"]["image_row"])) == results["test"]
  if importlib.util.find_spec("pyarrow"):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    table = pq.read_table(tmp_path / "export" / "captions.parquet")
    assert table.column_names == ["row", "text", "image_row", "embedding"] and table.num_rows == 80
    np.testing.assert_array_equal(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), captions)


def test_an_inner_product_index_over_the_export_ranks_as_search_does(run, tmp_path):
  config, workdir, _ = run
  export.export(config, str(workdir), output_dir=str(tmp_path / "export"))
  images = np.load(tmp_path / "export" / "image_embeddings.npy")
  loaded = trained_lib.load(config, str(workdir))
  with jax.set_mesh(loaded.setup.mesh):
    gallery = search.load_gallery(loaded, gallery_dir=str(tmp_path / "export"))
    queries = [gallery.captions[row] for row in range(0, 80, 9)]
    results = search.text_to_images(loaded, gallery, queries, 16)
    tokens, lengths = embedding.encode_queries(loaded.setup, queries)
    texts = embedding.embed_all(loaded.setup, loaded.variables, "texts", embedding.text_batches(
        loaded.setup, tokens, lengths, embedding.free_text_fields(loaded.setup)))
  # What a flat inner-product index (faiss IndexFlatIP) does with the exported rows and a normalised query.
  index_scores = (texts / np.linalg.norm(texts, axis=1, keepdims=True)) @ images.T
  for result, scores in zip(results, index_scores):
    assert [r["row"] for r in result["results"]] == np.argsort(-scores, kind="stable").tolist()


def test_image_query_ranks_captions_and_bad_queries_are_clear_errors(run, tmp_path):
  config, workdir, _ = run
  loaded = trained_lib.load(config, str(workdir))
  with jax.set_mesh(loaded.setup.mesh):
    gallery = search.load_gallery(loaded)
    query = tmp_path / gallery.filenames[3]
    query.write_bytes(gallery.data.source[3]["image"])
    [result] = search.image_to_gallery(loaded, gallery, [str(query)], 5)
    assert result["ground_truth"] == [15, 16, 17, 18, 19]  # the captions of image 3
    assert [r["rank"] for r in result["results"]] == [1, 2, 3, 4, 5]
    assert all(r["caption"] == gallery.captions[r["row"]] for r in result["results"])
    scores = [r["score"] for r in result["results"]]
    assert scores == sorted(scores, reverse=True)
    with pytest.raises(ValueError, match="--query: empty query"):
      search.text_to_images(loaded, gallery, ["  "], 5)
    with pytest.raises(ValueError, match="none of its words is in the model's vocabulary"):
      search.text_to_images(loaded, gallery, ["xyzzy qwertyuiop"], 5)
    with pytest.raises(FileNotFoundError, match="--image=.*missing.png: no such file"):
      search.image_to_gallery(loaded, gallery, [str(tmp_path / "missing.png")], 5)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="not an image file PIL can read"):
      search.image_to_gallery(loaded, gallery, [str(tmp_path / "notes.txt")], 5)
    with pytest.raises(ValueError, match="has no hash codes"):
      search.text_to_images(loaded, gallery, ["a runway"], 5, codes="hamming")
  with pytest.raises(FileNotFoundError, match="no manifest.json; create one with --mode=export"):
    search.load_gallery(loaded, gallery_dir=str(tmp_path))


def test_training_writes_the_validation_gallery_to_tensorboard(run):
  _, workdir, _ = run
  [events] = workdir.glob("events.out.tfevents.*")
  pictures = [value.image for event in read_events(events) for value in event.summary.value
              if value.tag == "val_gallery/picture"]
  assert len(pictures) == 1  # one validation in 4 steps
  picture = np.asarray(PIL.Image.open(io.BytesIO(pictures[0].encoded_image_string)))
  assert picture.shape == (pictures[0].height, pictures[0].width, 3) and picture.shape[0] > 100
  assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 50  # thumbnails, text and frames, not a blank canvas


def read_events(path):
  """The Event protos of a TensorBoard event file (TFRecord: length, crc, data, crc)."""
  data = path.read_bytes()
  offset = 0
  while offset < len(data):
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    yield event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
    offset += 12 + length + 4


def test_seeds_report_mean_and_std(run, tmp_path, capsys):
  config, workdir, results = run
  shutil.copytree(workdir, tmp_path / "seed_0")
  summary = seeds_lib.evaluate_seeds(config, str(tmp_path), (0,))
  assert summary["mean"] == results["test"] and set(summary["std"].values()) == {0.0}
  for seed, mr in ((1, 10.0), (2, 20.0), (3, 60.0)):  # finished runs are reused, not retrained
    (tmp_path / f"seed_{seed}").mkdir()
    (tmp_path / f"seed_{seed}" / "results.json").write_text(json.dumps({"test": {**results["test"], "mR": mr}}))
  summary = seeds_lib.train_seeds(config, str(tmp_path), (1, 2, 3))
  assert summary["mean"]["mR"] == 30.0 and summary["std"]["mR"] == pytest.approx(np.std([10, 20, 60], ddof=1))
  assert "| mean ± std (3 seeds) |" in capsys.readouterr().out
  assert json.loads((tmp_path / "seeds_test.json").read_text())["seeds"] == [1, 2, 3]


@pytest.mark.parametrize("with_config", [True, False])
def test_command_line_eval(run, capsys, monkeypatch, with_config):
  config, workdir, results = run
  argv = [f"--workdir={workdir}", "--mode=eval"]  # without --config: the run's config.json
  if with_config:
    argv += [f"--config={CONFIGS / 'hvsa.py'}:runlocal", f"--config.dataset.data_dir={config.dataset.data_dir}",
             "--config.evals.random_init.enabled=false"]
  run_main(monkeypatch, argv)
  assert f"| {results['test']['mR']:.2f} | {results['test']['rsum']:.2f} |" in capsys.readouterr().out
  assert json.loads((workdir / "eval_test.json").read_text())["metrics"] == results["test"]


class BagOfWords(model_base.RetrievalModel):
  """Oracle towers for testing search: a caption's embedding is its bag of words, an image's the bag of words of
  its 5 captions (the `caption_set` field); the score is the cosine."""
  vocab_size: int
  dtype: Any = jnp.float32
  IMAGE_FIELDS = ("caption_set",)
  HASH_CODES = True

  def setup(self):
    self.scale = self.param("scale", nn.initializers.ones, ())  # the train state needs a parameter

  def _bag(self, tokens):
    return self.scale * jax.nn.one_hot(tokens, self.vocab_size).sum(-2).at[..., 0].set(0.0)

  def embed_images(self, images, *, caption_set, train):
    del images, train
    return self._bag(caption_set).sum(1)

  def embed_texts(self, tokens, lengths, *, train):
    del lengths, train
    return self._bag(tokens)

  def __call__(self, images, tokens, lengths, *, caption_set, train):
    return dict(image_embedding=self.embed_images(images, caption_set=caption_set, train=train),
                text_embedding=self.embed_texts(tokens, lengths, train=train))

  def score(self, image_embedding, text_embedding):
    return cosine_similarity(image_embedding, text_embedding)

  def image_codes(self, images, *, caption_set, train=False):
    return self._hash(self.embed_images(images, caption_set=caption_set, train=train))

  def text_codes(self, tokens, lengths, *, train=False):
    return self._hash(self.embed_texts(tokens, lengths, train=train))

  def _hash(self, bags):
    """64-bit SimHash codes: signs of random projections of the unit bag of words (Hamming ~ angle)."""
    projection = jax.random.normal(jax.random.key(0), (self.vocab_size, 64))
    return jnp.tanh(bags / jnp.linalg.norm(bags, axis=-1, keepdims=True) @ projection)


@pytest.fixture
def oracle(tmp_path_factory, monkeypatch):
  """(config, workdir) of the bag-of-words model with its (only) state saved as a checkpoint."""
  monkeypatch.setitem(sys.modules, "rsalign_jax.models.bag_of_words_oracle", types.SimpleNamespace(Model=BagOfWords))
  config = runlocal_config(tmp_path_factory, **disabled("random_init"))
  config.model_name, config.model = "bag_of_words_oracle", {}
  workdir = tmp_path_factory.mktemp("oracle")
  mesh = trained_lib.make_mesh(config)
  setup = experiment.build_setup(config, str(workdir), mesh)
  state = jax.jit(setup.init_fn, out_shardings=setup.state_sharding)(jax.random.key(0))
  checkpointer = checkpointing.Checkpointer(str(workdir / "checkpoints"))
  checkpointer.save(0, state)
  checkpointer.wait_until_finished()
  checkpointer.close()
  return config, workdir


def test_search_finds_the_right_images_far_above_chance_and_draws_them(oracle, tmp_path, capsys):
  config, workdir = oracle
  export.export(config, str(workdir), output_dir=str(tmp_path / "gallery"))
  capsys.readouterr()
  results = search.run(config, str(workdir), queries=["Two planes near the runway"], sample_queries=16, k=5,
                       gallery_dir=str(tmp_path / "gallery"), png=str(tmp_path / "gallery.png"),
                       output=str(tmp_path / "results.json"))
  assert "**Two planes near the runway**" in capsys.readouterr().out
  assert json.loads((tmp_path / "results.json").read_text()) == results
  assert results[0]["ground_truth"] == []  # not a caption of the split
  sampled = results[1:]
  assert len(sampled) == 16 and all(len(r["ground_truth"]) >= 1 for r in sampled)
  top1 = np.mean([r["results"][0]["ground_truth"] for r in sampled])
  top5 = np.mean([any(x["ground_truth"] for x in r["results"]) for r in sampled])
  assert top1 >= 0.75 and top5 >= 0.9  # chance: 1/16 and 5/16
  assert all(r["results"][0]["filename"] for r in sampled)
  picture = PIL.Image.open(tmp_path / "gallery.png")
  assert picture.width == 8 + 280 + 5 * (96 + 2 * 4 + 8) and picture.height >= 8 + 17 * (96 + 2 * 4 + 17 + 8)
  assert len(np.unique(np.asarray(picture).reshape(-1, 3), axis=0)) > 50


def test_a_trained_model_finds_the_images_of_synthetic_test_captions_far_above_chance(trained_dual_encoder):
  # A trained model, not the oracle: the session's runlocal dual encoder trained 200 steps on synthetic_rs/small at
  # 32 px, searched with 400 test captions over the 500 test images. Chance: 0.2% of the queries find their image
  # first, 1% within the top 5; the test asks for 5x that.
  config, workdir, trained = trained_dual_encoder
  assert json.loads((workdir / "results.json").read_text())["test"] == trained["test"]
  results = search.run(config, str(workdir), sample_queries=400, k=5)
  assert len(results) == 400 and all(len(r["results"]) == 5 for r in results)
  top1 = np.mean([r["results"][0]["ground_truth"] for r in results])
  top5 = np.mean([any(x["ground_truth"] for x in r["results"]) for r in results])
  assert top1 >= 5 * (1 / 500) and top5 >= 5 * (5 / 500), (top1, top5)


def test_hash_codes_are_exported_and_searched_by_hamming_distance(oracle, tmp_path):
  config, workdir = oracle
  manifest = export.export(config, str(workdir), output_dir=str(tmp_path / "gallery"))
  image_words = np.load(tmp_path / "gallery" / "image_codes.npy")
  caption_words = np.load(tmp_path / "gallery" / "caption_codes.npy")
  assert manifest["code_bits"] == 64 and image_words.shape == (16, 2) and caption_words.shape == (80, 2)
  assert image_words.dtype == np.uint32
  loaded = trained_lib.load(config, str(workdir))
  with jax.set_mesh(loaded.setup.mesh):
    gallery = search.load_gallery(loaded, gallery_dir=str(tmp_path / "gallery"))
    queries = search.sample_gallery_queries(gallery, 16)
    results = search.text_to_images(loaded, gallery, queries, 16, codes="hamming")
  caption_rows = [gallery.captions.index(q) for q in queries]
  brute = np.unpackbits((caption_words[caption_rows][:, None, :] ^ image_words[None]).view(np.uint8), axis=-1)
  for result, distances in zip(results, brute.sum(-1)):
    got = [r["score"] for r in result["results"]]
    assert got == sorted(got) and got == sorted(distances.tolist())  # exact Hamming ranking of the whole gallery
  assert np.mean([r["results"][0]["ground_truth"] for r in results]) >= 0.5  # chance: 1/16


def test_the_hash_retrieval_evaluator_ranks_the_gallery_by_exact_hamming_distance(oracle):
  config, workdir = oracle
  loaded = trained_lib.load(config, str(workdir))
  setup = loaded.setup
  with jax.set_mesh(setup.mesh):
    with pytest.raises(ValueError, match=r"^evals.hash.ks=\(10, 100\): expected 1 <= K <= the 64 train images$"):
      hash_retrieval.Evaluator(setup, "hash", split="test", gallery_split="train", ks=(10, 100))
    metrics = hash_retrieval.Evaluator(setup, "hash", split="test", gallery_split="train", ks=(1, 10)).run(
        loaded.variables, 0, None)
    bits = {split: embedding.embed_all(setup, loaded.variables, "image_codes", embedding.image_batches(
        setup, setup.split(split))) >= 0 for split in ("test", "train")}
  ranked = np.argsort((bits["test"][:, None, :] != bits["train"][None]).sum(-1), axis=1, kind="stable")[:, :10]
  sources = {split: setup.split(split).source for split in ("test", "train")}
  scenes = {split: [int(source[i]["scene"]) for i in range(len(source))] for split, source in sources.items()}
  expected = hash_index.retrieval_scores(ranked, scenes["test"], scenes["train"], (1, 10))
  assert metrics == {"mAP1": expected["mAP@1"], "P1": expected["P@1"], "mAP10": expected["mAP@10"],
                     "P10": expected["P@10"]}
  assert metrics["P1"] > 100 / 21  # same-scene neighbours beyond chance: 21 scene classes


def test_hash_retrieval_needs_a_hashing_model(run):
  config, workdir, _ = run
  loaded = trained_lib.load(config, str(workdir))
  with pytest.raises(ValueError, match=r"^evals.hash.type='hash_retrieval': model 'hvsa' has no hash codes"):
    hash_retrieval.Evaluator(loaded.setup, "hash", split="test", gallery_split="train")


def test_command_line_mistakes_end_in_one_line_without_a_traceback(run, monkeypatch, capsys):
  _, workdir, _ = run
  with pytest.raises(SystemExit) as exit_info:
    run_main(monkeypatch, [f"--workdir={workdir}", "--mode=search"])
  assert exit_info.value.code == "error: --mode=search needs --query, --image or --sample_queries"
  with pytest.raises(SystemExit) as exit_info:
    run_main(monkeypatch, [f"--workdir={workdir}", "--mode=search", "--query=a plane"])
  assert exit_info.value.code.startswith("error: --query='a plane': none of its words is in the model's vocabulary")
  with pytest.raises(SystemExit) as exit_info:
    run_main(monkeypatch, [f"--workdir={workdir}", "--mode=search", "--image=/absent.png"])
  assert exit_info.value.code == "error: --image=/absent.png: no such file"
  assert "Traceback" not in capsys.readouterr().err


def test_an_ensemble_of_one_model_twice_scores_as_that_model(run, tmp_path):
  config, workdir, results = run
  config = with_querybank(config)
  for seed in (0, 1):
    shutil.copytree(workdir, tmp_path / f"seed_{seed}")
  result = ensemble.evaluate_ensemble([(config, tmp_path / "seed_0"), (config, tmp_path / "seed_1")], str(tmp_path))
  loaded = trained_lib.load(config, str(workdir))
  with jax.set_mesh(loaded.setup.mesh):
    normalised = querybank_evaluator.Evaluator(loaded.setup, "q", split=config.dataset.test_split).run(
        loaded.variables, 0, None)
  assert result["metrics"] == {"ensemble of 2": results["test"], "ensemble of 2, querybank β=10": normalised}
  assert json.loads((tmp_path / "ensemble_test.json").read_text())["metrics"] == result["metrics"]


def test_an_ensemble_ranks_by_the_mean_of_its_members_scores(run, tmp_path):
  config, workdir, _ = run
  shutil.copytree(workdir, tmp_path / "at_4")
  shutil.copytree(workdir, tmp_path / "at_2")
  shutil.rmtree(tmp_path / "at_2" / "best")
  shutil.rmtree(tmp_path / "at_2" / "checkpoints" / "4")  # its tested checkpoint: the last, step 2
  result = ensemble.evaluate_ensemble([(config, tmp_path / "at_4"), (config, tmp_path / "at_2")], str(tmp_path))
  similarities = []
  for member in ("at_4", "at_2"):
    loaded = trained_lib.load(config, str(tmp_path / member))
    evaluator, r = loaded.setup.make_evaluator(config.dataset.test_split), loaded.setup.retrieval
    with jax.set_mesh(loaded.setup.mesh):
      similarities.append(evaluator.similarity(loaded.variables, r.score,
                                               *evaluator.embeddings(loaded.variables, r.embed_images, r.embed_texts)))
  assert loaded.step == 2 and not np.array_equal(*similarities)
  expected = metrics_lib.retrieval_metrics((similarities[0] + similarities[1]) / 2, evaluator.index.record)
  assert result["metrics"] == {"ensemble of 2": pytest.approx(expected)}


def test_ensemble_refusals(run, trained_dual_encoder, monkeypatch):
  config, workdir, _ = run
  other_config, other_workdir, _ = trained_dual_encoder
  with pytest.raises(ValueError, match=f"{other_workdir}: its test split .* differs from {workdir}'s"):
    ensemble.evaluate_ensemble([(config, workdir), (other_config, other_workdir)], str(workdir))
  with pytest.raises(app.UsageError, match="--ensemble evaluates the models of several seeds: use it with --mode=eval"):
    run_main(monkeypatch, [f"--workdir={workdir}", "--mode=eval", "--ensemble"])
