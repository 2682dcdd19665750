"""Hugging Face directories (`bd3-convert --to hf` / `--to reference`) load the way users load
models: offline through AutoConfig / AutoModelForMaskedLM / AutoTokenizer with the directory's own
code, give the standalone network's logits (two-stream and cached sampling calls) and bd3-sample's
samples, carry the tokenizer (same ids), a model card, no local path, normal file modes; a
tokenizer whose fingerprint is not the model's is refused by every tool in one line (exit 2)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

from megatron_bd3.cli.convert import main as convert_main
from megatron_bd3.cli.eval import main as eval_main
from megatron_bd3.cli.sample import main as sample_main
from megatron_bd3.convert.hf import write_tokenizer
from megatron_bd3.data import load_tokenizer
from megatron_bd3.data.corpus import default_corpus_documents
from megatron_bd3.standalone import BD3Network, KVCache
from tests.standalone.helpers import tiny_network

REPO_ROOT = Path(__file__).resolve().parents[2]
# kind -> the standalone architecture it exports: megatron_bd3's own (GQA, every bias, tied
# embeddings) to --to hf; the reference architecture (MHA, ffn = 4d) to --to reference
ARCHITECTURES = {
    "hf": dict(num_query_groups=2, qkv_bias=True, attn_out_bias=True, tie_embeddings=True),
    "reference": dict(num_query_groups=4, ffn_hidden_size=128),
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tokenizer(tiny_data):
    return load_tokenizer(tiny_data[1])


def standalone_dir(directory: Path, tokenizer, kind: str, seed: int = 0) -> BD3Network:
    """A tiny random network over the test tokenizer, saved with it (as bd3-convert would)."""
    network = tiny_network(
        seed, vocab_size=tokenizer.vocab_size, mask_token_id=tokenizer.mask_id,
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id, tokenizer_fingerprint=tokenizer.fingerprint(),
        **ARCHITECTURES[kind])
    network.save_pretrained(directory)
    tokenizer.save(directory)
    return network


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer) -> dict[str, tuple[BD3Network, Path, Path]]:
    """kind -> (standalone network, its directory, the Hugging Face export), by the CLI."""
    base = tmp_path_factory.mktemp("hf_exports")
    out = {}
    for kind in ARCHITECTURES:
        network = standalone_dir(base / f"{kind}_standalone", tokenizer, kind)
        assert convert_main(["--standalone", str(base / f"{kind}_standalone"), "--to", kind,
                             "--output", str(base / kind)]) == 0
        out[kind] = (network, base / f"{kind}_standalone", base / kind)
    return out


def relative_close(actual: torch.Tensor, expected: torch.Tensor, bound: float = 1e-5) -> None:
    scale = max(1.0, float(expected.abs().max()))
    assert float((actual - expected).abs().max()) <= bound * scale


@pytest.mark.parametrize("kind", list(ARCHITECTURES))
def test_export_loads_through_auto_classes_with_the_standalone_logits(exports, tokenizer, kind):
    network, _, directory = exports[kind]
    c = network.config
    config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
    assert config.model_type == "bd3lm" and config.return_dict is False
    assert config.tokenizer_fingerprint == tokenizer.fingerprint()
    assert config.weight_layout == ("reference" if kind == "reference" else "megatron_bd3")
    model = AutoModelForMaskedLM.from_pretrained(directory, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules.")  # the directory's code

    # two-stream training pass over [x_t ; x_0]
    generator = torch.Generator().manual_seed(3)
    x_0 = torch.randint(0, c.vocab_size, (2, c.seq_length), generator=generator)
    x_0[x_0 == c.mask_token_id] = 0
    x_t = torch.where(torch.rand(x_0.shape, generator=generator) < 0.5, c.mask_token_id, x_0)
    with torch.no_grad():
        logits = model(torch.cat((x_t, x_0), dim=1))  # return_dict false: the tensor
        assert isinstance(logits, torch.Tensor)
        relative_close(logits, network.forward_train(x_t, x_0))
        output = model(torch.cat((x_t, x_0), dim=1), return_dict=True)
        assert torch.equal(output.logits, logits)

    # cached sampling calls: two clean blocks stored, then a noisy block reading them
    B = c.block_size
    clean, noisy = x_0[:, :2 * B], x_t[:, 2 * B:3 * B]
    cache = KVCache(c, 2, 3 * B)
    index = torch.arange(2 * B) // B
    with torch.no_grad():
        expected_clean = network.forward_cached(
            clean, torch.arange(2 * B).expand(2, -1), cache, torch.arange(2 * B).expand(2, -1),
            (index[None, :] <= index[:, None]).expand(2, -1, -1))
        expected_noisy = network.forward_cached(
            noisy, torch.arange(2 * B, 3 * B).expand(2, -1), cache,
            torch.arange(2 * B, 3 * B).expand(2, -1), torch.ones(2, B, 3 * B, dtype=torch.bool))
        model.reset_kv_cache(2)
        relative_close(model(clean, sample_mode=True, store_kv=True), expected_clean)
        relative_close(model(noisy, sample_mode=True), expected_noisy)
        # the cache kept the clean blocks only: the same noisy call again gives the same logits
        relative_close(model(noisy, sample_mode=True), expected_noisy)


@pytest.mark.parametrize("kind", list(ARCHITECTURES))
def test_generate_blocks_equals_bd3_sample(exports, tmp_path, kind):
    _, standalone, directory = exports[kind]
    out = tmp_path / "samples.jsonl"
    assert sample_main([str(standalone), "--num-samples", "3", "--batch-size", "2",
                        "--top-p", "0.9", "--seed", "5", "--output", str(out),
                        "--quiet"]) == 0
    expected = [json.loads(line)["token_ids"] for line in out.read_text().splitlines()]
    model = AutoModelForMaskedLM.from_pretrained(directory, trust_remote_code=True)
    for use_cache in (True, False):
        samples = model.generate_blocks(num_samples=3, seeds=[5, 6, 7], top_p=0.9,
                                        use_cache=use_cache)
        assert samples.tolist() == expected


def test_auto_tokenizer_gives_our_ids(exports, tokenizer):
    texts = [doc[:400] for doc, _ in zip(default_corpus_documents(), range(12), strict=False)]
    texts.append("a literal [MASK] and <s> stay text")
    auto = AutoTokenizer.from_pretrained(exports["hf"][2], trust_remote_code=True)
    _assert_same_tokenizer(auto, tokenizer, texts)


def test_auto_tokenizer_of_a_tokenizers_json(tmp_path):
    """A Hugging Face tokenizers model (tokenizer.json) with [MASK] appended, as for GPT-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [doc[:400] for doc, _ in zip(default_corpus_documents(), range(40), strict=False)]
    byte_level = Tokenizer(models.BPE(unk_token="<unk>"))
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    byte_level.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    byte_level.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path / "tokenizer.json")
    assert ours.mask_id == ours.vocab_size - 1  # appended
    written = write_tokenizer(ours, tmp_path / "export")
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(
        os.listdir(tmp_path / "export")), written
    auto = AutoTokenizer.from_pretrained(tmp_path / "export")
    _assert_same_tokenizer(auto, ours, texts[:10] + ["a literal [MASK] stays text"])


def _assert_same_tokenizer(auto, ours, texts: list[str]) -> None:
    assert (auto.mask_token_id, auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (
        ours.mask_id, ours.bos_id, ours.eos_id, ours.pad_id)
    for text in texts:
        ids = auto(text, add_special_tokens=False).input_ids
        assert ids == ours.encode(text), text
        assert auto.decode(ids) == ours.decode(ids)
    assert ours.mask_id not in ours.encode(texts[-1])


def _one_line(stderr: str, prefix: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), stderr
    return lines[0]


def test_a_tokenizer_of_another_fingerprint_is_refused(exports, tokenizer, tmp_path, capsys):
    """The model records one tokenizer; the directory (or --tokenizer) holds another."""
    other = tmp_path / "other"
    standalone_dir(other, tokenizer, "reference", seed=1)
    config = json.loads((other / "config.json").read_text())
    config["tokenizer_fingerprint"] = hashlib.sha256(b"another tokenizer").hexdigest()
    (other / "config.json").write_text(json.dumps(config))
    capsys.readouterr()

    with pytest.raises(SystemExit) as exit_info:
        sample_main([str(other), "--quiet"])
    assert exit_info.value.code == 2
    assert "fingerprint" in _one_line(capsys.readouterr().err, "bd3-sample:")

    assert eval_main([str(other), "--num-samples", "1", "--output", str(tmp_path / "eval"),
                      "--no-progress"]) == 2
    assert "fingerprint" in _one_line(capsys.readouterr().err, "bd3-eval:")

    for kind in ("hf", "reference", "checkpoint"):
        assert convert_main(["--standalone", str(other), "--to", kind, "--output",
                             str(tmp_path / kind)]) == 2
        assert "fingerprint" in _one_line(capsys.readouterr().err, "bd3-convert:")
        assert not (tmp_path / kind).exists()
    # an exported reference directory holding another tokenizer: refused on import
    reference = tmp_path / "reference_in"
    os_copy(exports["reference"][2], reference)
    config = json.loads((reference / "config.json").read_text())
    config["tokenizer_fingerprint"] = "0" * 64
    (reference / "config.json").write_text(json.dumps(config))
    assert convert_main(["--reference", str(reference), "--to", "standalone", "--output",
                         str(tmp_path / "imported")]) == 2
    assert "fingerprint" in _one_line(capsys.readouterr().err, "bd3-convert:")
    # a tokenizer of the recorded fingerprint is accepted by the same tools
    assert sample_main([str(exports["reference"][1]), "--quiet", "--length", "8"]) == 0


def os_copy(source: Path, destination: Path) -> None:
    import shutil

    shutil.copytree(source, destination)


LOCAL_PATH = re.compile(rb"(/tmp/|/work/|/root/|/home/|/Users/|[A-Za-z]:\\\\)")


def assert_shareable(directory: Path, local: Path) -> None:
    """No path of this machine in any file (text or binary), files 0644."""
    for path in sorted(directory.rglob("*")):
        if path.is_dir():
            continue
        content = path.read_bytes()
        assert str(local).encode() not in content, path
        assert not LOCAL_PATH.search(content), (path, LOCAL_PATH.search(content))
        assert path.stat().st_mode & 0o777 == 0o644, (path, oct(path.stat().st_mode))


def test_exports_hold_no_local_path_and_are_readable(exports, tmp_path):
    for kind, (_, _, directory) in exports.items():
        assert_shareable(directory, directory.parent)
        names = set(os.listdir(directory))
        assert {"config.json", "model.safetensors", "configuration_bd3lm.py",
                "modeling_bd3lm.py", "tokenization_bd3lm.py", "tokenizer.model",
                "tokenizer_config.json", "special_tokens_map.json", "README.md"} <= names, kind
    # and the way back: reference -> standalone
    assert convert_main(["--reference", str(exports["reference"][2]), "--to", "standalone",
                         "--output", str(tmp_path / "back")]) == 0
    assert_shareable(tmp_path / "back", tmp_path)
    back = BD3Network.from_pretrained(tmp_path / "back")
    assert back.config.tokenizer_fingerprint == exports["reference"][0].config.tokenizer_fingerprint


def test_checkpoint_to_hf_with_training_record_and_eval_card(trained, tiny_data, tokenizer,
                                                              tmp_path, capsys):
    """A trained checkpoint straight to a Hugging Face directory, with a bd3-eval report."""
    manifest, _ = tiny_data
    record = trained["tp2"]
    report = {"model": {"kind": "checkpoint", "weights": "EMA", "step": 2, "seq_length": 32,
                        "block_size": 4, "vocab_size": tokenizer.vocab_size,
                        "tokenizer_fingerprint": tokenizer.fingerprint()},
              "likelihood": [{"name": "validation", "nll": 5.5, "se": 0.05, "ppl": 244.7,
                              "ppl_ci95": [221.0, 270.0], "tokens": 1000, "sequences": 31,
                              "nelbo_samples": 4}]}
    (tmp_path / "eval.json").write_text(json.dumps(report))
    out = tmp_path / "hf"
    assert convert_main(["--checkpoint", str(record["run_dir"]), "--to", "hf", "--output",
                         str(out), "--eval-report", str(tmp_path / "eval.json")]) == 0
    assert_shareable(out, tmp_path)
    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert config.tokenizer_fingerprint == tokenizer.fingerprint()
    assert (config.n_query_groups, config.tie_embeddings) == (2, True)
    training = json.loads((out / "bd3_training.json").read_text())
    assert training["step"] == 2 and training["tokens"] == 2 * 4 * 32
    assert training["data_manifest"]["sha256"] == hashlib.sha256(
        manifest.read_bytes()).hexdigest()
    assert training["clip_range"] == pytest.approx(list(record["clip_range"]))
    card = (out / "README.md").read_text()
    assert "| block size B | 4 |" in card and "| tokens seen | 256 |" in card
    assert training["data_manifest"]["sha256"] in card
    assert f"[{record['clip_range'][0]:g}, {record['clip_range'][1]:g}]" in card
    assert "validation" in card and "244.700" in card
    # a report of another model is refused (exit 2, one line)
    report["model"]["block_size"] = 8
    (tmp_path / "eval.json").write_text(json.dumps(report))
    capsys.readouterr()
    assert convert_main(["--checkpoint", str(record["run_dir"]), "--to", "hf", "--output",
                         str(tmp_path / "hf2"), "--eval-report", str(tmp_path / "eval.json")]) == 2
    assert "block_size 8" in _one_line(capsys.readouterr().err, "bd3-convert:")


def test_the_loading_snippet_of_docs_convert_runs(exports, tmp_path):
    """docs/convert.md's Hugging Face snippet, run as written on an export."""
    text = (REPO_ROOT / "docs" / "convert.md").read_text()
    snippet = text.split("<!-- tested: tests/convert/test_hf_export.py -->", 1)[1]
    code = snippet.split("```python", 1)[1].split("```", 1)[0]
    assert 'MODEL_DIR = "out/tiny_hf"' in code
    namespace: dict = {}
    exec(code.replace('"out/tiny_hf"', repr(str(exports["hf"][2]))), namespace)
    out = tmp_path / "samples.jsonl"
    assert sample_main([str(exports["hf"][1]), "--num-samples", "2", "--top-p", "0.9",
                        "--output", str(out), "--quiet"]) == 0
    expected = [json.loads(line) for line in out.read_text().splitlines()]
    assert namespace["samples"].tolist() == [e["token_ids"] for e in expected]
    assert namespace["texts"] == [e["text"] for e in expected]
    network = exports["hf"][0]
    x_t, x_0 = namespace["x_t"], namespace["x_0"]
    relative_close(namespace["logits"], network.forward_train(x_t, x_0).detach())


def test_the_shipped_code_files_import_only_torch_transformers_and_each_other():
    """They run inside an export, where megatron_bd3 may not be installed."""
    import ast

    from megatron_bd3.convert.hf_files import HF_FILES_DIR

    allowed = {"__future__", "math", "torch", "transformers", "sentencepiece"}
    for path in sorted(HF_FILES_DIR.glob("*_bd3lm.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = set() if node.level else {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, (path.name, roots)
