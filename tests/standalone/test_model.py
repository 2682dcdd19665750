"""The standalone network: config I/O, strict loading, the two-stream training pass and the
cached inference pass, each against a computation written here."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_bd3.standalone import BD3Network, KVCache, NetworkConfig
from tests.standalone.helpers import block_causal_mask, tiny_config, tiny_network

TOLERANCE = 1e-5  # fp32; the compared computations differ only in summation order


def test_config_json_round_trip_and_strictness(tmp_path):
    config = tiny_config(sampling_eps_min=0.3, sampling_eps_max=0.8)
    config.save(tmp_path)
    assert NetworkConfig.load(tmp_path) == config
    values = json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['hidden'\]"):
        NetworkConfig.from_dict(dict(values, hidden=3))
    del values["block_size"]
    with pytest.raises(ValueError, match=r"missing required config field\(s\) \['block_size'\]"):
        NetworkConfig.from_dict(values)
    with pytest.raises(ValueError, match="seq_length 18 is not a multiple of block_size 4"):
        tiny_config(seq_length=18)
    with pytest.raises(ValueError, match="mask_token_id 64 is outside the vocabulary"):
        tiny_config(mask_token_id=64)
    with pytest.raises(ValueError, match="num_heads 4 is not a multiple of num_query_groups 3"):
        tiny_config(num_query_groups=3)
    with pytest.raises(ValueError, match="config field num_layers must be int, got '2'"):
        tiny_config(num_layers="2")
    # the tokenizer fingerprint: optional (older directories lack it), a string when given
    fingerprinted = tiny_config(tokenizer_fingerprint="ab" * 32)
    fingerprinted.save(tmp_path)
    assert NetworkConfig.load(tmp_path).tokenizer_fingerprint == "ab" * 32
    with pytest.raises(ValueError, match="config field tokenizer_fingerprint must be str"):
        tiny_config(tokenizer_fingerprint=7)


def test_saved_weights_are_readable_by_everyone(tmp_path):
    tiny_network().save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_save_load_round_trip(tmp_path):
    network = tiny_network(seed=1)
    network.save_pretrained(tmp_path)
    loaded = BD3Network.from_pretrained(tmp_path)
    tokens = torch.randint(0, 63, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), network(tokens), atol=0, rtol=0)


def test_tied_embeddings_round_trip(tmp_path):
    network = tiny_network(seed=2, tie_embeddings=True)
    assert "output.weight" not in network.state_dict()
    network.save_pretrained(tmp_path)
    tokens = torch.randint(0, 63, (1, 8))
    with torch.no_grad():
        expected = torch.nn.functional.linear(
            network.final_norm(_hidden(network, tokens)), network.embedding.weight,
            network.output_bias)
        torch.testing.assert_close(BD3Network.from_pretrained(tmp_path)(tokens), expected)


def _hidden(network, tokens):
    """Hidden states before the final norm, through the public layers."""
    x = network.embedding(tokens)
    cos, sin = network._rope(torch.arange(tokens.shape[1]), x.dtype)
    for layer in network.layers:
        x = layer(x, cos, sin, None)
    return x


def test_strict_loading_names_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    network = tiny_network()
    network.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))

    def write(tensors):
        save_file(tensors, str(tmp_path / "model.safetensors"))

    write({k: v for k, v in weights.items() if k != "layers.1.mlp.fc2.bias"})
    with pytest.raises(ValueError, match=r"missing tensor\(s\) layers.1.mlp.fc2.bias "
                                         r"\(expected shape \[32\]\)"):
        BD3Network.from_pretrained(tmp_path)
    write(dict(weights, **{"layers.0.attn.qkv.bias": torch.zeros(64)}))
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) layers.0.attn.qkv.bias "
                                         r"\(shape \[64\]\)"):
        BD3Network.from_pretrained(tmp_path)
    write(dict(weights, **{"final_norm.weight": torch.ones(31)}))
    with pytest.raises(ValueError, match=r"tensor final_norm.weight has shape \[31\], "
                                         r"expected \[32\]"):
        BD3Network.from_pretrained(tmp_path)
    write(weights)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, num_heads=5)))
    with pytest.raises(ValueError, match="hidden_size 32 is not a multiple of num_heads 5"):
        BD3Network.from_pretrained(tmp_path)


def test_forward_train_equals_per_block_recomputation():
    """The x_t-half logits of block b equal one plain pass over [x_0 blocks < b ; x_t block b]
    with a block-causal mask (the meaning of the two-stream mask, docs/method.md §1)."""
    network = tiny_network(seed=3)
    B, L = 4, 16
    g = torch.Generator().manual_seed(0)
    x_0 = torch.randint(0, 63, (2, L), generator=g)
    x_t = torch.where(torch.rand(2, L, generator=g) < 0.6, 63, x_0)
    with torch.no_grad():
        logits = network.forward_train(x_t, x_0)
        for b in range(L // B):
            tokens = torch.cat((x_0[:, : b * B], x_t[:, b * B:(b + 1) * B]), dim=1)
            mask = block_causal_mask(tokens.shape[1], B)
            expected = network(tokens, torch.arange(tokens.shape[1]), mask)[:, b * B:]
            torch.testing.assert_close(logits[:, b * B:(b + 1) * B], expected,
                                       atol=TOLERANCE, rtol=TOLERANCE)


def test_grouped_query_attention_equals_repeated_heads():
    """GQA with g groups == multi-head attention whose k/v heads are repeated (done here)."""
    gqa = tiny_network(seed=4, num_query_groups=2)
    mha = BD3Network(tiny_config(num_query_groups=4)).eval()
    state = gqa.state_dict()
    hd, h, g = 8, 4, 2
    for i in range(2):
        w = state[f"layers.{i}.attn.qkv.weight"]
        q, k, v = w.split([h * hd, g * hd, g * hd])
        repeat = [k.view(g, hd, -1).repeat_interleave(h // g, 0).reshape(h * hd, -1),
                  v.view(g, hd, -1).repeat_interleave(h // g, 0).reshape(h * hd, -1)]
        state[f"layers.{i}.attn.qkv.weight"] = torch.cat([q] + repeat)
    mha.load_state_dict_strict(state)
    tokens = torch.randint(0, 63, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(gqa(tokens), mha(tokens), atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_cached_pass_equals_full_pass(qkv_bias):
    """Blocks written one by one into a KV cache, then a noisy block against the cache, give the
    logits of one block-causal pass over the whole sequence (query rows selected or not)."""
    network = tiny_network(seed=5, qkv_bias=qkv_bias)
    B = 4
    tokens = torch.randint(0, 64, (3, 5 * B))
    with torch.no_grad():
        full = network(tokens, torch.arange(5 * B), block_causal_mask(5 * B, B))
        cache = KVCache(network.config, 3, capacity=6 * B)
        for b in range(5):
            positions = torch.arange(b * B, (b + 1) * B).expand(3, -1)
            mask = (torch.arange((b + 1) * B)[None, None, :] < (b + 1) * B).expand(3, B, -1)
            out = network.forward_cached(tokens[:, b * B:(b + 1) * B], positions, cache,
                                         positions, mask)
            torch.testing.assert_close(out, full[:, b * B:(b + 1) * B], atol=TOLERANCE,
                                       rtol=TOLERANCE)
        # query_index selects rows: only their logits come back
        rows = torch.tensor([[1], [3], [0]])
        out = network.forward_cached(tokens[:, 4 * B:], positions, cache, positions, mask, rows)
        torch.testing.assert_close(out, full[:, 4 * B:].gather(
            1, rows[..., None].expand(-1, -1, 64)), atol=TOLERANCE, rtol=TOLERANCE)


def test_cache_write_scattered_slots_equal_shared_slots():
    """Rows writing different slots (scattered write) give the same logits and cached keys and
    values as rows writing one shared run of slots (slice write)."""
    network = tiny_network(seed=6)
    B = 4
    tokens = torch.randint(0, 64, (2, B))
    positions = torch.arange(B).expand(2, -1)
    with torch.no_grad():
        shared = KVCache(network.config, 2, capacity=2 * B)
        mask = torch.ones(2, B, B, dtype=torch.bool)
        out_shared = network.forward_cached(tokens, positions, shared, positions, mask)
        scattered = KVCache(network.config, 2, capacity=2 * B)
        slots = torch.stack([torch.arange(B), torch.arange(B, 2 * B)])  # row 1 one block later
        mask = torch.stack([torch.arange(2 * B) < B, torch.arange(2 * B) >= B])[:, None, :]
        out_scattered = network.forward_cached(tokens, positions, scattered, slots,
                                               mask.expand(2, B, 2 * B))
    torch.testing.assert_close(out_scattered, out_shared, atol=TOLERANCE, rtol=TOLERANCE)
    for layer in range(network.config.num_layers):
        for store_s, store_x in ((shared.keys, scattered.keys), (shared.values, scattered.values)):
            torch.testing.assert_close(store_x[layer][0, :, :B], store_s[layer][0, :, :B])
            torch.testing.assert_close(store_x[layer][1, :, B:], store_s[layer][1, :, :B])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gelu_tanh_is_the_tanh_approximation(dtype):
    """The MLP's GELU equals 0.5·x·(1 + tanh(sqrt(2/π)(x + 0.044715x³))), value and gradient."""
    from megatron_bd3.standalone.model import gelu_tanh

    x64 = torch.linspace(-12, 12, 4001, dtype=torch.float64)
    expected = 0.5 * x64 * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x64 + 0.044715 * x64**3)))
    got = gelu_tanh(x64.to(dtype)).double()
    atol = {torch.float32: 2e-6, torch.float64: 1e-12, torch.bfloat16: 0.1}[dtype]
    torch.testing.assert_close(got, expected, atol=atol, rtol=atol if dtype != torch.bfloat16 else 1e-2)
    x = x64.clone().requires_grad_(True)
    torch.autograd.gradcheck(gelu_tanh, (x[::40],))


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_plain_linear(bias):
    """Without autograd on CPU fp32 the packed oneDNN path runs (its copies exist) and equals
    x·Wᵀ + b computed here in float64, for 3-d inputs and for output-row slices; it is
    repacked after an in-place weight update; grad mode and bf16 take plain F.linear."""
    from megatron_bd3.standalone.model import ONEDNN_PACKING, PACKED_MAX_ROWS, Linear

    torch.manual_seed(0)
    layer = Linear(24, 40, bias=bias)
    x = torch.randn(3, 5, 24)

    def expected(weight, b, rows=slice(None)):
        out = x.double() @ weight.double()[rows].T
        return (out if b is None else out + b.double()[rows]).float()

    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected(layer.weight, layer.bias),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer(x, rows=slice(8, 32)),
                                   expected(layer.weight, layer.bias, slice(8, 32)),
                                   atol=1e-5, rtol=1e-5)
        assert (len(layer._packs) == 2) == ONEDNN_PACKING
        layer.weight.mul_(-2.0)  # in place: same storage, new version
        torch.testing.assert_close(layer(x), expected(layer.weight, layer.bias),
                                   atol=1e-5, rtol=1e-5)
    layer.release_packed()
    out = layer(x)  # grad mode: plain F.linear, differentiable, nothing packed
    assert out.requires_grad and not layer._packs
    with torch.no_grad():  # many rows: MKL's F.linear is the faster one, nothing packed
        many = torch.randn(PACKED_MAX_ROWS + 1, 24)
        torch.testing.assert_close(layer(many), many @ layer.weight.T
                                   + (0 if layer.bias is None else layer.bias))
        assert not layer._packs
    with torch.no_grad():
        assert layer.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16
        assert not layer._packs


def test_linear_made_under_inference_mode_runs_and_follows_its_weight():
    """Parameters created under torch.inference_mode carry no version counter: such a layer
    must still run, and an in-place change of its weight must show in the next output."""
    from megatron_bd3.standalone.model import Linear

    torch.manual_seed(0)
    x = torch.randn(4, 24)
    with torch.inference_mode():
        layer = Linear(24, 40)
        first = layer(x)
        torch.testing.assert_close(first, x @ layer.weight.T + layer.bias)
        layer.weight.mul_(-1.0)
        second = layer(x)
        torch.testing.assert_close(second, x @ layer.weight.T + layer.bias)
        assert not torch.allclose(first, second)


def test_set_packed_inference_off_gives_the_same_logits():
    network = tiny_network(seed=7)
    tokens = torch.randint(0, 63, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        packed = network(tokens)
        network.set_packed_inference(False)
        assert not any(getattr(m, "_packs", None) for m in network.modules())
        plain = network(tokens)
    torch.testing.assert_close(packed, plain, atol=TOLERANCE, rtol=TOLERANCE)
