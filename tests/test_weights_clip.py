"""CLIP importers: a tiny random transformers CLIPModel, saved as HF and as an OpenCLIP state dict, runs the same in
the Flax dual encoder; wrong checkpoints fail naming the offending keys; `common.init_params` swaps the subtree in."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rsalign_jax.models import dual_encoder  # pylint: disable=g-import-not-at-top
from rsalign_jax.weights import clip, common  # pylint: disable=g-import-not-at-top

VOCAB, WIDTH, DEPTH, HEADS, MLP, MAX_LEN, PATCH, SIZE, EMBED = 50, 32, 2, 4, 64, 12, 8, 32, 24


@pytest.fixture(scope="module")
def hf_model():
  torch.manual_seed(0)
  tower = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=MLP)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=VOCAB, max_position_embeddings=MAX_LEN, eos_token_id=VOCAB - 1, **tower),
      vision_config=dict(image_size=SIZE, patch_size=PATCH, **tower), projection_dim=EMBED)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():  # random LayerNorms and a non-default scale, so that a mis-mapped leaf shows
    for name, param in model.named_parameters():
      if "norm" in name:
        param.add_(0.1 * torch.randn_like(param))
    model.logit_scale.fill_(3.0)
  return model


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
  path = tmp_path_factory.mktemp("hf_clip")
  hf_model.save_pretrained(path, safe_serialization=True)
  return path


def open_clip_state_dict(hf_model):
  """The tiny HF CLIP renamed to OpenCLIP's layout (open_clip/model.py, transformer.py: VisionTransformer,
  TextTransformer, ResidualAttentionBlock with nn.MultiheadAttention's fused in_proj)."""
  sd = {k: v.detach().clone() for k, v in hf_model.state_dict().items() if not k.endswith("position_ids")}
  out = {"logit_scale": sd.pop("logit_scale"), "visual.proj": sd.pop("visual_projection.weight").T.contiguous(),
         "text_projection": sd.pop("text_projection.weight").T.contiguous()}
  renames = [(r"vision_model\.embeddings\.patch_embedding", "visual.conv1"),
             (r"vision_model\.embeddings\.class_embedding", "visual.class_embedding"),
             (r"vision_model\.embeddings\.position_embedding\.weight", "visual.positional_embedding"),
             (r"vision_model\.pre_layrnorm", "visual.ln_pre"), (r"vision_model\.post_layernorm", "visual.ln_post"),
             (r"vision_model\.encoder\.layers", "visual.transformer.resblocks"),
             (r"text_model\.embeddings\.token_embedding", "token_embedding"),
             (r"text_model\.embeddings\.position_embedding\.weight", "positional_embedding"),
             (r"text_model\.final_layer_norm", "ln_final"), (r"text_model\.encoder\.layers", "transformer.resblocks"),
             (r"\.layer_norm1\.", ".ln_1."), (r"\.layer_norm2\.", ".ln_2."), (r"\.mlp\.fc1\.", ".mlp.c_fc."),
             (r"\.mlp\.fc2\.", ".mlp.c_proj."), (r"\.self_attn\.out_proj\.", ".attn.out_proj.")]
  for key in [k for k in sd if ".self_attn.q_proj." in k]:
    prefix, param = key.split(".self_attn.q_proj.")
    fused = torch.cat([sd.pop(f"{prefix}.self_attn.{p}_proj.{param}") for p in "qkv"])
    sd[f"{prefix}.attn.in_proj_{param}"] = fused
  for key, value in sd.items():
    for pattern, repl in renames:
      key = re.sub(pattern, repl, key)
    out[key] = value
  return out


@pytest.fixture(scope="module")
def open_clip_file(hf_model, tmp_path_factory):
  path = tmp_path_factory.mktemp("open_clip") / "open_clip_tiny.pt"
  torch.save(open_clip_state_dict(hf_model), path)
  return path


def flax_model(**overrides):
  tower = dict(width=WIDTH, depth=DEPTH, heads=HEADS, mlp_dim=MLP, activation="quick_gelu")
  kwargs = dict(vocab_size=VOCAB, embed_dim=EMBED, image_tower="vit", image=dict(patch_size=PATCH, pool="cls", **tower),
                text_tower="transformer", text=dict(max_len=MAX_LEN, **tower), text_pool="argmax")
  return dual_encoder.Model(**{**kwargs, **overrides})


def inputs():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, SIZE, SIZE, 3)).astype(np.float32)
  lengths = np.array([5, MAX_LEN, 1])
  tokens = np.zeros((3, MAX_LEN), np.int64)
  for row, n in enumerate(lengths):
    tokens[row, :n - 1] = rng.integers(1, VOCAB - 1, n - 1)
    tokens[row, n - 1] = VOCAB - 1  # end of text: the highest id
  return images, tokens, lengths


def torch_embeddings(hf_model, images, tokens):
  with torch.no_grad():
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2))
    image = hf_model.visual_projection(hf_model.vision_model(pixel_values=pixels).pooler_output)
    text = hf_model.text_projection(hf_model.text_model(input_ids=torch.from_numpy(tokens)).pooler_output)
  return image.numpy(), text.numpy()


def abstract_params(model, text_len=MAX_LEN):
  images, tokens, lengths = inputs()
  tokens, lengths = tokens[:, :text_len], np.minimum(lengths, text_len)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, tokens, lengths, train=False))
  return {"model": variables["params"], "objective": {"log_scale": jax.ShapeDtypeStruct((), jnp.float32)}}


def flax_embeddings(model, flat):
  images, tokens, lengths = inputs()
  params = common.unflatten(flat)["model"]
  out = model.apply({"params": params}, images, jnp.asarray(tokens, jnp.int32), lengths, train=False)
  return np.asarray(out["image_embedding"]), np.asarray(out["text_embedding"])


@pytest.mark.parametrize("fmt", ["hf", "open_clip"])
def test_imported_clip_matches_torch(fmt, hf_model, hf_dir, open_clip_file):
  model = flax_model()
  loader = clip.load_hf_clip if fmt == "hf" else clip.load_open_clip
  flat = loader(str(hf_dir if fmt == "hf" else open_clip_file), abstract_params(model))
  assert float(flat["objective/log_scale"]) == pytest.approx(3.0)
  images, tokens, _ = inputs()
  want_image, want_text = torch_embeddings(hf_model, images, tokens)
  got_image, got_text = flax_embeddings(model, flat)
  np.testing.assert_allclose(got_image, want_image, atol=1e-4, rtol=0)
  np.testing.assert_allclose(got_text, want_text, atol=1e-4, rtol=0)


def test_bin_checkpoint_and_last_token_pooling_match(hf_model, tmp_path):
  torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")  # transformers 5 saves safetensors only
  model = flax_model(text_pool="last")  # inputs() put the end-of-text token at lengths - 1
  flat = clip.load_hf_clip(str(tmp_path), abstract_params(model))
  _, want_text = torch_embeddings(hf_model, *inputs()[:2])
  np.testing.assert_allclose(flax_embeddings(model, flat)[1], want_text, atol=1e-4, rtol=0)


def test_model_config_describes_the_checkpoint(hf_dir, open_clip_file):
  hf = clip.model_config(str(hf_dir), "hf")
  assert hf["image_size"] == SIZE and hf["vocab_size"] == VOCAB
  assert hf["model"]["image"] == dict(patch_size=PATCH, width=WIDTH, depth=DEPTH, heads=HEADS, mlp_dim=MLP,
                                      pool="cls", activation="quick_gelu")
  assert hf["model"]["text"] == dict(width=WIDTH, depth=DEPTH, heads=HEADS, mlp_dim=MLP, max_len=MAX_LEN,
                                     activation="quick_gelu")
  oc = clip.model_config(str(open_clip_file), "open_clip", activation="quick_gelu")
  assert oc["model"]["image"]["heads"] == 1  # OpenCLIP's convention: width // 64, at least 1
  assert {k: v for k, v in oc["model"]["image"].items() if k != "heads"} == {
      k: v for k, v in hf["model"]["image"].items() if k != "heads"}
  assert oc["model"]["embed_dim"] == EMBED and oc["model"]["text_pool"] == "argmax"


def test_shorter_text_max_len_truncates_positions(hf_model, hf_dir):
  model = flax_model(text=dict(max_len=6, width=WIDTH, depth=DEPTH, heads=HEADS, mlp_dim=MLP,
                               activation="quick_gelu"))
  flat = clip.load_hf_clip(str(hf_dir), abstract_params(model, text_len=6))
  want = hf_model.text_model.embeddings.position_embedding.weight.detach().numpy()[:6]
  np.testing.assert_array_equal(flat["model/text_encoder/positional_embedding"], want)


def save_variant(hf_model, path, edit):
  state = open_clip_state_dict(hf_model)
  edit(state)
  torch.save(state, path)
  return str(path)


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("visual.ln_post.bias"), r"missing in checkpoint \(1\):\n    visual\.ln_post\.bias"),
    (lambda sd: sd.update(extra=torch.zeros(2)), r"unexpected in checkpoint \(1\):\n    extra"),
    (lambda sd: sd.update({"visual.ln_post.weight": torch.zeros(WIDTH + 1)}),
     r"shape mismatch \(1\):\n    'visual\.ln_post\.weight' \(33,\) -> 'model/image_encoder/ln_post/scale' \(33,\), "
     r"model expects \(32,\)"),
])
def test_wrong_checkpoint_names_the_key(edit, message, hf_model, tmp_path):
  path = save_variant(hf_model, tmp_path / "bad.pt", edit)
  with pytest.raises(common.WeightsMismatchError, match=message):
    clip.load_open_clip(path, abstract_params(flax_model()))


def test_wrong_architecture_is_one_clear_error(open_clip_file):
  model = flax_model(image=dict(patch_size=PATCH, width=WIDTH, depth=1, heads=HEADS, mlp_dim=MLP, pool="cls"))
  with pytest.raises(common.WeightsMismatchError, match=r"image_depth: checkpoint 2, model 1"):
    clip.load_open_clip(str(open_clip_file), abstract_params(model))
  with pytest.raises(common.WeightsMismatchError, match="image_tower='vit'"):
    clip.load_open_clip(str(open_clip_file), abstract_params(flax_model(image_tower="resnet", image=dict(width=8))))


def test_init_params_replaces_the_subtree_and_keeps_the_rest(open_clip_file):
  model = flax_model()
  images, tokens, lengths = inputs()
  variables = model.init(jax.random.key(1), images, tokens, lengths, train=False)
  tree = {"params": {"model": variables["params"], "objective": {"log_scale": jnp.float32(2.6), "bias": 1.0}},
          "batch_stats": {}}
  init = {"clip": dict(format="clip.load_open_clip", checkpoint=str(open_clip_file), into="params"),
          "unused": dict(format="clip.load_hf_clip", checkpoint="")}
  new = common.init_params(tree, init)
  assert new["batch_stats"] == {} and new["params"]["objective"]["bias"] == 1.0
  assert float(new["params"]["objective"]["log_scale"]) == pytest.approx(3.0)
  assert jax.tree.structure(new["params"]["model"]) == jax.tree.structure(variables["params"])
  want = open_clip_state_dict_value(open_clip_file, "visual.proj")
  np.testing.assert_array_equal(new["params"]["model"]["image_projection"]["kernel"], want)
  with pytest.raises(ValueError, match="no module rsalign_jax.weights.nope"):
    common.init_params(tree, {"x": dict(format="nope.load", checkpoint="x")})
  with pytest.raises(ValueError, match="use into='params'"):
    common.init_params(tree, {"x": dict(format="clip.load_open_clip", checkpoint=str(open_clip_file), into="")})


def open_clip_state_dict_value(path, key):
  return torch.load(path, weights_only=True)[key].numpy()


def test_load_state_dict_errors_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="holds none of the expected weight files"):
    common.load_state_dict(str(tmp_path))
  (tmp_path / "w.npz").write_bytes(b"")
  with pytest.raises(ValueError, match="w.npz: unknown checkpoint format"):
    common.load_state_dict(str(tmp_path / "w.npz"))
