"""Packaging for megatron_bd3.

torch is pinned to the exact release the project is tested with. Install it *before* this
package (the Makefile does) so pip resolves the pin against the build already present: on a
CPU machine that is the CPU wheel, and nothing here can pull a CUDA build on top of it.
apex is optional and never a dependency (see README, "GPU installs").
"""

from setuptools import find_packages, setup

TORCH_VERSION = "2.13.0"
TRANSFORMERS = "transformers==5.25.0"

install_requires = [
    f"torch=={TORCH_VERSION}",
    "megatron-core==0.16.1",
    "deepspeed==0.19.8",
    "webdataset==1.0.2",
    "sentencepiece==0.2.3",
    "wandb==0.31.0",
    "safetensors==0.8.0",
    "pyyaml==6.0.3",
    "tqdm==4.70.1",
    "numpy==2.4.6",
    # Carries the embedded default corpus (the Lee news corpus in its test data); read as a file,
    # never imported at run time.
    "gensim==4.4.0",
    # Input formats of the data tools: parquet files and Hugging Face tokenizer JSON files.
    "pyarrow==26.0.1",
    "tokenizers==0.23.3",
    # MediaWiki XML input (Wikipedia dumps): wikitext markup -> plain text.
    "mwparserfromhell==0.7.2",
]

extras_require = {
    "dev": ["pytest==9.2.0", "ruff==0.17.6"],
    # bd3-eval: the Hugging Face causal-LM scorer of generative perplexity (a local model
    # directory, never a hub download) and plots. Neither pulls torch: the pin above stands.
    "eval": [TRANSFORMERS, "matplotlib==3.11.2"],
    # Hugging Face model directories (bd3-convert --to hf / --to reference): loading them with the
    # Auto classes, and the parity check of --to hf. The core install never needs transformers.
    "hf": [TRANSFORMERS],
}

setup(
    name="megatron_bd3",
    version="0.1.0",
    description="Distributed training of Block Diffusion language models (BD3-LM) on megatron-core",
    python_requires=">=3.10",
    # megatron_bd3 alone: tools/ (demo, benchmarks) runs from the checkout and is never installed,
    # so no top-level `tools` package lands in site-packages.
    packages=find_packages(include=["megatron_bd3", "megatron_bd3.*"]),
    # The shipped run configs and DeepSpeed JSONs (megatron_bd3.paths finds them by name).
    package_data={"megatron_bd3": ["configs/*.yaml", "configs/deepspeed/*.json"]},
    include_package_data=True,
    install_requires=install_requires,
    extras_require=extras_require,
    entry_points={
        "console_scripts": [
            "bd3-train-tokenizer=megatron_bd3.cli.train_tokenizer:main",
            "bd3-prepare-data=megatron_bd3.cli.prepare_data:main",
            "bd3-train=megatron_bd3.cli.train:main",
            "bd3-convert=megatron_bd3.cli.convert:main",
            "bd3-sample=megatron_bd3.cli.sample:main",
            "bd3-eval=megatron_bd3.cli.eval:main",
        ]
    },
)
