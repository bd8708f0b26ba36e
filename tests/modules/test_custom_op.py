"""``_custom_op.custom_op``: eager calls on plain tensors run the function itself (no custom-op dispatch on the
host); torch.compile, fake or meta tensors, dispatch modes, tensor subclasses and autograd get the op."""

import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from torchtune_moe.modules._custom_op import custom_op

CALLS: list[bool] = []


@custom_op("test_scaled_copy")
def _scaled_copy(x: torch.Tensor, scale: float) -> torch.Tensor:
    # through the op, torch's custom-op machinery (torch/_library) is on the stack
    CALLS.append(any("_library" in f.filename for f in inspect.stack()))
    return x * scale


@_scaled_copy.register_fake
def _(x, scale):
    return torch.empty_like(x)


def _via_op(fn) -> list[bool]:
    CALLS.clear()
    fn()
    return list(CALLS)


def test_eager_plain_tensors_call_the_function():
    x = torch.arange(4.0)
    assert _via_op(lambda: torch.testing.assert_close(_scaled_copy(x, 2.0), x * 2)) == [False]
    p = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    assert _via_op(lambda: _scaled_copy(p, 2.0)) == [False]
    with torch.no_grad():  # a tensor that requires grad, with grad mode off: nothing to record
        assert _via_op(lambda: _scaled_copy(torch.ones(3, requires_grad=True), 2.0)) == [False]


def test_op_where_something_needs_it():
    # meta tensors: the fake, never the function
    assert _via_op(lambda: _scaled_copy(torch.empty(3, device="meta"), 2.0)) == []
    # autograd: the op records itself (and refuses a backward: no formula) rather than the graph being dropped
    x = torch.ones(3, requires_grad=True)
    out = []
    assert _via_op(lambda: out.append(_scaled_copy(x, 2.0))) == [True]
    assert out[0].grad_fn is not None
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out[0].sum().backward()

    class Spy(TorchDispatchMode):
        seen: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Spy.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Spy():
        out = _scaled_copy(torch.ones(3), 3.0)
    assert any("test_scaled_copy" in s for s in Spy.seen) and out.tolist() == [3.0] * 3

    compiled = torch.compile(lambda t: _scaled_copy(t, 2.0) + 1, backend="eager", fullgraph=True)
    assert _via_op(lambda: torch.testing.assert_close(compiled(torch.ones(3)), torch.full((3,), 3.0))) == [True]
