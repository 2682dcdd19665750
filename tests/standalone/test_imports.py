"""The standalone path must not import megatron or deepspeed (checked in a fresh interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys, tempfile
import megatron_bd3.standalone
import megatron_bd3.standalone.reference_format
import megatron_bd3.cli.sample as sample_cli
from megatron_bd3.data.corpus import default_corpus_path
from megatron_bd3.data.tokenizer_training import SentencePieceOptions, train_sentencepiece
from tests.standalone.helpers import tiny_network

directory = tempfile.mkdtemp()
lines = [l for l in default_corpus_path().read_text(encoding="utf-8").splitlines() if l.strip()]
tokenizer = train_sentencepiece(lines[:100], SentencePieceOptions(vocab_size=200))
ids = tokenizer.special_ids
tiny_network(vocab_size=200, mask_token_id=ids["mask_id"], bos_token_id=ids["bos_id"],
             eos_token_id=ids["eos_id"], pad_token_id=ids["pad_id"]).save_pretrained(directory)
tokenizer.save(directory)
assert sample_cli.main([directory, "--prompt", "The", "--length", "12", "--quiet"]) == 0
print("IMPORTED", sorted(m for m in sys.modules if m.split(".")[0] in ("megatron", "deepspeed")))
"""


def test_standalone_imports_neither_megatron_nor_deepspeed():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "IMPORTED []" in result.stdout, result.stdout
