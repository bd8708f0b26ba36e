"""``custom_op``: the project's custom ops (``torch.ops.torchtune_moe.*``), called directly when eager.

torch.compile needs our kernels (Triton, quack's GEMMs, the host reads of dispatch) as custom ops: opaque nodes
with a fake implementation for shapes. Eager, the op's Python dispatch (schema checks, the autograd and
dispatcher hops) costs host time on every call: 35-60 µs on the H200 machines (quack's GEMM, three machines: 78-99
µs through its op against 35-44 µs called directly), and a routed-expert layer makes a dozen such calls per step,
which an eager layer at the Qwen3-30B-A3B shape waits on (benchmarks/NOTES.md, "Host time of the eager layer").

So an op made here runs its function directly when nothing needs the op: not compiling, no dispatch mode
(FakeTensorMode, the FLOP counter, ...) active, every tensor argument a plain tensor (no subclass: DTensor, NF4,
fake) off the meta device, and no input requiring grad with grad mode on (the op then records a node, which
refuses a backward without a formula, rather than the graph being cut silently)."""

from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["custom_op"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _tensors(args) -> Iterable[torch.Tensor]:
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


def _direct(args) -> bool:
    """Whether a call with ``args`` can skip the op: see the module doc."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    grad = torch.is_grad_enabled()
    for t in _tensors(args):
        if type(t) not in _PLAIN or t.is_meta or (grad and t.requires_grad):
            return False
    return True


class _Op:
    """A custom op and its function: called, the op when torch.compile (or a mode, a subclass) needs it, else the
    function. ``register_fake`` registers the op's fake; ``op`` is the op itself."""

    def __init__(self, op, fn: Callable):
        self.op, self.fn = op, fn
        self.register_fake = op.register_fake

    def __call__(self, *args):
        return self.fn(*args) if _direct(args) else self.op(*args)


def custom_op(name: str, *, mutates_args=(), device_types=None) -> Callable[[Callable], _Op]:
    """Decorator: ``torch.library.custom_op(f"torchtune_moe::{name}", ...)``, called directly when eager (module
    doc). Positional arguments only at call sites."""

    def wrap(fn: Callable) -> _Op:
        op = torch.library.custom_op(
            f"torchtune_moe::{name}", fn, mutates_args=mutates_args, device_types=device_types
        )
        return _Op(op, fn)

    return wrap
