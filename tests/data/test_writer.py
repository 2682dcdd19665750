"""Text -> shards: round trip through the loader, byte-identical output, manifest, split, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds

from megatron_bd3.cli.prepare_data import main as prepare_main
from megatron_bd3.data.loader import BD3DataLoader
from megatron_bd3.data.shards import choose_dtype
from megatron_bd3.data.sources import InputError, SourceOptions
from megatron_bd3.data.tokenizer import load_tokenizer
from megatron_bd3.data.writer import PrepareOptions, prepare_shards
from tests.data.conftest import read_tar_samples, write_paragraph_file

L = 32


def options(**overrides) -> PrepareOptions:
    settings = dict(seq_length=L, samples_per_shard=70, val_fraction=0.0, progress=False)
    settings.update(overrides)
    return PrepareOptions(**settings)


def split_stream(samples: dict[int, np.ndarray]) -> list[int]:
    assert sorted(samples) == list(range(len(samples)))
    return np.concatenate([samples[i] for i in range(len(samples))]).tolist()


def segments(stream: list[int], eos: int) -> tuple[list[list[int]], list[int]]:
    """Complete EOS-terminated segments, and the incomplete tail."""
    done, current = [], []
    for token in stream:
        if token == eos:
            done.append(current)
            current = []
        else:
            current.append(token)
    return done, current


def test_text_to_shards_to_loader_to_text_round_trip(tmp_path, tokenizer_dir, small_corpus):
    corpus, documents = small_corpus
    prepare_shards([str(corpus)], tokenizer_dir, tmp_path / "d", options())
    tok = load_tokenizer(tokenizer_dir)
    samples: dict[int, np.ndarray] = {}
    for rank in range(2):
        loader = BD3DataLoader(
            tmp_path / "d",
            "train",
            micro_batch_size=3,
            dp_rank=rank,
            dp_size=2,
            seed=5,
            remainder="wrap",
            max_epochs=1,
            expected_tokenizer_fingerprint=tok.fingerprint(),
            expected_seq_length=L,
        )
        for batch in loader:
            assert batch["tokens"].shape == (3, L)
            for index, row in zip(batch["sample_index"].tolist(), batch["tokens"], strict=True):
                samples[index] = row.numpy()
    done, tail = segments(split_stream(samples), tok.eos_id)
    assert len(done) >= len(documents) - 1  # at most the last document is cut by the tail
    assert [tok.decode(ids) for ids in done] == documents[: len(done)]
    if len(done) < len(documents):
        assert tok.encode(documents[len(done)])[: len(tail)] == tail


def test_writer_is_byte_identical_across_runs_and_worker_counts(
    tmp_path, tokenizer_dir, small_corpus
):
    corpus = str(small_corpus[0])
    prepare_shards([corpus], tokenizer_dir, tmp_path / "a", options(val_fraction=0.2, workers=1))
    prepare_shards(
        [corpus],
        tokenizer_dir,
        tmp_path / "b",
        options(val_fraction=0.2, workers=2, documents_per_task=7),
    )
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert len(files_a) > 3
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_manifest_describes_the_shards(tmp_path, tokenizer_dir, small_corpus):
    manifest = prepare_shards(
        [str(small_corpus[0])], tokenizer_dir, tmp_path, options(val_fraction=0.2)
    )
    assert manifest == json.loads((tmp_path / "manifest.json").read_text())
    tok = load_tokenizer(tokenizer_dir)
    assert manifest["tokenizer"]["fingerprint"] == tok.fingerprint()
    assert manifest["seq_length"] == L and manifest["dtype"] == "uint16"
    assert manifest["inputs"][0]["documents"] == 60
    total_docs = 0
    for name, split in manifest["splits"].items():
        total_docs += split["documents"]
        assert split["tokens"] == split["sequences"] * L
        assert split["document_tokens"] == split["tokens"] + split["dropped_tail_tokens"]
        assert 0 <= split["dropped_tail_tokens"] < L
        assert sum(s["sequences"] for s in split["shards"]) == split["sequences"]
        for shard in split["shards"]:
            path = tmp_path / shard["file"]
            assert shard["file"].startswith(f"{name}-")
            assert shard["bytes"] == path.stat().st_size
            assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            assert shard["tokens"] == shard["sequences"] * L
            with tarfile.open(path) as tar:
                members = tar.getmembers()
            assert len(members) == shard["sequences"]
            first = shard["first_index"]
            assert [m.name for m in members] == [
                f"{first + i:012d}.tokens.npy" for i in range(len(members))
            ]
            assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
                (0, 0, 0, "", "", 0o644)
            }
    assert total_docs == 60
    assert manifest["splits"]["validation"]["documents"] > 0


def test_shards_are_standard_webdataset(shards_dir):
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    shard = manifest["splits"]["train"]["shards"][1]
    expected = read_tar_samples([shards_dir / shard["file"]])
    dataset = wds.WebDataset(str(shards_dir / shard["file"]), shardshuffle=False).decode()
    seen = 0
    for sample in dataset:
        array = sample["tokens.npy"]
        assert array.dtype == np.dtype("<u2") and array.shape == (32,)
        np.testing.assert_array_equal(array, expected[int(sample["__key__"])])
        seen += 1
    assert seen == shard["sequences"] and min(expected) == shard["first_index"]


def test_train_and_validation_hold_disjoint_whole_documents(tmp_path, tokenizer_dir, small_corpus):
    corpus, documents = small_corpus
    prepare_shards([str(corpus)], tokenizer_dir, tmp_path, options(val_fraction=0.3))
    tok = load_tokenizer(tokenizer_dir)
    found = {}
    for split in ("train", "validation"):
        files = sorted(tmp_path.glob(f"{split}-*.tar"))
        done, _ = segments(split_stream(read_tar_samples(files)), tok.eos_id)
        found[split] = [tok.decode(ids) for ids in done]
    assert not set(found["train"]) & set(found["validation"])
    assert set(found["train"]) | set(found["validation"]) <= set(documents)
    # Only each split's last document may be missing (cut by its dropped tail).
    assert len(found["train"]) + len(found["validation"]) >= len(documents) - 2
    # Each split keeps the input order.
    for split in found:
        positions = [documents.index(d) for d in found[split]]
        assert positions == sorted(positions)


def test_insert_special_frames_every_sequence(tmp_path, tokenizer_dir, small_corpus):
    prepare_shards(
        [str(small_corpus[0])],
        tokenizer_dir,
        tmp_path,
        options(insert_special=True, dtype="uint32"),
    )
    tok = load_tokenizer(tokenizer_dir)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["dtype"] == "uint32" and manifest["options"]["insert_special"]
    samples = read_tar_samples(sorted(tmp_path.glob("train-*.tar")))
    rows = np.stack([samples[i] for i in range(len(samples))])
    assert rows.dtype == np.dtype("<u4")
    assert (rows[:, 0] == tok.bos_id).all() and (rows[:, -1] == tok.eos_id).all()
    assert not (rows[:, 1:-1] == tok.bos_id).any()


def test_output_directory_and_size_errors(tmp_path, tokenizer_dir, small_corpus):
    corpus = str(small_corpus[0])
    prepare_shards([corpus], tokenizer_dir, tmp_path, options())
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_shards([corpus], tokenizer_dir, tmp_path, options())
    (tmp_path / "keep.txt").write_text("not ours")
    prepare_shards(
        [corpus], tokenizer_dir, tmp_path, options(samples_per_shard=10_000), overwrite=True
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "keep.txt",
        "manifest.json",
        "train-000000.tar",
    ]
    tiny = write_paragraph_file(tmp_path / "tiny.txt", ["a few words"])
    with pytest.raises(InputError, match="fewer than one sequence of seq_length 32"):
        prepare_shards([str(tiny)], tokenizer_dir, tmp_path / "t", options())
    assert not list((tmp_path / "t").glob("*.tar*"))
    with pytest.raises(ValueError, match="dtype uint16 cannot hold vocab_size"):
        choose_dtype(70_000, "uint16")
    assert choose_dtype(65_536) == "uint16" and choose_dtype(65_537) == "uint32"


def test_skips_are_recorded_in_the_manifest(tmp_path, tokenizer_dir, small_corpus):
    corpus, documents = small_corpus
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\n".join(d.encode() for d in documents[:5]) + b"\nbroken \xc3\x28 line\n")
    (tmp_path / "empty.txt").write_bytes(b"")
    source = SourceOptions(text_mode="line", on_bad_utf8="skip")
    manifest = prepare_shards(
        [str(bad), str(tmp_path / "empty.txt"), str(corpus)],
        tokenizer_dir,
        tmp_path / "out",
        options(source=source),
    )
    # In line mode the 59 blank separator lines of the paragraph file are empty documents.
    assert manifest["skipped"] == {
        "empty_documents": 59,
        "empty_files": 1,
        "bad_utf8_lines": 1,
        "bad_utf8_records": 0,
        "redirects": 0,
        "other_namespaces": 0,
    }
    assert [i["documents"] for i in manifest["inputs"]] == [5, 0, 60]
    assert manifest["inputs"][2]["skipped"]["empty_documents"] == 59
    with pytest.raises(InputError, match=r"bad\.txt:6: invalid UTF-8"):
        prepare_shards(
            [str(bad)],
            tokenizer_dir,
            tmp_path / "out2",
            options(source=SourceOptions(text_mode="line")),
        )
    assert not (tmp_path / "out2" / "manifest.json").exists()


def test_prepare_data_cli(tmp_path, tokenizer_dir, capsys):
    args = [
        "--input",
        "default",
        "--tokenizer",
        str(tokenizer_dir),
        "--output",
        str(tmp_path / "d"),
        "--seq-length",
        "64",
        "--workers",
        "2",
        "--no-progress",
        "-q",
    ]
    assert prepare_main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (
        summary["splits"]["train"]["documents"] + summary["splits"]["validation"]["documents"]
        == 300
    )
    assert prepare_main(["--verify", str(tmp_path / "d"), "-q"]) == 0
    capsys.readouterr()
    assert prepare_main(args) == 2
    assert "already holds prepared data" in capsys.readouterr().err
    shard = tmp_path / "d" / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert prepare_main(["--verify", str(tmp_path / "d")]) == 2
    assert "sha256" in capsys.readouterr().err
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text(json.dumps({"body": "x"}) + "\n")
    assert (
        prepare_main(
            [
                "--input",
                str(jsonl),
                "--tokenizer",
                str(tokenizer_dir),
                "--output",
                str(tmp_path / "e"),
                "--seq-length",
                "8",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "no field 'text' (fields: body)" in capsys.readouterr().err


def test_npy_payload_is_little_endian(shards_dir):
    path = sorted(shards_dir.glob("train-*.tar"))[0]
    with tarfile.open(path) as tar:
        member = tar.getmembers()[0]
        payload = tar.extractfile(member).read()
    header_end = payload.index(b"\n") + 1
    assert b"'descr': '<u2'" in payload[:header_end]
    values = np.frombuffer(payload[header_end:], dtype="<u2")
    np.testing.assert_array_equal(values, np.load(io.BytesIO(payload)))


def test_prepare_with_a_gpt2_style_tokenizer_json_in_worker_processes(tmp_path, small_corpus):
    from tests.data.test_tokenizer import _gpt2_like

    _gpt2_like(tmp_path / "tokenizer.json")
    corpus, documents = small_corpus
    manifest = prepare_shards(
        [str(corpus)], tmp_path / "tokenizer.json", tmp_path / "d", options(workers=2)
    )
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert manifest["tokenizer"]["fingerprint"] == tok.fingerprint()
    assert manifest["tokenizer"]["special_ids"]["mask_id"] == tok.vocab_size - 1
    done, _ = segments(
        split_stream(read_tar_samples(sorted((tmp_path / "d").glob("train-*")))), tok.eos_id
    )
    assert [tok.decode(ids) for ids in done] == documents[: len(done)]
    assert len(done) >= len(documents) - 1


def test_a_failed_run_leaves_no_shards_behind(tmp_path, tokenizer_dir, small_corpus):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text\n\nbroken \xff text\n")
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"bad\.txt:3: invalid UTF-8"):
        # The corpus fills several shards before the bad file is reached.
        prepare_shards(
            [str(small_corpus[0]), str(bad)], tokenizer_dir, out, options(samples_per_shard=10)
        )
    assert list(out.iterdir()) == []
