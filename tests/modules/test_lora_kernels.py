"""The expert-LoRA Triton kernels (``_kernels.lowrank_add_``, ``expert_outer``, ``rows_project``,
``swiglu_lora_forward`` / ``swiglu_lora_backward``) against their torch code:
on CPU under Triton's interpreter (skipped where Triton is not installed, as in CI) and on the GPU (marked
``gpu``), each kernel alone and the whole ``LoRAMoELinear.routed`` forward and backward (outputs and every
gradient), with segments straddling tiles, empty experts and dropped slots. Cases: _lora_kernels_cases.py."""

import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import _lora_kernels_cases as cases  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_kernels_match_torch_code_in_triton_interpreter():
    pytest.importorskip("triton")
    # ROOT first, the caller's path kept (an install with its packages on PYTHONPATH)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(__file__), "_lora_kernels_cases.py")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.gpu
def test_kernels_match_torch_code_gpu():
    cases.check_kernels("cuda", torch.bfloat16, 2e-2)
    cases.check_rows_project("cuda", torch.bfloat16, 2e-2)
    cases.check_swiglu_lora("cuda", torch.bfloat16, 2e-2)
    cases.check_custom_ops("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kw",
    [
        dict(drop=False),
        dict(drop=True),
        dict(drop=True, segments=True),
        dict(drop=False, quantize=True),
        dict(drop=False, gpt_oss=True),
        dict(drop=False, bias=True),
        dict(drop=True, quantize=True),
    ],
    ids=["token_choice", "may_drop", "segments_may_drop", "qlora", "gpt_oss", "silu_bias", "qlora_may_drop"],
)
def test_lora_layer_kernels_match_torch_code_gpu(kw):
    cases.check_layer("cuda", torch.bfloat16, 2e-2, **kw)


@pytest.mark.gpu
def test_lora_layer_uses_kernels_on_cuda():
    from torchtune_moe.modules import _kernels

    assert _kernels.use_triton(torch.empty(1, device="cuda"))
    assert _kernels.lowrank_supported(2 * 768, 2, 16) and _kernels.lowrank_supported(2048, 1, 32)
    # the Qwen3-30B-A3B shape takes the SwiGLU kernels with the gate/up delta added on the fly
    h_AF, b_ENR = torch.empty(64, 2 * 768, device="cuda"), torch.empty(128, 2 * 768, 16, device="cuda")
    assert _kernels.swiglu_lora_supported(h_AF, b_ENR)
