"""Importers of pretrained PyTorch-format weights (HF transformers, OpenCLIP, torchvision-style) into Flax params.

`common` holds the shared machinery (state-dict loading, key-by-key conversion with a mismatch report,
`init_params` for `config.init`); each other module maps one family of checkpoints onto this library's modules.
"""
