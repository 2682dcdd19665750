"""Generative perplexity and entropy: both scorers against hand computations, refusals."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from megatron_bd3.evaluation.scorers import (
    HFCausalLMScorer,
    OurARScorer,
    ScorerError,
    generative_perplexity,
    load_scorer,
    score_token_ids,
    unigram_entropy,
    window_targets,
)
from megatron_bd3.standalone import BD3Network
from tests.evaluation.workers.models import (
    ar_scorer_dir,
    corpus_tokenizer,
    sampler_model_dir,
)

TEXTS = [
    "The government said on Tuesday that it would not change its plans.",
    "Police said",
    # longer than the scorer's context (16): three sliding windows
    "The Prime Minister said the government had been working with the United Nations and the "
    "opposition parties for several weeks, and that talks would continue next year in Sydney.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return corpus_tokenizer()


@pytest.fixture(scope="module")
def ar_dir(tmp_path_factory, tokenizer):
    return ar_scorer_dir(tmp_path_factory.mktemp("ar"), tokenizer)


def _hand_window_start(target: int, context: int) -> int:
    """Start of the window that scores position ``target`` (stride context // 2): the first
    window scores targets below ``context``, window k ≥ 1 the ``stride`` positions past window
    k − 1's end ``(k − 1)·stride + context``."""
    stride = context // 2
    if target < context:
        return 0
    return ((target - context) // stride + 1) * stride


def _hand_ar_nll(network: BD3Network, context_ids: list[int], target: int) -> float:
    """-log p(target | context) from the two-stream pass written out: [x_t ; x_0] with x_t all
    [MASK] and x_0 = context + [target], positions 0..m-1 twice; noisy row q sees itself and the
    clean tokens before it, clean row q the clean tokens up to itself (B = 1)."""
    config = network.config
    x_0 = torch.tensor(context_ids + [target])
    m = len(x_0)
    tokens = torch.cat((torch.full((m,), config.mask_token_id), x_0))[None]
    positions = torch.arange(m).repeat(2)
    q = torch.arange(2 * m)[:, None]
    k = torch.arange(2 * m)[None, :]
    noisy_q, noisy_k = q < m, k < m
    mask = ((noisy_q & noisy_k & (q == k))
            | (noisy_q & ~noisy_k & (k - m < q))
            | (~noisy_q & ~noisy_k & (k <= q)))
    with torch.no_grad():
        logits = network.forward(tokens, positions, mask)[0, m - 1].double()  # noisy row m-1
    logits[config.mask_token_id] = -math.inf  # SUBS: [MASK] is never predicted
    return float(-torch.log_softmax(logits, -1)[target])


def _hand_perplexity(id_lists, nll_of, context: int, eos_id: int | None):
    """(mean of per-sample PPL, token-weighted PPL, scored tokens): one target at a time."""
    per_sample, total, count = [], 0.0, 0
    for ids in id_lists:
        nlls = []
        for j in range(1, len(ids)):
            if ids[j] == eos_id:
                continue
            start = _hand_window_start(j, context)
            nlls.append(nll_of(ids[start:j], ids[j]))
        per_sample.append(math.exp(sum(nlls) / len(nlls)))
        total, count = total + sum(nlls), count + len(nlls)
    return sum(per_sample) / len(per_sample), math.exp(total / count), count


def test_window_targets_score_each_position_once():
    for context in (2, 3, 8, 16):
        for length in range(0, 60):
            windows = window_targets(length, context)
            scored = [p for _, end, first in windows for p in range(first, end)]
            assert scored == list(range(1, length))
            for start, end, first in windows:
                assert end - start <= context and start < first
                if start > 0:
                    assert first - start >= context - context // 2  # at least C - stride context
    assert window_targets(40, 16) == [(0, 16, 1), (8, 24, 16), (16, 32, 24), (24, 40, 32)]


def test_our_ar_scorer_equals_hand_computation(ar_dir, tokenizer):
    scorer = OurARScorer.from_directory(ar_dir)
    assert scorer.context_length == 16 and scorer.eos_id == tokenizer.eos_id
    network = BD3Network.from_pretrained(ar_dir)

    def nll_of(context_ids, target):
        return _hand_ar_nll(network, context_ids, target)

    id_lists = [[tokenizer.bos_id] + tokenizer.encode(text) for text in TEXTS]
    assert len(id_lists[2]) > 2 * scorer.context_length  # the sliding window is exercised
    result = generative_perplexity(TEXTS, scorer)
    mean, weighted, count = _hand_perplexity(id_lists, nll_of, 16, tokenizer.eos_id)
    assert result.scored_tokens == count == sum(len(ids) - 1 for ids in id_lists)
    assert result.mean_per_sample == pytest.approx(mean, rel=1e-5)
    assert result.token_weighted == pytest.approx(weighted, rel=1e-5)
    assert result.unscored_samples == 0 and result.scorer == f"bd3-ar:{ar_dir}"

    # EOS targets are not scored (our tokenizer never makes EOS from text: give ids)
    eos = tokenizer.eos_id
    with_eos = [id_lists[0][:6] + [eos] + id_lists[0][6:] + [eos], id_lists[2] + [eos]]
    result = score_token_ids(with_eos, scorer)
    mean, weighted, count = _hand_perplexity(with_eos, nll_of, 16, eos)
    assert result.per_sample_tokens == [len(with_eos[0]) - 3, len(with_eos[1]) - 2]
    assert result.scored_tokens == count
    assert result.mean_per_sample == pytest.approx(mean, rel=1e-5)
    assert result.token_weighted == pytest.approx(weighted, rel=1e-5)

    # max_length cuts the re-tokenised sample, as the reference's truncation
    cut = generative_perplexity(TEXTS[2:], scorer, max_length=10)
    assert cut.per_sample_tokens == [9]


def test_samples_without_scored_tokens_are_counted(ar_dir, tokenizer):
    scorer = OurARScorer.from_directory(ar_dir)
    result = generative_perplexity(["", TEXTS[1]], scorer)  # "" is only the BOS: no target
    assert result.unscored_samples == 1 and result.per_sample[0] is None
    assert result.per_sample_tokens[0] == 0 and result.mean_per_sample == result.per_sample[1]
    only_eos = score_token_ids([[tokenizer.bos_id, tokenizer.eos_id]], scorer)
    assert only_eos.unscored_samples == 1 and only_eos.mean_per_sample is None
    assert only_eos.token_weighted is None


def test_our_ar_scorer_refuses_a_block_diffusion_model(tmp_path, tokenizer):
    directory = sampler_model_dir(tmp_path / "bd3", tokenizer)
    with pytest.raises(ScorerError, match=rf"AR scorer {directory} has block_size 4; .*block_size 1"):
        OurARScorer.from_directory(directory)
    (directory / "tokenizer" / "bd3_tokenizer.json").unlink()
    with pytest.raises(ScorerError, match="block_size 4"):
        load_scorer(directory)  # recognised as ours, refused for its block size first


def test_our_ar_scorer_needs_its_tokenizer(tmp_path, ar_dir):
    import shutil

    directory = tmp_path / "no_tokenizer"
    directory.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(ar_dir / name, directory / name)
    with pytest.raises(ScorerError, match="holds no tokenizer"):
        OurARScorer.from_directory(directory)
    assert isinstance(load_scorer(ar_dir), OurARScorer)


def test_unigram_entropy():
    assert unigram_entropy([]) == 0.0
    assert unigram_entropy([7, 7, 7]) == 0.0
    assert unigram_entropy([1, 2, 1, 2]) == pytest.approx(math.log(2))
    assert unigram_entropy([3, 1, 4, 2]) == pytest.approx(math.log(4))
    # p = (1/2, 1/4, 1/4): 1.5 log 2
    assert unigram_entropy([5, 5, 6, 9]) == pytest.approx(1.5 * math.log(2))


# --------------------------------------------------------------------------- Hugging Face
WORDS = ["<|endoftext|>", "[UNK]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to",
         "park", "and", "slept", "in", "sun"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random GPT-2 and a word-level tokenizer, built and saved here (no download)."""
    transformers = pytest.importorskip("transformers", reason="the eval extra is not installed")
    from tokenizers import Tokenizer, models, pre_tokenizers

    directory = tmp_path_factory.mktemp("gpt2")
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="[UNK]")
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(WORDS), n_positions=8, n_embd=16, n_layer=2,
                                     n_head=2, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


HF_TEXTS = [
    "the cat sat on the mat",
    # longer than the context (8), with an EOS target inside
    "a dog ran to the park and slept in the sun <|endoftext|> the cat sat on a mat and the dog "
    "ran to the sun",
    "cat",  # BOS + one token: one target
]


def test_hf_scorer_equals_hand_computation(hf_dir):
    import transformers

    scorer = HFCausalLMScorer.from_directory(hf_dir)
    assert scorer.context_length == 8 and scorer.eos_id == 0 and scorer.bos_id == 0
    model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    vocab = {w: i for i, w in enumerate(WORDS)}
    id_lists = [[0] + [vocab[w] for w in text.split()] for text in HF_TEXTS]
    assert [scorer.encode(text) for text in HF_TEXTS] == [ids[1:] for ids in id_lists]
    assert 0 in id_lists[1][1:]  # an EOS target, excluded below

    def nll_of(context_ids, target):
        with torch.no_grad():
            logits = model(torch.tensor([context_ids])).logits[0, -1].double()
        return float(-torch.log_softmax(logits, -1)[target])

    result = generative_perplexity(HF_TEXTS, scorer)
    mean, weighted, count = _hand_perplexity(id_lists, nll_of, 8, eos_id=0)
    assert result.scored_tokens == count == sum(len(ids) - 1 for ids in id_lists) - 1
    assert result.mean_per_sample == pytest.approx(mean, rel=1e-5)
    assert result.token_weighted == pytest.approx(weighted, rel=1e-5)
    assert result.scorer == f"hf:{hf_dir}"
    assert isinstance(load_scorer(hf_dir), HFCausalLMScorer)


def test_hf_scorer_refuses_what_is_not_a_causal_lm(tmp_path, hf_dir, ar_dir):
    transformers = pytest.importorskip("transformers", reason="the eval extra is not installed")
    bert = tmp_path / "bert"
    config = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32)
    transformers.BertModel(config).save_pretrained(bert)
    with pytest.raises(ScorerError, match=rf"HF scorer {bert} is not a causal language model "
                                          r"\(model_type 'bert', architectures \['BertModel'\]\)"):
        HFCausalLMScorer.from_directory(bert)
    with pytest.raises(ScorerError, match="not a causal language model"):
        HFCausalLMScorer.from_directory(ar_dir)  # our own config.json is no HF config
    with pytest.raises(ScorerError, match="no config.json.*never downloaded"):
        HFCausalLMScorer.from_directory(tmp_path / "gpt2")  # a name, not a directory
    # a causal-LM config whose weights lack the LM head
    headless = tmp_path / "headless"
    transformers.GPT2Model(transformers.GPT2Config.from_pretrained(hf_dir)).save_pretrained(
        headless)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (headless / name).write_bytes((hf_dir / name).read_bytes())
    with pytest.raises(ScorerError, match="not a causal language model"):
        HFCausalLMScorer.from_directory(headless)


def test_hf_scorer_without_transformers(monkeypatch, hf_dir):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    with pytest.raises(ScorerError, match=r'needs transformers.*pip install -e "\.\[eval\]"'):
        HFCausalLMScorer.from_directory(hf_dir)
