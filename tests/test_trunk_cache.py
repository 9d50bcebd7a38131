"""Frozen trunks computed once (`rsalign_jax.trunk_cache`): training and evaluating heads on cached trunk outputs
is the same optimisation as recomputing the frozen towers every step, and the cache is reused, keyed and checked."""
import json
import shutil

from absl import app
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import disabled, run_main, runlocal_config, with_querybank
import rsalign_jax
from rsalign_jax import experiment, train, trunk_cache
from rsalign_jax.evaluation import evaluators as evaluators_lib
from rsalign_jax.models import amfmn, dual_encoder, hvsa
from rsalign_jax.modes import ensemble, export, search
from rsalign_jax.modes import trained as trained_lib
from rsalign_jax.runtime import sharding as sharding_lib

NO_AUGMENTATION = "decode|resize(32)|normalize"  # the eval preprocessing: the uncached run sees the cached inputs


def frozen_clip_config(tmp_path_factory, **overrides):
  return runlocal_config(tmp_path_factory, "clip", "runlocal,frozen=image+text",
                         **{**disabled("random_init", "val_gallery"), "input.pp_train": NO_AUGMENTATION, **overrides})


def train_losses(workdir):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return np.array([row["train/loss"] for row in rows if "train/loss" in row])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The same frozen-tower CLIP run, recomputing the towers and on a float32 trunk cache (one plain view)."""
  cache_dir = tmp_path_factory.mktemp("trunk_cache")
  results = {}
  for name, views in (("uncached", 0), ("cached", 1)):
    config = frozen_clip_config(tmp_path_factory, **{"trunk_cache.views": views, "trunk_cache.dtype": "float32",
                                                     "trunk_cache.dir": str(cache_dir)})
    workdir = tmp_path_factory.mktemp(name)
    results[name] = (config, workdir, train.train_and_evaluate(config, str(workdir)))
  return cache_dir, results


def test_cached_trunks_train_and_evaluate_like_recomputed_ones(runs):
  _, results = runs
  (_, uncached_dir, uncached), (_, cached_dir, cached) = results["uncached"], results["cached"]
  np.testing.assert_allclose(train_losses(cached_dir), train_losses(uncached_dir), rtol=1e-5)
  assert len(train_losses(cached_dir)) == 4
  assert cached["best_step"] == uncached["best_step"] == 4
  for split in ("test", "best_val"):
    for key, value in uncached[split].items():
      assert cached[split][key] == pytest.approx(value, abs=1e-4), (split, key)


def test_cache_files_one_per_tower_and_split_and_reused(runs, tmp_path_factory, caplog):
  cache_dir, results = runs
  config = results["cached"][0]
  folders = sorted(p.name for p in cache_dir.iterdir())
  assert folders == sorted([f"image-{trunk_cache.fingerprint(config, 'image')}",
                            f"text-{trunk_cache.fingerprint(config, 'text')}"])
  for folder in folders:
    assert sorted(p.name for p in (cache_dir / folder).iterdir()) == ["test.npz", "train.npz", "val.npz"]
  with np.load(cache_dir / folders[0] / "train.npz") as train_images:
    assert train_images["outputs"].shape == (64, 1, 1, 1, 64)  # 64 images, 1 view, a ResNet-18 width 8 map at 32 px
    assert train_images["outputs"].dtype == np.float32
  stamps = {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*.npz")}
  with caplog.at_level("INFO"):
    train.train_and_evaluate(config, str(tmp_path_factory.mktemp("again")))
  assert {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*.npz")} == stamps
  assert "trunk cache: wrote" not in caplog.text


def test_an_ensemble_of_a_cached_and_a_recomputing_run_aligns_their_captions(runs, tmp_path):
  """The two runs (one model) key the split's distinct captions differently, by cache row and by token ids: their
  ensemble scores as either alone, plain and querybank-normalised."""
  _, results = runs
  members = [(with_querybank(config), workdir) for config, workdir, _ in (results["cached"], results["uncached"])]
  cached, uncached = (trained_lib.load(c, str(w)).setup.make_evaluator("test") for c, w in members)
  columns = cached.distinct_columns_of(uncached)
  assert not np.array_equal(columns, np.arange(len(columns)))
  pair = ensemble.evaluate_ensemble(members, str(tmp_path))["metrics"]
  alone = ensemble.evaluate_ensemble(members[1:], str(tmp_path))["metrics"]
  for (pair_name, pair_row), alone_row in zip(pair.items(), alone.values(), strict=True):
    for key, value in alone_row.items():
      assert pair_row[key] == pytest.approx(value, abs=1e-4), (pair_name, key)


def test_an_ensemble_of_seeds_workdirs_one_seed_at_a_time(runs, tmp_path, monkeypatch):
  """`--members` of two seeds workdirs (seed_0, seed_1): one ensemble per seed, mean ± std over the seeds."""
  _, results = runs
  for name in ("cached", "uncached"):
    for seed in (0, 1):
      shutil.copytree(results[name][1], tmp_path / name / f"seed_{seed}")
  run_main(monkeypatch, [f"--workdir={tmp_path / 'ensemble'}", "--mode=eval", "--ensemble",
                         f"--members={tmp_path / 'cached'},{tmp_path / 'uncached'}"])
  report = json.loads((tmp_path / "ensemble" / "ensemble_test.json").read_text())
  summary = report["metrics"]["ensemble of 2"]
  assert report["seeds"] == [0, 1] and list(summary["runs"]) == ["0", "1"]
  assert report["members"]["1"] == [str(tmp_path / "cached" / "seed_1"), str(tmp_path / "uncached" / "seed_1")]
  for key, value in results["uncached"][2]["test"].items():
    assert summary["mean"][key] == pytest.approx(value, abs=1e-4) and summary["std"][key] == pytest.approx(0), key
  assert "ensemble of 2: mean ± std (2 seeds)" in report["table"]


def test_ensemble_members_refusals(runs, tmp_path, monkeypatch):
  _, results = runs
  trained_run = str(results["cached"][1])
  shutil.copytree(trained_run, tmp_path / "seeds" / "seed_0")
  with pytest.raises(ValueError, match=f"--members: {tmp_path / 'seeds'} holds the runs of seeds 0, {trained_run} a "
                                       "trained run; the members must be trained runs, or seeds workdirs of the same"):
    ensemble.member_runs([trained_run, str(tmp_path / "seeds")])
  with pytest.raises(FileNotFoundError, match=f"--members: {tmp_path} holds neither a trained run"):
    ensemble.member_runs([str(tmp_path)])
  with pytest.raises(app.UsageError, match="--members names the workdirs of an ensemble: use it with --mode=eval "
                                           "--ensemble and no --config"):
    run_main(monkeypatch, [f"--workdir={tmp_path}", "--mode=eval", f"--members={trained_run}"])


def test_test_time_views_score_alike_from_the_cache_and_recomputed(runs, tmp_path, monkeypatch):
  """`eval_views=8`: the cached run's heads read 8 cached dihedral views of each test image (and of each training
  image for the query bank: a cache of 8 training views), the recomputing run rotates and mirrors the pixels; both
  score the same, unlike one view; `--mode=eval --eval_views=8` scores so from a workdir's saved config."""
  _, results = runs
  metrics = {}
  for name in ("cached", "uncached"):
    config, workdir, _ = results[name]
    for views in (1, 8):
      config = with_querybank(config)
      config.eval_views = views
      if name == "cached":
        config.trunk_cache.views, config.trunk_cache.dir = 8, str(tmp_path)
      loaded = trained_lib.load(config, str(workdir))
      with jax.set_mesh(loaded.setup.mesh):
        plain = loaded.setup.retrieval.evaluate(loaded.setup.make_evaluator("test"), loaded.variables)
        banked = querybank_evaluator(loaded.setup).run(loaded.variables, 0, None)
      metrics[name, views] = {**plain, **{f"qb_{k}": v for k, v in banked.items()}}
  for views in (1, 8):
    for key, value in metrics["uncached", views].items():
      assert metrics["cached", views][key] == pytest.approx(value, abs=1e-4), (views, key)
  assert metrics["cached", 8]["rsum"] != metrics["cached", 1]["rsum"]
  assert metrics["cached", 8]["qb_rsum"] != metrics["cached", 1]["qb_rsum"]
  [image_folder] = tmp_path.glob("image-*")
  with np.load(image_folder / "test.8views.npz") as test_images:
    assert test_images["outputs"].shape == (16, 8, 1, 1, 64)  # 16 test images
  uncached_dir = results["uncached"][1]  # --eval_views on saved configs: one run, and an ensemble's members
  run_main(monkeypatch, [f"--workdir={uncached_dir}", "--mode=eval", "--eval_views=8"])
  run_main(monkeypatch, [f"--workdir={tmp_path / 'ensemble'}", "--mode=eval", "--ensemble",
                         f"--members={uncached_dir}", "--eval_views=8"])
  alone = json.loads((uncached_dir / "eval_test.json").read_text())["metrics"]
  [in_ensemble] = json.loads((tmp_path / "ensemble" / "ensemble_test.json").read_text())["metrics"].values()
  for key, value in metrics["uncached", 8].items():
    if not key.startswith("qb_"):
      assert alone[key] == pytest.approx(value, abs=1e-4) and in_ensemble[key] == pytest.approx(value, abs=1e-4), key
  with pytest.raises(app.UsageError, match="--eval_views is an evaluation option: use it with --mode=eval, not "
                                           "--mode=export"):
    run_main(monkeypatch, [f"--workdir={uncached_dir}", "--mode=export", "--eval_views=8"])


def querybank_evaluator(setup):
  entry = ensemble.querybank_entry(setup.config, "test")
  return evaluators_lib.build(setup, [entry])[entry.name]


def test_export_and_search_on_cached_trunks_match_the_recomputing_run(runs, tmp_path):
  _, results = runs
  found = {}
  for name in ("uncached", "cached"):
    config, workdir, _ = results[name]
    export.export(config, str(workdir), output_dir=str(tmp_path / name))
    loaded = trained_lib.load(config, str(workdir))
    with jax.set_mesh(loaded.setup.mesh):
      gallery = search.load_gallery(loaded, gallery_dir=str(tmp_path / name))
      query = tmp_path / "query.png"
      query.write_bytes(gallery.data.source[3]["image"])
      [by_image] = search.image_to_gallery(loaded, gallery, [str(query)], 5)
      [by_text] = search.text_to_images(loaded, gallery, ["a plane parked beside a green lawn"], 5)
    found[name] = ([r["row"] for r in by_image["results"]], [r["row"] for r in by_text["results"]],
                   *(np.load(tmp_path / name / f"{kind}_embeddings.npy") for kind in ("image", "caption")))
  assert found["cached"][:2] == found["uncached"][:2]
  for cached, uncached in zip(found["cached"][2:], found["uncached"][2:]):
    np.testing.assert_allclose(cached, uncached, rtol=1e-4, atol=1e-5)


def test_a_copied_workdir_embeds_with_its_saved_trunks(runs, tmp_path):
  _, results = runs
  config, workdir, _ = results["cached"]
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  saved = json.loads((copy / "config.json").read_text())
  saved["seed"] += 1  # a seed that would initialise other trunks: the copy must use the trunks saved in it
  (copy / "config.json").write_text(json.dumps(saved))
  query = tmp_path / "query.png"
  query.write_bytes(trained_lib.load(config, str(workdir)).setup.split("test").source[3]["image"])
  texts = ["a plane parked beside a green lawn", "two ships in a harbour"]
  original, copied = rsalign_jax.load(workdir), rsalign_jax.load(copy)
  assert (copy / experiment.TRUNK_VARIABLES).exists()
  np.testing.assert_array_equal(copied.encode_images([query]), original.encode_images([query]))
  np.testing.assert_array_equal(copied.encode_texts(texts), original.encode_texts(texts))


def test_fingerprint_follows_what_the_outputs_depend_on(tmp_path_factory):
  config = frozen_clip_config(tmp_path_factory, **{"trunk_cache.views": 8})
  other_views = frozen_clip_config(tmp_path_factory, **{"trunk_cache.views": 4})
  other_seed = frozen_clip_config(tmp_path_factory, **{"trunk_cache.views": 8, "seed": 3})
  other_pp = frozen_clip_config(tmp_path_factory, **{"trunk_cache.views": 8, "input.pp_eval": "decode|resize(28)"})
  other_heads = frozen_clip_config(tmp_path_factory, **{"trunk_cache.views": 8, "model.projection_hidden": 64,
                                                        "model.embed_dim": 8})
  other_trunk = frozen_clip_config(tmp_path_factory, **{"trunk_cache.views": 8, "model.image.width": 16})
  assert trunk_cache.fingerprint(config, "image") == trunk_cache.fingerprint(other_seed, "image")
  assert trunk_cache.fingerprint(config, "image") == trunk_cache.fingerprint(other_heads, "image")
  assert trunk_cache.fingerprint(config, "image") != trunk_cache.fingerprint(other_trunk, "image")
  assert trunk_cache.fingerprint(config, "image") != trunk_cache.fingerprint(other_views, "image")
  assert trunk_cache.fingerprint(config, "image") != trunk_cache.fingerprint(other_pp, "image")
  assert trunk_cache.fingerprint(config, "text") == trunk_cache.fingerprint(other_pp, "text")


def test_fine_tuning_one_tower_from_trained_heads_starts_where_they_ended_and_reuses_the_other_cache(
    runs, tmp_path_factory, caplog):
  """Linear probing then fine-tuning: the text tower trained under the heads of the cached run, whose image cache it
  reads (the `frozen` field and the heads' init entries do not change the image trunk's fingerprint)."""
  cache_dir, results = runs
  heads_config, heads_dir, heads_results = results["cached"]
  init = {f"trained_{part}": dict(format="trained.load", checkpoint=str(heads_dir), into=f"params/{part}",
                                  subtree=part) for part in ("model", "objective")}
  config = frozen_clip_config(tmp_path_factory, **{
      "trunk_cache.views": 1, "trunk_cache.dtype": "float32", "trunk_cache.dir": str(cache_dir),
      "model.frozen": ("image",), "optimizer.frozen": heads_config.optimizer.frozen[:1],
      "evals.random_init.enabled": True, **{f"init.{name}": entry for name, entry in init.items()}})
  assert trunk_cache.fingerprint(config, "image") == trunk_cache.fingerprint(heads_config, "image")
  stamps = {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*.npz")}
  workdir = tmp_path_factory.mktemp("finetune_text")
  with caplog.at_level("INFO"):
    results = train.train_and_evaluate(config, str(workdir))
  assert {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*.npz")} == stamps
  assert "trunk cache: wrote" not in caplog.text
  for key, value in heads_results["test"].items():  # its start evaluation is the heads run's tested state
    assert results["random_init"][key] == pytest.approx(value, abs=1e-4), key
  assert results["total_steps"] == 4 and np.isfinite(train_losses(workdir)).all()


def test_init_entries_that_fill_a_frozen_trunk_change_its_fingerprint(runs, tmp_path_factory):
  _, results = runs
  heads_config, heads_dir, _ = results["cached"]
  uncached_config, uncached_dir, _ = results["uncached"]  # its checkpoint holds the frozen trunks' parameters too
  fingerprints = set()
  for workdir in (heads_dir, uncached_dir):
    config = frozen_clip_config(tmp_path_factory, **{"trunk_cache.views": 1, "trunk_cache.dtype": "float32",
                                                     "init.trained": dict(format="trained.load", into="params/model",
                                                                          checkpoint=str(workdir), subtree="model")})
    fingerprints.add(trunk_cache.fingerprint(config, "image"))
  assert trunk_cache.fingerprint(heads_config, "image") in fingerprints and len(fingerprints) == 2


def test_a_split_read_twice_shares_one_copy_of_its_cached_outputs(runs, tmp_path_factory):
  """The training split's cache, read by the trainer and again for a query bank, is in memory once."""
  _, results = runs
  config = results["cached"][0]
  setup = experiment.build_setup(config, str(tmp_path_factory.mktemp("shared")), sharding_lib.make_mesh())
  name = config.dataset.train_split
  first, second = (setup.trunk_cache.images(name, setup.train_source) for _ in range(2))
  assert np.shares_memory(first[0]["image"], second[0]["image"])


def test_cached_texts_share_rows_of_identical_captions_and_compute_new_ones():
  computed = []

  def compute(captions, max_len):
    computed.append(list(captions))
    return np.array([[len(c), max_len] for c in captions], np.float16)

  texts = trunk_cache.CachedTexts(vocab=None, captions=["a road", "two planes"],
                                  outputs=np.array([[1, 1], [2, 2]], np.float16), compute=compute)
  outputs, lengths, truncated = texts.encode_batch(["two planes", "a road", "two planes"], 32)
  np.testing.assert_array_equal(outputs, [[2, 2], [1, 1], [2, 2]])
  np.testing.assert_array_equal(lengths, [1, 1, 1])
  assert truncated == 0 and computed == []
  outputs, _, _ = texts.encode_batch(["a new query", "a road"], 32)
  np.testing.assert_array_equal(outputs, [[11, 32], [1, 1]])
  assert computed == [["a new query"]]


@pytest.mark.parametrize("module,kwargs", [
    (dual_encoder, dict(image_tower="resnet", image=dict(depth=18, width=8), text_tower="transformer",
                        text=dict(width=32, depth=1, heads=2, mlp_dim=64, max_len=8), embed_dim=16)),
    (dual_encoder, dict(image_tower="resnet", image=dict(depth=18, width=8), text_tower="transformer",
                        text=dict(width=32, depth=1, heads=2, mlp_dim=64, max_len=8), embed_dim=16,
                        image_pool="mean_max", projection_hidden=24, projection_dropout=0.5)),
    (hvsa, dict(resnet_width=8, kea_slots=4, word_dim=8, hidden_dim=16, embed_dim=16)),
])
def test_precomputed_towers_read_the_trunk_outputs(module, kwargs):
  full = module.Model(vocab_size=20, frozen=("image", "text"), **kwargs)
  heads = module.Model(vocab_size=20, frozen=("image", "text"), precomputed=("image", "text"), **kwargs)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  tokens, lengths = jnp.array([[3, 4, 5, 0, 0, 0, 0, 0], [6, 7, 0, 0, 0, 0, 0, 0]]), jnp.array([3, 2])
  variables = full.init(jax.random.key(1), images, tokens, lengths, train=False)
  image_trunk = full.apply(variables, images, method="image_trunk")
  text_trunk = full.apply(variables, tokens, lengths, method="text_trunk")
  expected = full.apply(variables, images, tokens, lengths, train=False)
  head_variables = heads.init(jax.random.key(1), image_trunk, text_trunk, jnp.ones(2, jnp.int32), train=False)
  got = heads.apply(variables, image_trunk, text_trunk, jnp.ones(2, jnp.int32), train=False)
  for key in expected:
    np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6)
  trunk_names = {"image_encoder", "text_encoder", "resnet", "skipthoughts"}
  assert set(head_variables["params"]) < set(variables["params"])
  assert not trunk_names & set(head_variables["params"]), "heads must not hold trunk parameters"
  for path, value in jax.tree_util.tree_leaves_with_path(head_variables["params"]):  # same init as the full model
    np.testing.assert_array_equal(value, _leaf(variables["params"], path))


def _leaf(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_refusals_name_the_field():
  with pytest.raises(ValueError, match=r"model.precomputed=\('image',\): only frozen towers \(\) can be"):
    dual_encoder.Model(vocab_size=5, precomputed=("image",)).init(
        jax.random.key(0), jnp.zeros((1, 8)), jnp.zeros((1, 4), jnp.int32), jnp.ones(1, jnp.int32), train=False)
  model = amfmn.Model(vocab_size=5, frozen=("image",), precomputed=("image",))
  with pytest.raises(ValueError, match=r"amfmn splits only the towers \('text',\) into trunk and heads"):
    model.init(jax.random.key(0), jnp.zeros((1, 2, 2, 512)), jnp.zeros((1, 4), jnp.int32), jnp.ones(1, jnp.int32),
               train=False)


def test_config_refusals(tmp_path_factory):
  unfrozen = runlocal_config(tmp_path_factory, "clip", "runlocal", **{"trunk_cache.views": 2})
  with pytest.raises(ValueError, match="model.frozen names none; freeze the image and/or text tower"):
    experiment.build_setup(unfrozen, str(tmp_path_factory.mktemp("unfrozen")), sharding_lib.make_mesh())
  one_view = frozen_clip_config(tmp_path_factory, **{"trunk_cache.views": 1, "eval_views": 2})
  setup = experiment.build_setup(one_view, str(tmp_path_factory.mktemp("one_view")), sharding_lib.make_mesh())
  with pytest.raises(ValueError, match=r"eval_views=2 exceeds trunk_cache.views=1: the training split's cached "
                                       r"images \(e.g. a query bank's\) hold 1 views each"):
    setup.make_evaluator(one_view.dataset.train_split)
  nine = frozen_clip_config(tmp_path_factory, **{"eval_views": 9})
  with pytest.raises(ValueError, match=r"eval_views=9: expected 1..8 dihedral views of each evaluated image"):
    experiment.build_setup(nine, str(tmp_path_factory.mktemp("nine")), sharding_lib.make_mesh())
  too_many = frozen_clip_config(tmp_path_factory, **{"trunk_cache.views": 9})
  with pytest.raises(ValueError, match=r"trunk_cache.views=9: expected 1..8 dihedral views"):
    trunk_cache.cached_towers(too_many)
  head_frozen = frozen_clip_config(tmp_path_factory, **{"trunk_cache.views": 1})
  head_frozen.optimizer.frozen = tuple(head_frozen.optimizer.frozen) + ("model/image_projection/.*",)
  with pytest.raises(ValueError, match=r"optimizer.frozen matches \['model/image_projection/kernel'\]"):
    experiment.build_setup(head_frozen, str(tmp_path_factory.mktemp("head_frozen")),
                      sharding_lib.make_mesh())
