"""The megatron-core CPU compatibility layer: each patch does its job, narrowly, and only on CPU.

The multi-rank side (sequence-parallel mappings, p2p, 1F1B and interleaved schedules) is checked
in test_distributed.py; here everything runs in this process on one rank.
"""

import logging
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from megatron_bd3.parallel import (
    ParallelConfig,
    apply_cpu_compat,
    cpu_compat_active,
    cpu_safe_config_overrides,
    parallel_runtime,
)
from megatron_bd3.parallel.cpu_compat import PATCHED_MODULES, compat_needed
from tests.dist_launcher import REPO_ROOT

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is CPU-only")


@pytest.fixture(scope="module", autouse=True)
def _compat():
    assert apply_cpu_compat() is True
    yield


def test_apply_is_idempotent_and_patches_only_the_listed_modules():
    import importlib

    assert apply_cpu_compat() is True and cpu_compat_active()
    for name in PATCHED_MODULES:
        view = importlib.import_module(name).torch
        assert view is not torch and view._base is torch, name  # a view, never a view of a view
    # Modules with no patch keep the real torch, and torch itself is untouched.
    from megatron.core.transformer import transformer_layer, utils

    assert utils.torch is torch and transformer_layer.torch is torch
    assert torch.cuda.current_device.__module__ == "torch.cuda"
    assert torch.cuda.get_rng_state.__module__ == "torch.cuda.random"


def test_guard_is_off_when_cuda_is_available():
    assert compat_needed(cuda_available=False) is True
    assert compat_needed(cuda_available=True) is False


def test_tensor_parallel_rng_streams_are_real_per_rank_and_restore_state():
    from megatron.core.tensor_parallel.random import (
        get_cuda_rng_tracker,
        model_parallel_cuda_manual_seed,
    )

    seed = 321
    tp_draws = []
    for tp_rank in (0, 1):
        model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
        tracker = get_cuda_rng_tracker()
        with tracker.fork():
            first = torch.rand(3)
        default = torch.rand(4)
        with tracker.fork():
            second = torch.rand(3)
        # megatron's tensor-parallel stream: seed + 2718 + tp_rank, continued across forks
        stream = torch.Generator().manual_seed(seed + 2718 + tp_rank)
        assert torch.equal(torch.cat([first, second]), torch.rand(6, generator=stream))
        # the default (data-parallel) stream is seeded with `seed` and untouched by the forks
        assert torch.equal(default, torch.rand(4, generator=torch.Generator().manual_seed(seed)))
        tp_draws.append(first)
    assert not torch.equal(tp_draws[0], tp_draws[1])


def test_dropout_inside_the_tracker_uses_the_tensor_parallel_stream(caplog):
    from megatron.core.tensor_parallel.random import (
        get_cuda_rng_tracker,
        model_parallel_cuda_manual_seed,
    )

    seed, tp_rank = 99, 1
    model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
    with caplog.at_level(logging.WARNING):
        with get_cuda_rng_tracker().fork():
            dropped = F.dropout(torch.ones(64), p=0.5, training=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2718 + tp_rank)
        reference = F.dropout(torch.ones(64), p=0.5, training=True)
    assert torch.equal(dropped, reference)
    assert 0 < int((dropped == 0).sum()) < 64
    assert "CPU RNG state changed" not in caplog.text


def test_global_memory_buffer_allocates_on_cpu():
    from megatron.core.utils import GlobalMemoryBuffer

    buffer = GlobalMemoryBuffer()
    tensor = buffer.get_tensor((2, 3), torch.float32, "mpu")
    assert tensor.shape == (2, 3) and tensor.device.type == "cpu"
    assert buffer.get_tensor((3,), torch.float32, "mpu").data_ptr() == tensor.data_ptr()


def test_rotary_embedding_stays_on_cpu_and_matches_the_formula():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    with parallel_runtime(ParallelConfig(), environ={}):
        rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=False)
        emb = rope(5)  # [s, 1, 1, d]
    inv_freq = torch.tensor([1.0 / 10000 ** (i / 8) for i in (0, 2, 4, 6)])
    angles = torch.arange(5.0)[:, None] * inv_freq[None, :]
    assert emb.device.type == "cpu"
    assert torch.allclose(emb[:, 0, 0, :], torch.cat([angles, angles], dim=-1))


def test_no_pipelining_schedule_runs_on_cpu_and_matches_plain_autograd():
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=4, num_attention_heads=1, **cpu_safe_config_overrides()
    )
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(4, 4, generator=gen)
    data = torch.randn(3, 2, 2, 4, generator=gen)  # 3 microbatches of [s, b, h]

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config, self.model_type = config, ModelType.encoder_or_decoder
            self.weight = torch.nn.Parameter(weight.clone())

        def set_input_tensor(self, tensor):
            pass

        def forward(self, x):
            return torch.tanh(x @ self.weight)

    def forward_step(iterator, model):
        def loss_func(output):
            loss = (output**2).mean()
            return loss, {"loss": loss.detach().clone()}

        return model(next(iterator)), loss_func

    model = Toy()
    with parallel_runtime(ParallelConfig(), environ={}):
        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(data),
            model=model,
            num_microbatches=3,
            seq_length=2,
            micro_batch_size=2,
        )
    ref_weight = weight.clone().requires_grad_(True)
    ref_losses = torch.stack([(torch.tanh(x @ ref_weight) ** 2).mean() for x in data])
    (ref_losses.sum() / 3).backward()
    assert torch.allclose(torch.stack([d["loss"] for d in losses]), ref_losses.detach())
    assert torch.allclose(model.weight.grad, ref_weight.grad)


def test_config_overrides_are_valid_megatron_fields():
    from megatron.core.transformer.transformer_config import TransformerConfig

    overrides = cpu_safe_config_overrides()
    assert overrides["use_cpu_initialization"] is True
    assert overrides["batch_p2p_comm"] is False
    assert overrides["pipeline_dtype"] is torch.float32
    config = TransformerConfig(num_layers=2, hidden_size=8, num_attention_heads=2, **overrides)
    for key, value in overrides.items():
        assert getattr(config, key) == value, key


def test_layer_is_inactive_with_cuda_and_needed_without_it():
    """In a fresh process: with CUDA reported, nothing is patched (megatron is not even imported)
    and the config overrides are empty; then, on this CPU machine, megatron's GlobalMemoryBuffer
    fails without the layer and works with it."""
    script = textwrap.dedent(
        """
        import sys
        import torch
        from megatron_bd3.parallel import (
            apply_cpu_compat, cpu_compat_active, cpu_safe_config_overrides)

        real_is_available = torch.cuda.is_available
        torch.cuda.is_available = lambda: True
        assert apply_cpu_compat() is False and not cpu_compat_active()
        assert cpu_safe_config_overrides() == {}
        assert not any(n.split(".")[0] == "megatron" for n in sys.modules), "patched anyway"
        torch.cuda.is_available = real_is_available

        from megatron.core.utils import GlobalMemoryBuffer
        try:
            GlobalMemoryBuffer().get_tensor((2,), torch.float32, "x")
        except (AssertionError, RuntimeError) as exc:
            print("WITHOUT LAYER:", type(exc).__name__, exc)
        else:
            raise SystemExit("GlobalMemoryBuffer worked without the layer: test is stale")
        assert apply_cpu_compat() is True and cpu_compat_active()
        print("WITH LAYER:", GlobalMemoryBuffer().get_tensor((2,), torch.float32, "x").device)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "WITHOUT LAYER:" in proc.stdout and "compiled with CUDA" in proc.stdout
    assert "WITH LAYER: cpu" in proc.stdout


def test_activation_recompute_replays_the_same_dropout_masks():
    """megatron's CheckpointFunction saves and restores the RNG states (random.py 447/457) and,
    with distribute_saved_activations, splits/gathers the input (tensor_parallel/utils.py 70/91).
    Its gradients must equal those of the same function run without recompute."""
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    weight = torch.randn(6, 6, generator=torch.Generator().manual_seed(4))

    def block(x):
        hidden = F.dropout(x @ weight, p=0.5, training=True)  # default (data-parallel) stream
        with get_cuda_rng_tracker().fork():  # tensor-parallel stream
            return F.dropout(torch.tanh(hidden), p=0.5, training=True)

    results = []
    with parallel_runtime(ParallelConfig(seed=8), environ={}):
        for recompute in (False, True):
            tensor_parallel.model_parallel_cuda_manual_seed(8)
            x = torch.randn(4, 6, generator=torch.Generator().manual_seed(5), requires_grad=True)
            if recompute:
                out = tensor_parallel.checkpoint(block, True, x)
            else:
                out = block(x)
            out.sum().backward()
            results.append((out.detach(), x.grad))
    (out_ref, grad_ref), (out_ck, grad_ck) = results
    assert torch.equal(out_ref, out_ck)
    assert torch.allclose(grad_ref, grad_ck) and bool((grad_ref != 0).any())


def test_dist_checkpointing_save_and_load_work_on_cpu(tmp_path):
    """The writer's torch.cuda.synchronize() and the failure flag on current_device() would raise
    on a CPU-only torch without the layer; with it a save round-trips the tensors exactly."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    weight = torch.randn(4, 3)
    with parallel_runtime(ParallelConfig(), environ={}):
        dist_checkpointing.save(
            {"w": ShardedTensor.from_rank_offsets("w", weight, replica_id=0)}, str(tmp_path)
        )
        template = {"w": ShardedTensor.from_rank_offsets("w", torch.empty(4, 3), replica_id=0)}
        loaded = dist_checkpointing.load(template, str(tmp_path))
    assert torch.equal(loaded["w"], weight)
