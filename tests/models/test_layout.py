"""How the code is laid out (docs/layout.md): no import circle, every module imports on its own, models does not
read files, and the private torch API the MoE layer relies on still behaves."""

import ast
import pathlib
import subprocess
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "torchtune_moe"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


# The one deliberate late import: torchtune_moe.models.from_hf_pretrained is a deprecated alias resolved in the
# package's __getattr__ (torchtune_moe.training imports torchtune_moe.models, so a top-level import would be a
# circle).
_ALLOWED_LATE = {("torchtune_moe.models", "torchtune_moe.training")}


def _import_graph() -> dict[str, set[str]]:
    """Module -> torchtune_moe modules it imports anywhere in its body (function-local imports included)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # `from pkg import sub` imports the submodule when there is one, else a name of pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target.startswith("torchtune_moe") and target != name and (name, target) not in _ALLOWED_LATE:
                    edges.add(target)
        graph[name] = edges
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_no_import_circle():
    graph = _import_graph()
    assert "torchtune_moe.models._hf" not in graph  # the 848-line module is gone, split by job
    cycle = _find_cycle(graph)
    assert not cycle, " -> ".join(cycle)


def test_models_do_not_import_training_or_file_io():
    """Families and builders know names, shapes and config.json keys; reading files is torchtune_moe.training's."""
    graph = _import_graph()
    for name, edges in graph.items():
        if name.startswith("torchtune_moe.models"):
            assert not {e for e in edges if e.startswith("torchtune_moe.training")}, name
    assert "torchtune_moe.models._hf_families" in graph["torchtune_moe.training._hf_checkpointer"]
    io_edges = {e for e in graph["torchtune_moe.training._hf_files"] if e.startswith("torchtune_moe")}
    assert not io_edges, io_edges  # the I/O layer knows no family


def test_every_module_imports_on_its_own():
    """Each module imported first, in a fresh copy of the package (torch stays loaded to keep this fast)."""
    import importlib.util

    names = sorted(_modules())
    if importlib.util.find_spec("triton") is None:  # the GPU kernels module needs triton (imported only with it)
        names.remove("torchtune_moe.modules._kernels._triton")
    code = (
        "import importlib, sys, torch\n"
        f"for name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m.startswith('torchtune_moe')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(name)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_graph_task_id_tells_backward_recomputes_apart():
    """modules/routers.py's ``_in_backward_recompute`` reads the private ``torch._C._current_graph_task_id``
    (-1 outside a backward) to keep an activation-checkpoint recompute from overwriting the first forward's
    statistics. If torch changes that behaviour, this fails loudly instead of the MoE layer going wrong silently."""
    from torchtune_moe.modules.routers import _in_backward_recompute

    assert hasattr(torch._C, "_current_graph_task_id"), "torch removed torch._C._current_graph_task_id"
    assert torch._C._current_graph_task_id() == -1 and not _in_backward_recompute()
    seen = []

    def f(x):
        seen.append((torch._C._current_graph_task_id(), _in_backward_recompute()))
        return x.sin()

    x = torch.randn(4, requires_grad=True)
    torch.utils.checkpoint.checkpoint(f, x, use_reentrant=False).sum().backward()
    assert len(seen) == 2, seen  # the forward, then the recompute inside backward
    (first_id, first), (recompute_id, recompute) = seen
    assert first_id == -1 and not first
    assert recompute_id != -1 and recompute
    assert torch._C._current_graph_task_id() == -1 and not _in_backward_recompute()
