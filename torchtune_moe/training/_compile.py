"""The recipes' compiled model (``compile: true``, or ``compile.model``; ``compile.cuda_graphs``), and
:func:`capture_cuda_graph` for a training loop of one's own.

torchtune's ``training.compile_model`` compiles each decoder layer and nothing else. The final norm then runs
eagerly: torchtune's ``RMSNorm`` upcasts to fp32 and autograd records each of ``rms_norm``'s ops, about 20 kernels
forward and backward over the [tokens, dim] activations (0.85 ms of a 66 ms training step at Qwen3-30B-A3B's width
and 8192 tokens on an H200, benchmarks/NOTES.md session 24). Compiled, it is one kernel each way.

Why written here: torchtune's function has no hook for other modules, and compiling the whole model instead costs a
graph over every layer (minutes at 48 layers).
"""

import os
from typing import Any, Callable

import torch
from torch import nn
from torchtune import training
from torchtune.modules import TransformerCrossAttentionLayer, TransformerSelfAttentionLayer
from torchtune.utils import get_logger

log = get_logger("INFO")

__all__ = ["capture_cuda_graph", "compile_model"]


def compile_model(model: nn.Module, verbose: bool = True, cuda_graphs: bool = False) -> None:
    """Compiles ``model`` in place: each decoder layer (``torchtune.training.compile_model``) and the final norm
    (``model.norm``, where the model has one), with the backend torchtune uses (``TORCH_COMPILE_BACKEND``, default
    inductor).

    With ``cuda_graphs`` the decoder layers compile with ``mode="reduce-overhead"``: torch.compile records each
    compiled graph (forward and backward) as a CUDA graph and replays it, one launch for the graph's kernels and no
    Python between them (the MoE layer's host work is ~3.5 ms per forward + backward whatever its tokens,
    docs/performance.md). The caller marks each training forward with
    ``torch.compiler.cudagraph_mark_step_begin()``. torchtune's function takes no mode, hence the loop here over
    the same layer classes.

    Args:
        model (nn.Module): a torchtune ``TransformerDecoder`` (or a ``DeepFusionModel``: its decoder).
        verbose (bool): log as torchtune's function does. Default True.
        cuda_graphs (bool): replay the compiled layers as CUDA graphs. Default False.
    """
    backend = os.environ.get("TORCH_COMPILE_BACKEND", "inductor")
    decoder = getattr(model, "decoder", model)
    if cuda_graphs:
        if verbose:
            log.info("Compiling model layers with torch.compile (mode=reduce-overhead: CUDA graphs)...")
        for m in reversed(list(decoder.modules())):
            if isinstance(m, (TransformerSelfAttentionLayer, TransformerCrossAttentionLayer)):
                m.compile(backend=backend, mode="reduce-overhead")
    else:
        training.compile_model(model, verbose=verbose)
    norm = getattr(decoder, "norm", None)
    if isinstance(norm, nn.Module):
        norm.compile(backend=backend)


def capture_cuda_graph(
    model: nn.Module, step: Callable[[], Any], warmup: int = 3
) -> tuple["torch.cuda.CUDAGraph", Any]:
    """Captures one call of ``step`` (a forward + backward of ``model``, MoE layers included) in a CUDA graph:
    ``graph.replay()`` then reruns its kernels on the tensors it captured, with no host work between them (one MoE
    layer at 2048 tokens: 1.8-2.3x its eager pass on an H200, docs/performance.md "CUDA graphs").

    It follows what a capture of the MoE layers needs: the aux losses of earlier passes dropped (each layer's
    ``clear_aux_losses``: they hold the last pass's autograd graph, whose gradient accumulators would run on the
    stream of the pass that made them, outside the capture), ``warmup`` passes on a side stream (kernels compiled,
    memory pools made), then the capture on that same stream with ``model``'s gradients set to None before each call
    (the graph makes its own ``.grad`` tensors, rewritten by each replay). Written here because torch's
    ``make_graphed_callables`` takes a module's outputs only, not the aux losses the layers keep aside.

    The caller feeds new data by copying it into the tensors ``step`` reads (``x.copy_(batch)``) and reads results
    from what ``step`` returned and from the parameters' ``.grad``; leaves other than ``model``'s parameters are the
    caller's to set to None in ``step``. Shapes are fixed by the capture, and the routers must not read the host
    (causal expert choice does: refused). Needs a CUDA device.

    Args:
        model (nn.Module): the model (or layer) whose parameters ``step`` trains.
        step (Callable[[], Any]): one forward + backward; its return value is kept as the graph's outputs.
        warmup (int): eager passes before the capture. Default 3.

    Returns:
        tuple: the ``torch.cuda.CUDAGraph`` and what ``step`` returned during the capture.

    Raises:
        ValueError: ``model`` is not on a CUDA device or routes by causal expert choice, ``step`` is not callable, or
            ``warmup`` is not an int of at least 1.
    """
    from torchtune_moe.modules import CausalExpertChoiceRouter, moe_layers

    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        raise ValueError(
            f"capture_cuda_graph: warmup must be an int of at least 1 (an eager pass compiles the kernels), got "
            f"{warmup!r}"
        )
    if not callable(step):
        raise ValueError(f"capture_cuda_graph: step must be a function of no arguments, got {type(step).__name__}")
    reading = [name for name, m in model.named_modules() if isinstance(m, CausalExpertChoiceRouter)]
    if reading:
        raise ValueError(
            f"capture_cuda_graph: {reading[0] or 'the model'} is a causal expert choice router, which reads its kept "
            "rows' count on the host every forward: a CUDA graph cannot capture that (token or expert choice can)"
        )
    params = list(model.parameters())
    if not params or params[0].device.type != "cuda":
        raise ValueError("capture_cuda_graph: model must be on a CUDA device (CUDA graphs are CUDA's)")

    def call():
        for p in params:
            p.grad = None
        return step()

    for _, layer in moe_layers(model):
        layer.clear_aux_losses()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        out = call()
    return graph, out
