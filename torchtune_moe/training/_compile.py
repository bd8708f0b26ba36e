"""The recipes' compiled model (``compile: true``, or ``compile.model``).

torchtune's ``training.compile_model`` compiles each decoder layer and nothing else. The final norm then runs
eagerly: torchtune's ``RMSNorm`` upcasts to fp32 and autograd records each of ``rms_norm``'s ops, about 20 kernels
forward and backward over the [tokens, dim] activations (0.85 ms of a 66 ms training step at Qwen3-30B-A3B's width
and 8192 tokens on an H200, benchmarks/NOTES.md session 24). Compiled, it is one kernel each way.

Why written here: torchtune's function has no hook for other modules, and compiling the whole model instead costs a
graph over every layer (minutes at 48 layers).
"""

import os

from torch import nn
from torchtune import training

__all__ = ["compile_model"]


def compile_model(model: nn.Module, verbose: bool = True) -> None:
    """Compiles ``model`` in place: each decoder layer (``torchtune.training.compile_model``) and the final norm
    (``model.norm``, where the model has one), with the backend torchtune uses (``TORCH_COMPILE_BACKEND``, default
    inductor).

    Args:
        model (nn.Module): a torchtune ``TransformerDecoder`` (or a ``DeepFusionModel``: its decoder).
        verbose (bool): log as torchtune's function does. Default True.
    """
    training.compile_model(model, verbose=verbose)
    decoder = getattr(model, "decoder", model)
    norm = getattr(decoder, "norm", None)
    if isinstance(norm, nn.Module):
        norm.compile(backend=os.environ.get("TORCH_COMPILE_BACKEND", "inductor"))
