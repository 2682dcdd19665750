"""bd3-sample end to end on a tiny model directory."""

from __future__ import annotations

import json

import pytest

from megatron_bd3.cli.sample import main
from megatron_bd3.data.corpus import default_corpus_path
from megatron_bd3.data.tokenizer_training import SentencePieceOptions, train_sentencepiece
from megatron_bd3.standalone import BD3Network
from tests.standalone.helpers import tiny_network


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    tiny_network(seed=2).save_pretrained(directory)
    return directory


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_output_and_batch_size_invariance(model_dir, tmp_path):
    common = [str(model_dir), "--num-samples", "5", "--length", "22", "--seed", "7", "--quiet"]
    assert main(common + ["--batch-size", "1", "--output", str(tmp_path / "a.jsonl")]) == 0
    assert main(common + ["--batch-size", "3", "--output", str(tmp_path / "b.jsonl")]) == 0
    single, batched = _read(tmp_path / "a.jsonl"), _read(tmp_path / "b.jsonl")
    assert [r["token_ids"] for r in single] == [r["token_ids"] for r in batched]
    for index, record in enumerate(single):
        assert record["index"] == index and record["seed"] == 7 + index
        assert record["text"] is None  # no tokenizer in the directory
        assert record["token_ids"][0] == 0 and record["num_tokens"] == 22
        assert record["nfe"] == record["num_generated"] == 21
        assert record["stop_reason"] == "length" and record["seconds"] >= 0
    assert len({tuple(r["token_ids"]) for r in single}) == 5  # different seeds, different text


def test_prompt_ids_and_errors(model_dir, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    assert main([str(model_dir), "--prompt-ids", "5,6,7", "--length", "9", "--quiet",
                 "--sampler", "ancestral", "--steps", "3", "--output", str(out)]) == 0
    (record,) = _read(out)
    assert record["token_ids"][:4] == [0, 5, 6, 7] and record["prompt_length"] == 4
    with pytest.raises(SystemExit):
        main([str(model_dir), "--block-size", "3"])
    assert "block_size 3 must divide the model's seq_length 16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(model_dir), "--prompt", "hello"])
    assert "--prompt needs a tokenizer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "absent")])
    assert "config.json not found" in capsys.readouterr().err


def test_text_prompt_with_a_tokenizer(tmp_path):
    lines = default_corpus_path().read_text(encoding="utf-8").splitlines()
    tokenizer = train_sentencepiece([line for line in lines if line.strip()][:200],
                                    SentencePieceOptions(vocab_size=300))
    ids = tokenizer.special_ids
    network = tiny_network(seed=3, vocab_size=300, mask_token_id=ids["mask_id"],
                           bos_token_id=ids["bos_id"], eos_token_id=ids["eos_id"],
                           pad_token_id=ids["pad_id"])
    network.save_pretrained(tmp_path / "model")
    tokenizer.save(tmp_path / "model" / "tokenizer")
    assert BD3Network.from_pretrained(tmp_path / "model").config.vocab_size == 300
    out = tmp_path / "t.jsonl"
    assert main([str(tmp_path / "model"), "--prompt", "The government said", "--length", "20",
                 "--quiet", "--output", str(out)]) == 0
    (record,) = _read(out)
    prompt = [ids["bos_id"]] + tokenizer.encode("The government said")
    assert record["token_ids"][: len(prompt)] == prompt
    assert record["text"] == tokenizer.decode(record["token_ids"])
    assert record["text"].startswith("The government said")
