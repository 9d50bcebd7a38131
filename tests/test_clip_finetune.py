"""Fine-tuning CLIP checkpoints (configs/clip_finetune.py): a tiny random HF CLIPModel and CLIP BPE files made here
give transformers' CLIPTokenizer's token ids and torch's embeddings before training, then train through the trainer
with either loss, fully or LiT style."""
import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import disabled, load_config, runlocal_config  # pylint: disable=g-import-not-at-top
from test_tokenizers import write_clip_bpe  # pylint: disable=g-import-not-at-top
from test_weights_clip import open_clip_state_dict  # pylint: disable=g-import-not-at-top
from rsalign_jax import experiment, train  # pylint: disable=g-import-not-at-top
from rsalign_jax.weights import clip, common  # pylint: disable=g-import-not-at-top

WIDTH, DEPTH, HEADS, MLP, PATCH, SIZE, EMBED, CONTEXT = 128, 2, 2, 256, 8, 32, 24, 16  # heads: OpenCLIP's width // 64
# RSICD/RSITMD-style captions: punctuation, capitals, digits, an apostrophe, accents, one longer than the context.
CAPTIONS = ["Many planes are parked near the terminal.", "A green RIVER, with a bridge; and 3 trees!",
            "two baseball fields near 12 white buildings", "the airport's runway (white) is long",
            "a naïve café near the river", "many planes are parked near the long terminal building of the airport"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """(an HF CLIPModel directory with CLIP BPE files vocab.json + merges.txt, the same weights as an OpenCLIP state
  dict file, the torch model)."""
  folder = write_clip_bpe(tmp_path_factory.mktemp("tiny_clip"))
  vocab_size = len(json.loads((folder / "vocab.json").read_text()))
  torch.manual_seed(0)
  tower = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=MLP)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=vocab_size, max_position_embeddings=CONTEXT, bos_token_id=vocab_size - 2,
                       eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, **tower),
      vision_config=dict(image_size=SIZE, patch_size=PATCH, **tower), projection_dim=EMBED)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():  # random LayerNorms, so that a mis-mapped leaf shows
    for name, param in model.named_parameters():
      if "norm" in name:
        param.add_(0.1 * torch.randn_like(param))
  model.save_pretrained(folder)
  open_clip_file = tmp_path_factory.mktemp("open_clip") / "tiny_open_clip.pt"
  torch.save(open_clip_state_dict(model), open_clip_file)
  return folder, open_clip_file, model


def hf_arg(folder, extra=""):
  return f"runlocal,checkpoint={folder},format=hf{extra}"


def test_token_ids_equal_transformers_clip_tokenizer(checkpoint, tmp_path):
  folder = checkpoint[0]
  config = load_config("clip_finetune", hf_arg(folder))
  assert config.text.tokenizer == "clip_bpe" and config.text.max_len == CONTEXT
  assert config.text.vocab_file == str(folder / "vocab.json")  # the HF directory's BPE files
  tokenizer = experiment.load_tokenizer(config, None, str(tmp_path))
  tokens, lengths, truncated = tokenizer.encode_batch(CAPTIONS, config.text.max_len)
  reference = transformers.CLIPTokenizer.from_pretrained(folder)
  want = reference(CAPTIONS, truncation=True, max_length=CONTEXT)["input_ids"]
  assert [row[:n].tolist() for row, n in zip(tokens, lengths)] == want
  assert not any(row[n:].any() for row, n in zip(tokens, lengths))  # 0-padded
  full = reference(CAPTIONS)["input_ids"]
  assert truncated == sum(len(ids) > CONTEXT for ids in full) >= 1
  assert (tmp_path / "clip_bpe.json").exists()


def test_the_workdir_keeps_the_bpe_and_refuses_another(checkpoint, tmp_path):
  other = write_clip_bpe(tmp_path, words=("harbour", "boats"))
  config = load_config("clip_finetune", hf_arg(checkpoint[0], f",vocab_file={other / 'vocab.json'}"))
  workdir = tmp_path / "workdir"
  workdir.mkdir()
  kept = experiment.load_tokenizer(config, None, str(workdir))
  (other / "vocab.json").unlink()  # the workdir's copy serves from now on
  assert experiment.load_tokenizer(config, None, str(workdir)).vocabulary() == kept.vocabulary()
  config.text.vocab_file = str(checkpoint[0] / "vocab.json")
  with pytest.raises(ValueError, match="differs from the vocabulary this workdir trained with"):
    experiment.load_tokenizer(config, None, str(workdir))


def torch_embeddings(model, folder, images, captions):
  ids = transformers.CLIPTokenizer.from_pretrained(folder)(
      captions, truncation=True, max_length=CONTEXT, padding="max_length", return_tensors="pt")["input_ids"]
  with torch.no_grad():
    image = model.visual_projection(model.vision_model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
                                    .pooler_output)
    text = model.text_projection(model.text_model(input_ids=ids).pooler_output)
  return image.numpy(), text.numpy()


@pytest.mark.parametrize("fmt", ["hf", "open_clip"])
def test_embeddings_equal_torch_before_training(fmt, checkpoint, tmp_path):
  folder, open_clip_file, torch_model = checkpoint
  arg = hf_arg(folder) if fmt == "hf" else (f"runlocal,checkpoint={open_clip_file},vocab_file={folder / 'vocab.json'},"
                                            "activation=quick_gelu")
  config = load_config("clip_finetune", arg)
  tokenizer = experiment.load_tokenizer(config, None, str(tmp_path))
  model = experiment.build_model(config, tokenizer.size)
  tokens, lengths, _ = tokenizer.encode_batch(CAPTIONS, config.text.max_len)
  images = np.random.default_rng(0).normal(size=(len(CAPTIONS), SIZE, SIZE, 3)).astype(np.float32)
  variables = experiment.pretrained_model_variables(model, config, dict(image=images, tokens=tokens, lengths=lengths),
                                                    jax.random.key(0))
  ours = model.apply(variables, images, tokens, lengths, train=False)
  want_image, want_text = torch_embeddings(torch_model, folder, images, CAPTIONS)
  np.testing.assert_allclose(ours["image_embedding"], want_image, atol=1e-4, rtol=0)
  np.testing.assert_allclose(ours["text_embedding"], want_text, atol=1e-4, rtol=0)


def test_config_takes_the_checkpoints_model_and_the_options(checkpoint):
  folder, open_clip_file, _ = checkpoint
  config = load_config("clip_finetune", f"rsitmd,manual_dir=/data/RSITMD,checkpoint={folder},format=hf,lit,"
                                        "loss=sigmoid")
  assert (config.dataset.name, config.dataset.manual_dir, config.loss.kind) == ("rsitmd", "/data/RSITMD", "sigmoid")
  assert config.model.frozen == ("image",) and config.optimizer.frozen == ("model/image_encoder/.*",)
  assert (config.model.text_pool, config.model.embed_dim, config.model.image.patch_size) == ("argmax", EMBED, PATCH)
  assert config.model.text.to_dict() == dict(width=WIDTH, heads=HEADS, activation="quick_gelu", depth=DEPTH,
                                             mlp_dim=MLP, max_len=CONTEXT)
  assert config.init.clip.to_dict() == dict(format="clip.load_hf_clip", checkpoint=str(folder), into="params")
  assert config.input.pp_eval == f"decode|resize({SIZE})|normalize({clip.PIXEL_MEAN}, {clip.PIXEL_STD})"
  full = load_config("clip_finetune", f"checkpoint={open_clip_file},vocab_file=bpe.txt.gz")
  assert (full.model.frozen, full.optimizer.frozen, full.loss.kind) == ((), (), "softmax")
  assert full.init.clip.format == "clip.load_open_clip" and full.text.vocab_file == "bpe.txt.gz"
  assert full.model.image.activation == "gelu"  # OpenCLIP's default: no config.json beside a state dict
  with pytest.raises(ValueError, match="config arg checkpoint=PATH is required"):
    load_config("clip_finetune", "rsicd")
  with pytest.raises(ValueError, match="config arg format='onnx': expected one of"):
    load_config("clip_finetune", f"checkpoint={folder},format=onnx")
  with pytest.raises(ValueError, match="config arg loss='hinge': expected one of"):
    load_config("clip_finetune", f"checkpoint={folder},format=hf,loss=hinge")


def restored_model_params(workdir, step):
  return ocp.StandardCheckpointer().restore(pathlib.Path(workdir) / "checkpoints" / str(step) / "state")["params"][
      "model"]


def same(tree, other):
  return all(jax.tree.leaves(jax.tree.map(np.array_equal, tree, other)))


@pytest.mark.parametrize("loss, lit", [("softmax", False), ("sigmoid", True)])
def test_fine_tuning_trains_through_the_trainer(loss, lit, checkpoint, tmp_path_factory):
  folder = checkpoint[0]
  config = runlocal_config(tmp_path_factory, "clip_finetune", hf_arg(folder, f",loss={loss}" + (",lit" if lit else "")),
                           total_steps=2, **disabled("random_init", "val", "val_gallery"))
  workdir = tmp_path_factory.mktemp(f"finetune_{loss}")
  results = train.train_and_evaluate(config, str(workdir))
  assert results["total_steps"] == 2 and np.isfinite(results["test"]["mR"])
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [line["train/loss"] for line in lines if "train/loss" in line]
  assert len(losses) == 2 and np.isfinite(losses).all()
  trained = restored_model_params(workdir, 2)
  start = common.unflatten(clip.load_hf_clip(str(folder)))["model"]
  assert same(trained["image_encoder"], start["image_encoder"]) == lit  # LiT: the image tower never moves
  assert not same(trained["text_encoder"], start["text_encoder"])
  assert (workdir / "clip_bpe.json").exists()
