"""clrjax: large-batch self-supervised contrastive learning in JAX/Flax."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "jaxlib>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "ml-collections>=1.1.0",
    "absl-py>=2.1",
    "chex>=0.1.90",
    "numpy>=1.26",
    "scikit-learn>=1.4",
    "grain>=0.2.18",
    "tensorflow-datasets>=4.9.10",
    # tensorflow-datasets 4.9.10 imports importlib_resources without declaring it.
    "importlib_resources>=6.0",
    # TensorBoard event files are written with tensorboard.summary.Writer (no TensorFlow).
    "tensorboard>=2.16",
    "matplotlib>=3.8",
    "safetensors>=0.4",
    # JPEG decoding of your own images (clrjax/data/decoding.py; chosen by measurement, BENCHMARKS.md).
    "simplejpeg>=1.7",
]

EXTRAS_REQUIRE = {
    # The test extra includes the gcs extra and a local GCS emulator (tests/test_gcs_workdir.py).
    "test": ["pytest>=8.0", "pytest-xdist>=3.5", "gcsfs>=2026.10.1", "gcp-storage-emulator>=2026.7.19"],
    # gs:// workdirs (clrjax/storage.py): gcsfs for config, metrics and the other files; Orbax's
    # arrays go through TensorStore's own GCS driver.
    "gcs": ["gcsfs>=2026.10.1"],
    # TensorFlow is only needed to *build* TFDS datasets that use the Image feature (`tfds build`).
    "tf": ["tensorflow>=2.16"],
    # PyTorch is only needed to check the exported torchvision state_dict.
    "torch": ["torch>=2.4"],
    # SentencePiece and BPE (tokenizer.json) vocabularies for the text tokenizer (clrjax/data/tokenizers.py).
    "text": ["sentencepiece>=0.2", "tokenizers>=0.15"],
}

setup(
    name="clrjax",
    version="0.1.0",
    description="Large-batch self-supervised contrastive learning (SimCLR, Barlow Twins, VICReg, TiCo) in JAX/Flax.",
    packages=find_packages(include=["clrjax", "clrjax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
