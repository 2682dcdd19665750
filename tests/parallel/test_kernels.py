"""apex / Transformer Engine detection, including a fake non-NVIDIA `apex` on sys.path."""

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_bd3.parallel import detect_fused_kernels, log_kernel_choice
from tests.dist_launcher import REPO_ROOT

DETECT = "from megatron_bd3.parallel import detect_fused_kernels; print(detect_fused_kernels())"


def _run_with_path(extra_path, code=DETECT):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(extra_path), str(REPO_ROOT)])
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="describes a machine without CUDA")
def test_this_cpu_machine_uses_the_torch_fallbacks():
    kernels = detect_fused_kernels()
    assert kernels["cuda"] is False and kernels["apex"] == "absent"
    assert kernels["fused_layer_norm"] is False and kernels["fused_adam"] is False
    assert kernels["gradient_accumulation_fusion"] is False
    assert kernels["transformer_engine"] is False
    assert kernels["layer_norm"] == "torch LayerNorm (WrappedTorchNorm)"


def test_log_kernel_choice_names_every_kernel(caplog):
    with caplog.at_level(logging.INFO, logger="bd3.kernels"):
        kernels = log_kernel_choice(logging.getLogger("bd3.kernels"))
    for needle in (
        "layer norm = ",
        "adam = ",
        "gradient accumulation fusion",
        "Transformer Engine",
    ):
        assert needle in caplog.text
    assert kernels["layer_norm"] in caplog.text


def test_unrelated_apex_package_is_a_clear_error(tmp_path):
    fake = tmp_path / "apex"
    fake.mkdir()
    # Shaped like the PyPI "apex" web toolkit: nothing of NVIDIA's layout.
    (fake / "__init__.py").write_text("raise ImportError('importing the fake apex')\n")
    (fake / "views.py").write_text("")
    proc = _run_with_path(tmp_path)
    assert proc.returncode != 0
    assert "ApexConflictError" in proc.stderr
    assert "is not NVIDIA apex" in proc.stderr and "pip uninstall apex" in proc.stderr
    assert str(fake) in proc.stderr
    assert "importing the fake apex" not in proc.stderr  # detected without executing it


def test_nvidia_apex_without_cuda_is_a_clear_error(tmp_path):
    normalization = tmp_path / "apex" / "normalization"
    normalization.mkdir(parents=True)
    (tmp_path / "apex" / "__init__.py").write_text("")
    (normalization / "__init__.py").write_text("")
    (normalization / "fused_layer_norm.py").write_text("")
    code = textwrap.dedent(
        """
        import torch
        from megatron_bd3.parallel import ApexConflictError, check_apex
        try:
            check_apex()
        except ApexConflictError as exc:
            print("ERROR:", exc)
        else:
            print("ACCEPTED", torch.cuda.is_available())
        """
    )
    proc = _run_with_path(tmp_path, code)
    assert proc.returncode == 0, proc.stderr
    if torch.cuda.is_available():
        assert "fused_layer_norm_cuda is not built" in proc.stdout
    else:
        assert "NVIDIA apex is importable" in proc.stdout
        assert "torch.cuda.is_available() is False" in proc.stdout
