"""The recipes' compiled model (``compile: true``, or ``compile.model``).

torchtune's ``training.compile_model`` compiles each decoder layer and nothing else. The final norm then runs
eagerly: torchtune's ``RMSNorm`` upcasts to fp32 and autograd records each of ``rms_norm``'s ops, about 20 kernels
forward and backward over the [tokens, dim] activations (0.85 ms of a 66 ms training step at Qwen3-30B-A3B's width
and 8192 tokens on an H200, benchmarks/NOTES.md session 24). Compiled, it is one kernel each way.

Why written here: torchtune's function has no hook for other modules, and compiling the whole model instead costs a
graph over every layer (minutes at 48 layers).
"""

import logging
import os

from torch import nn
from torchtune import training
from torchtune.modules import TransformerCrossAttentionLayer, TransformerSelfAttentionLayer

log = logging.getLogger(__name__)

__all__ = ["compile_model"]


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
