"""CLIP checkpoints (HF transformers CLIPModel, OpenCLIP state dicts) -> params of models/dual_encoder.py.

- `load_hf_clip(checkpoint, expected=None)`: a directory from `CLIPModel.save_pretrained` (model.safetensors or
  pytorch_model.bin) or one such file.
- `load_open_clip(checkpoint, expected=None)`: an OpenCLIP ViT state dict (.pt/.bin/.safetensors; the format of
  RemoteCLIP and GeoRSCLIP releases): `visual.{conv1, class_embedding, positional_embedding, ln_pre,
  transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_post, proj}`,
  `token_embedding`, `positional_embedding`, `transformer.resblocks.N...`, `ln_final`, `text_projection`,
  `logit_scale`. ResNet (ModifiedResNet) visual towers are not supported.
Both return {'/'-path: array} under the trainer's params tree: `model/...` (ViT image tower, text Transformer,
both projections) and `objective/log_scale` (CLIP's `logit_scale`; skipped when `expected` has no such leaf), so
`config.init` entries use `into='params'`. With `expected` (that tree), the architecture is checked first (one
clear error listing every differing dimension and the settings to use), then every key (common.convert). A text
positional table longer than the model's `max_len` is truncated to its first rows (valid under the causal mask).
`model_config(checkpoint, format)` returns the `config.model` (and image size / vocabulary size) that fits a
checkpoint. Attention heads are not visible in the weights: HF reads them from config.json next to the weights,
OpenCLIP uses its width // 64 convention (at least 1); `activation` likewise (HF config.json, else the library's
default: 'quick_gelu' for HF, 'gelu' for OpenCLIP, whose OpenAI-trained '-quickgelu' models need 'quick_gelu').
`packaged_bpe()` finds CLIP's BPE merges file in the installed `open-clip-torch` package (the text towers' tokenizer,
data.tokenizers.ClipBpeTokenizer); the package is never imported, its dependencies need not be installed.
"""
import importlib.util
import json
import os
import re

import numpy as np

from rsalign_jax.weights import common
from rsalign_jax.weights.common import Rule, chunk, conv_kernel, linear_kernel

FORMATS = ("hf", "open_clip")
OPEN_CLIP_PACKAGE, OPEN_CLIP_REQUIREMENT = "open_clip", "open-clip-torch==3.3.0"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# The pixel normalisation CLIP checkpoints were trained with (OpenAI CLIP's, kept by OpenCLIP, RemoteCLIP, GeoRSCLIP).
PIXEL_MEAN, PIXEL_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin") + common.HF_CANDIDATES


# ------------------------------------------------------------------------------------------------ key layouts

# Our residual-block submodules -> the checkpoint's modules inside one block.
HF_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn/query": "self_attn.q_proj",
            "attn/key": "self_attn.k_proj", "attn/value": "self_attn.v_proj", "attn/out": "self_attn.out_proj",
            "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}
OPEN_CLIP_BLOCK = {"ln_1": "ln_1", "ln_2": "ln_2", "attn/out": "attn.out_proj", "mlp/fc1": "mlp.c_fc",
                   "mlp/fc2": "mlp.c_proj"}  # + q/k/v as thirds of the fused attn.in_proj_{weight,bias}


def _block(src, dst, modules, fused_qkv):
  rules = []
  for ours, theirs in modules.items():
    if ours.startswith("ln"):
      rules += _layer_norm(f"{src}.{theirs}", f"{dst}/{ours}")
    else:
      rules += [Rule(f"{dst}/{ours}/kernel", f"{src}.{theirs}.weight", linear_kernel),
                Rule(f"{dst}/{ours}/bias", f"{src}.{theirs}.bias")]
  if fused_qkv:
    for index, name in enumerate(("query", "key", "value")):
      rules += [Rule(f"{dst}/attn/{name}/kernel", f"{src}.attn.in_proj_weight", chunk(index, 3, linear_kernel)),
                Rule(f"{dst}/attn/{name}/bias", f"{src}.attn.in_proj_bias", chunk(index, 3))]
  return rules


def _layer_norm(src, dst):
  return [Rule(f"{dst}/scale", f"{src}.weight"), Rule(f"{dst}/bias", f"{src}.bias")]


def _num_blocks(state_dict, pattern):
  indices = {int(m.group(1)) for k in state_dict if (m := re.match(pattern, k))}
  return max(indices) + 1 if indices else 0


def _hf_rules(state_dict, text_len):
  img, txt = "model/image_encoder", "model/text_encoder"
  rules = [Rule(f"{img}/conv1/kernel", "vision_model.embeddings.patch_embedding.weight", conv_kernel),
           Rule(f"{img}/class_embedding", "vision_model.embeddings.class_embedding"),
           Rule(f"{img}/positional_embedding", "vision_model.embeddings.position_embedding.weight"),
           *_layer_norm("vision_model.pre_layrnorm", f"{img}/ln_pre"),
           *_layer_norm("vision_model.post_layernorm", f"{img}/ln_post"),
           Rule("model/image_projection/kernel", "visual_projection.weight", linear_kernel),
           Rule(f"{txt}/token_embedding/embedding", "text_model.embeddings.token_embedding.weight"),
           Rule(f"{txt}/positional_embedding", "text_model.embeddings.position_embedding.weight",
                _first_rows(text_len)),
           *_layer_norm("text_model.final_layer_norm", f"{txt}/ln_final"),
           Rule("model/text_projection/kernel", "text_projection.weight", linear_kernel),
           Rule("objective/log_scale", "logit_scale")]
  for tower, src in ((img, "vision_model"), (txt, "text_model")):
    for i in range(_num_blocks(state_dict, rf"{src}\.encoder\.layers\.(\d+)\.")):
      rules += _block(f"{src}.encoder.layers.{i}", f"{tower}/transformer/resblock_{i}", HF_BLOCK, fused_qkv=False)
  return rules


def _open_clip_rules(state_dict, text_len):
  img, txt = "model/image_encoder", "model/text_encoder"
  rules = [Rule(f"{img}/conv1/kernel", "visual.conv1.weight", conv_kernel),
           Rule(f"{img}/class_embedding", "visual.class_embedding"),
           Rule(f"{img}/positional_embedding", "visual.positional_embedding"),
           *_layer_norm("visual.ln_pre", f"{img}/ln_pre"),
           *_layer_norm("visual.ln_post", f"{img}/ln_post"),
           Rule("model/image_projection/kernel", "visual.proj"),
           Rule(f"{txt}/token_embedding/embedding", "token_embedding.weight"),
           Rule(f"{txt}/positional_embedding", "positional_embedding", _first_rows(text_len)),
           *_layer_norm("ln_final", f"{txt}/ln_final"),
           Rule("model/text_projection/kernel", "text_projection"),
           Rule("objective/log_scale", "logit_scale", lambda x: np.reshape(x, ()))]
  for tower, src in ((img, "visual.transformer"), (txt, "transformer")):
    for i in range(_num_blocks(state_dict, rf"{re.escape(src)}\.resblocks\.(\d+)\.")):
      rules += _block(f"{src}.resblocks.{i}", f"{tower}/transformer/resblock_{i}", OPEN_CLIP_BLOCK, fused_qkv=True)
  return rules


def _first_rows(n):
  return None if n is None else (lambda table: table[:n])


# ------------------------------------------------------------------------------------------------ architecture

def _checkpoint_arch(state_dict, fmt, checkpoint):
  """The dimensions a checkpoint fixes, from its shapes."""
  if fmt == "hf":
    keys = dict(conv="vision_model.embeddings.patch_embedding.weight",
                pos="vision_model.embeddings.position_embedding.weight",
                tok="text_model.embeddings.token_embedding.weight",
                tpos="text_model.embeddings.position_embedding.weight",
                fc1="vision_model.encoder.layers.0.mlp.fc1.weight", tfc1="text_model.encoder.layers.0.mlp.fc1.weight",
                proj="visual_projection.weight")
    img_depth, txt_depth = (_num_blocks(state_dict, rf"{tower}\.encoder\.layers\.(\d+)\.")
                            for tower in ("vision_model", "text_model"))
  else:
    keys = dict(conv="visual.conv1.weight", pos="visual.positional_embedding", tok="token_embedding.weight",
                tpos="positional_embedding", fc1="visual.transformer.resblocks.0.mlp.c_fc.weight",
                tfc1="transformer.resblocks.0.mlp.c_fc.weight", proj="text_projection")
    img_depth = _num_blocks(state_dict, r"visual\.transformer\.resblocks\.(\d+)\.")
    txt_depth = _num_blocks(state_dict, r"transformer\.resblocks\.(\d+)\.")
  absent = [k for k in keys.values() if k not in state_dict]
  if absent:
    raise common.WeightsMismatchError(
        f"{checkpoint}: not a {fmt} CLIP ViT checkpoint: it lacks {absent}" + (
            " (OpenCLIP ResNet visual towers are not supported)" if "visual.conv1.weight" in absent else ""))
  conv, proj = state_dict[keys["conv"]], state_dict[keys["proj"]]
  return dict(image_width=conv.shape[0], patch_size=conv.shape[-1], image_positions=state_dict[keys["pos"]].shape[0],
              image_depth=img_depth, image_mlp_dim=state_dict[keys["fc1"]].shape[0],
              vocab_size=state_dict[keys["tok"]].shape[0], text_width=state_dict[keys["tok"]].shape[1],
              text_positions=state_dict[keys["tpos"]].shape[0], text_depth=txt_depth,
              text_mlp_dim=state_dict[keys["tfc1"]].shape[0], embed_dim=proj.shape[0 if fmt == "hf" else 1])


def _model_arch(model):
  """The same dimensions of a dual encoder's params (arrays or ShapeDtypeStructs)."""
  img, txt = model.get("image_encoder", {}), model.get("text_encoder", {})
  if "conv1" not in img or "class_embedding" not in img:
    raise common.WeightsMismatchError("CLIP checkpoints need model.image_tower='vit' with pool='cls'")
  if "token_embedding" not in txt:
    raise common.WeightsMismatchError("CLIP checkpoints need model.text_tower='transformer'")
  depth = lambda tower: sum(k.startswith("resblock_") for k in tower["transformer"])
  conv = img["conv1"]["kernel"].shape
  return dict(image_width=conv[-1], patch_size=conv[0], image_positions=img["positional_embedding"].shape[0],
              image_depth=depth(img), image_mlp_dim=img["transformer"]["resblock_0"]["mlp"]["fc1"]["kernel"].shape[1],
              vocab_size=txt["token_embedding"]["embedding"].shape[0], text_width=txt["positional_embedding"].shape[1],
              text_positions=txt["positional_embedding"].shape[0], text_depth=depth(txt),
              text_mlp_dim=txt["transformer"]["resblock_0"]["mlp"]["fc1"]["kernel"].shape[1],
              embed_dim=model["text_projection"]["kernel"].shape[1])


def _check_arch(ckpt, model, checkpoint, fmt):
  differ = [f"{k}: checkpoint {ckpt[k]}, model {model[k]}" for k in ckpt
            if ckpt[k] != model[k] and not (k == "text_positions" and model[k] < ckpt[k])]
  if differ:
    raise common.WeightsMismatchError(
        f"{checkpoint}: the model's architecture differs from the {fmt} CLIP checkpoint:\n  " + "\n  ".join(differ)
        + f"\n(weights.clip.model_config({checkpoint!r}, {fmt!r}) gives the matching config.model; the image "
        "size is (image_positions - 1)**0.5 * patch_size and the vocabulary must be the checkpoint's)")


# ------------------------------------------------------------------------------------------------ loaders

def read(checkpoint, fmt):
  """The checkpoint's state dict."""
  if fmt not in FORMATS:
    raise ValueError(f"CLIP format {fmt!r}: expected one of {FORMATS}")
  return common.load_state_dict(checkpoint, _OPEN_CLIP_FILES if fmt == "open_clip" else common.HF_CANDIDATES)


def _load(checkpoint, expected, fmt):
  state_dict = read(checkpoint, fmt)
  ckpt_arch = _checkpoint_arch(state_dict, fmt, checkpoint)
  text_len, subset, ignore = None, None, [r".*position_ids", r"attn_mask", r"logit_bias"]
  if expected is not None:
    if "model" not in expected:
      raise ValueError("CLIP loaders fill the trainer's params tree {'model': ..., 'objective': ...}: use "
                       f"into='params', got a subtree with keys {sorted(expected)}")
    _check_arch(ckpt_arch, _model_arch(expected["model"]), checkpoint, fmt)
    text_len = expected["model"]["text_encoder"]["positional_embedding"].shape[0]
    subset = {"model": expected["model"]}
    if "log_scale" in expected.get("objective", {}):
      subset["objective"] = {"log_scale": expected["objective"]["log_scale"]}
  rules = (_hf_rules if fmt == "hf" else _open_clip_rules)(state_dict, text_len)
  if subset is not None and "objective" not in subset:
    rules = [r for r in rules if r.target != "objective/log_scale"]
    ignore.append("logit_scale")
  return common.convert(state_dict, rules, subset, ignore=ignore, what=f"{fmt} CLIP checkpoint {checkpoint}")


def load_hf_clip(checkpoint: str, expected=None) -> dict[str, np.ndarray]:
  """HF CLIPModel weights -> {'model/...', 'objective/log_scale'} arrays (module docstring)."""
  return _load(checkpoint, expected, "hf")


def load_open_clip(checkpoint: str, expected=None) -> dict[str, np.ndarray]:
  """OpenCLIP ViT state dict -> {'model/...', 'objective/log_scale'} arrays (module docstring)."""
  return _load(checkpoint, expected, "open_clip")


def model_config(checkpoint: str, fmt: str, activation: str | None = None) -> dict:
  """{'model': config.model for the dual encoder, 'image_size': int, 'vocab_size': int} fitting a checkpoint."""
  arch = _checkpoint_arch(read(checkpoint, fmt), fmt, checkpoint)
  hf = _hf_config(checkpoint) if fmt == "hf" else {}
  default_activation = "quick_gelu" if fmt == "hf" else "gelu"  # transformers' CLIPConfig / OpenCLIP defaults

  def tower(settings, width, **dims):
    return dict(width=width, heads=settings.get("num_attention_heads", max(1, width // 64)),
                activation=activation or settings.get("hidden_act", default_activation), **dims)

  image = tower(hf.get("vision_config", {}), arch["image_width"], patch_size=arch["patch_size"],
                depth=arch["image_depth"], mlp_dim=arch["image_mlp_dim"], pool="cls")
  text = tower(hf.get("text_config", {}), arch["text_width"], depth=arch["text_depth"], mlp_dim=arch["text_mlp_dim"],
               max_len=arch["text_positions"])
  model = dict(embed_dim=arch["embed_dim"], image_tower="vit", image=image, text_tower="transformer", text=text,
               text_pool="argmax")
  grid = round((arch["image_positions"] - 1) ** 0.5)
  return dict(model=model, image_size=grid * arch["patch_size"], vocab_size=arch["vocab_size"])


def _hf_config(checkpoint):
  path = os.path.join(checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint), "config.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def packaged_bpe() -> str:
  """Path of CLIP's BPE merges file (`open_clip/bpe_simple_vocab_16e6.txt.gz`) in the installed open-clip-torch."""
  spec = importlib.util.find_spec(OPEN_CLIP_PACKAGE)
  path = os.path.join(list(spec.submodule_search_locations)[0], BPE_FILE) if spec else ""
  if not os.path.exists(path):
    raise FileNotFoundError(f"CLIP's BPE vocabulary not found (Python package {OPEN_CLIP_PACKAGE!r}, file {BPE_FILE}); "
                            f"install it with `pip install --no-deps {OPEN_CLIP_REQUIREMENT}` or "
                            "`python -m rsalign_jax.weights fetch`")
  return path
