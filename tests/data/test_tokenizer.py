"""Tokenizers: BD3 special ids, lossless round trips, fingerprints, GPT-2/BERT tokenizer.json."""

from __future__ import annotations

import io
import json
import logging

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron_bd3.cli.train_tokenizer import main as train_tokenizer_main
from megatron_bd3.data.tokenizer import (
    METADATA_FILE,
    SENTENCEPIECE_FILE,
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    find_model_tokenizer,
    load_tokenizer,
)
from megatron_bd3.data.tokenizer_training import SentencePieceOptions, train_sentencepiece
from tests.data.conftest import TINY_VOCAB, lee_documents

TRICKY = "Naïve café — 日本語\ttabs\n\nnew  lines [MASK] <s> </s> <|endoftext|> ™ 🙂 end"


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def test_trained_tokenizer_has_the_bd3_special_ids(tokenizer):
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert tokenizer.vocab_size == TINY_VOCAB
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2, 3)
    assert tokenizer.mask_id == 4
    assert tokenizer.special_tokens() == {
        "mask": "[MASK]",
        "bos": "<s>",
        "eos": "</s>",
        "pad": "<pad>",
        "unk": "<unk>",
    }


def test_round_trip_is_lossless_with_byte_fallback(tokenizer):
    for text in [TRICKY, *lee_documents()[:20]]:
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch([TRICKY, "x"]) == [
        tokenizer.encode(TRICKY),
        tokenizer.encode("x"),
    ]


def test_literal_special_strings_are_text_and_decode_drops_specials(tokenizer):
    ids = tokenizer.encode("[MASK] <s> </s> <pad> <unk>")
    specials = {tokenizer.mask_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    assert not specials & set(ids)
    body = tokenizer.encode("hello")
    wrapped = [tokenizer.bos_id, *body, tokenizer.mask_id, tokenizer.eos_id, tokenizer.pad_id]
    assert tokenizer.decode(wrapped) == "hello"
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tokenizer.decode([tokenizer.vocab_size])


def test_training_is_deterministic_and_fingerprint_tracks_the_vocab(tokenizer):
    again = train_sentencepiece(lee_documents(), SentencePieceOptions(vocab_size=TINY_VOCAB))
    assert again.model_proto == tokenizer.model_proto
    assert again.fingerprint() == tokenizer.fingerprint()
    other = train_sentencepiece(lee_documents(), SentencePieceOptions(vocab_size=TINY_VOCAB + 8))
    assert other.fingerprint() != tokenizer.fingerprint()
    unigram = train_sentencepiece(  # unigram training is slower: a smaller corpus
        lee_documents()[:40], SentencePieceOptions(vocab_size=TINY_VOCAB, model_type="unigram")
    )
    assert unigram.fingerprint() != tokenizer.fingerprint()
    assert unigram.decode(unigram.encode(TRICKY)) == TRICKY


def test_small_vocab_drops_byte_fallback_with_a_warning_and_tiny_vocab_errors(caplog):
    with caplog.at_level(logging.WARNING):
        small = train_sentencepiece(lee_documents(), SentencePieceOptions(vocab_size=200))
    assert "too small for byte fallback" in caplog.text
    assert small.vocab_size == 200
    assert small.unk_id in small.encode("日本")  # unseen characters become <unk>, not bytes
    with pytest.raises(TokenizerError, match="vocab_size 200"):
        train_sentencepiece(
            lee_documents(), SentencePieceOptions(vocab_size=200, byte_fallback="on")
        )


def test_save_load_and_tampering(tokenizer, tmp_path):
    directory = tokenizer.save(tmp_path / "tok", extra={"note": "test"})
    loaded = load_tokenizer(directory)
    assert loaded.fingerprint() == tokenizer.fingerprint()
    assert load_tokenizer(directory / SENTENCEPIECE_FILE).fingerprint() == tokenizer.fingerprint()
    assert load_tokenizer(directory / METADATA_FILE).fingerprint() == tokenizer.fingerprint()
    meta = json.loads((directory / METADATA_FILE).read_text())
    assert meta["special_ids"]["mask_id"] == 4 and meta["extra"] == {"note": "test"}
    # the directory travels: it names its own model file, never where it was loaded from
    assert meta["source"] == SENTENCEPIECE_FILE and str(tmp_path) not in json.dumps(meta)
    # Replace the model with another one: the directory must refuse to load.
    other = train_sentencepiece(lee_documents()[:50], SentencePieceOptions(vocab_size=TINY_VOCAB))
    (directory / SENTENCEPIECE_FILE).write_bytes(other.model_proto)
    with pytest.raises(TokenizerError, match="does not match"):
        load_tokenizer(directory)


def test_find_model_tokenizer_checks_the_recorded_fingerprint(tokenizer, tmp_path):
    model_dir = tmp_path / "model"
    assert find_model_tokenizer(model_dir) is None  # no tokenizer: ids are shown instead
    tokenizer.save(model_dir / "tokenizer")
    found = find_model_tokenizer(model_dir, None, tokenizer.fingerprint())
    assert found.fingerprint() == tokenizer.fingerprint()
    assert find_model_tokenizer(model_dir, None, None) is not None  # an older model: no check
    with pytest.raises(TokenizerError, match=r"fingerprint .* trained with tokenizer 0000"):
        find_model_tokenizer(model_dir, None, "0" * 64)
    with pytest.raises(TokenizerError, match="fingerprint"):
        find_model_tokenizer(tmp_path / "elsewhere", model_dir / "tokenizer", "0" * 64)


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(TokenizerError, match="no such tokenizer"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(TokenizerError, match="unknown tokenizer file type"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "broken.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="broken.model"):
        load_tokenizer(tmp_path / "broken.model")
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(TokenizerError, match="broken.json"):
        load_tokenizer(tmp_path / "broken.json")
    with pytest.raises(TokenizerError, match="not a tokenizer directory"):
        load_tokenizer(tmp_path)


def test_foreign_sentencepiece_model_without_mask_gets_an_appended_mask_id(tmp_path):
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lee_documents()[:40]),
        model_writer=buffer,
        vocab_size=300,
        model_type="bpe",
        minloglevel=2,
        pad_id=-1,
    )
    (tmp_path / "plain.model").write_bytes(buffer.getvalue())
    tok = load_tokenizer(tmp_path / "plain.model")
    assert tok.mask_id == 300 and tok.vocab_size == 301  # appended, as for GPT-2 in the reference
    assert tok.pad_id == tok.eos_id  # no pad piece: pad = eos
    assert tok.decode(tok.encode("the police") + [tok.mask_id]) == "the police"


# ---------------------------------------------------------------------- tokenizer.json files
def _gpt2_like(path, vocab_size=320):
    """A byte-level BPE with <|endoftext|> as its only special token, like GPT-2's."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lee_documents(), trainer)
    tok.save(str(path))
    return json.loads(path.read_text())


def _bert_like(path):
    """A WordPiece with BERT's special tokens ([PAD]=0 ... [MASK]=4)."""
    from tokenizers import normalizers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=300,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        show_progress=False,
    )
    tok.train_from_iterator(lee_documents(), trainer)
    tok.save(str(path))


def test_gpt2_style_json_gets_mask_appended_like_the_reference(tmp_path):
    raw = _gpt2_like(tmp_path / "tokenizer.json")
    base = len(raw["model"]["vocab"])
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(tok, HFTokenizer)
    eot = raw["model"]["vocab"]["<|endoftext|>"]
    # GPT-2: 50257 -> 50258 with mask id 50257; here base -> base + 1, mask id base.
    assert (tok.vocab_size, tok.mask_id) == (base + 1, base)
    assert tok.bos_id == tok.eos_id == tok.pad_id == eot
    ids = tok.encode(TRICKY)
    assert tok.mask_id not in ids and eot not in ids  # literal special strings stay text
    assert tok.decode(ids) == TRICKY
    assert tok.decode([eot, *tok.encode("fire"), tok.mask_id]) == "fire"


def test_tokenizer_json_import_via_cli_keeps_the_fingerprint(tmp_path, capsys):
    _gpt2_like(tmp_path / "tokenizer.json")
    raw = load_tokenizer(tmp_path / "tokenizer.json")
    assert (
        train_tokenizer_main(
            [
                "--from",
                str(tmp_path / "tokenizer.json"),
                "--output",
                str(tmp_path / "imported"),
                "-q",
            ]
        )
        == 0
    )
    described = json.loads(capsys.readouterr().out)
    assert described["fingerprint"] == raw.fingerprint()
    imported = load_tokenizer(tmp_path / "imported")
    assert imported.fingerprint() == raw.fingerprint() and imported.mask_id == raw.mask_id
    saved = json.loads((tmp_path / "imported" / "tokenizer.json").read_text())
    assert any(t["content"] == "[MASK]" for t in saved["added_tokens"])


def test_bert_style_json_uses_cls_sep_and_its_own_mask(tmp_path):
    _bert_like(tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    # bert-base-uncased: [MASK]=103, BOS=[CLS]=101, EOS=[SEP]=102, PAD=[PAD]=0 (ids differ here).
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.vocab_size == 300
    assert tok.encode("Fire [MASK]")[:1] != [2]  # no [CLS] added by encode
    assert tok.mask_id not in tok.encode("Fire [MASK]")
    assert tok.decode(tok.encode("the Fire Brigade")) == "the fire brigade"


def test_json_without_eos_needs_explicit_tokens(tmp_path, capsys):
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="no BOS or EOS token found.*--eos-token"):
        load_tokenizer(tmp_path / "tokenizer.json")
    code = train_tokenizer_main(
        [
            "--from",
            str(tmp_path / "tokenizer.json"),
            "--output",
            str(tmp_path / "out"),
            "--bos-token",
            "a",
            "--eos-token",
            "zz",
        ]
    )
    assert code == 2 and "'zz' is not in the vocabulary" in capsys.readouterr().err
    assert (
        train_tokenizer_main(
            [
                "--from",
                str(tmp_path / "tokenizer.json"),
                "--output",
                str(tmp_path / "out"),
                "--bos-token",
                "a",
                "--eos-token",
                "b",
                "-q",
            ]
        )
        == 0
    )
    loaded = load_tokenizer(tmp_path / "out")
    assert (loaded.bos_id, loaded.eos_id, loaded.mask_id, loaded.vocab_size) == (0, 1, 3, 4)


def test_train_tokenizer_cli(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"body": d}) + "\n" for d in lee_documents()[:80]))
    args = [
        "--input",
        str(corpus),
        "--text-field",
        "body",
        "--output",
        str(tmp_path / "t"),
        "--vocab-size",
        "380",
        "--model-type",
        "bpe",
        "-q",
    ]
    assert train_tokenizer_main(args) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["vocab_size"] == 380 and described["special_ids"]["mask_id"] == 4
    meta = json.loads((tmp_path / "t" / METADATA_FILE).read_text())
    assert meta["extra"]["inputs"][0]["documents"] == 80
    assert train_tokenizer_main(args) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    bad = ["--input", str(corpus), "--output", str(tmp_path / "u"), "--vocab-size", "380"]
    assert train_tokenizer_main(bad) == 2  # default field "text" is missing
    assert "no field 'text'" in capsys.readouterr().err
