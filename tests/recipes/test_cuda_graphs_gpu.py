"""``compile.cuda_graphs`` on a GPU: the recipe trains as with ``compile: true`` (the same losses), and generates the
samples after training (eagerly). Marked ``gpu``:
``python -m pytest -m gpu tests/recipes/test_cuda_graphs_gpu.py``. The refusals are tested on CPU
(tests/recipes/test_config.py)."""

import pytest
import torch

from tests.recipes._recipe_helpers import losses, make_recipe, run_recipe

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_recipe_with_cuda_graphs_trains_as_compiled(tmp_path, capsys):
    common = [
        "device=cuda", "dtype=bf16", "dataset.packed=true", "batch_size=8",
        "max_steps_per_epoch=12", "optimizer.foreach=true",
    ]
    fast = ("dataset.num_samples=2000", "log_every_n_steps=1")  # the samples stay on: generated eagerly
    recipe = make_recipe(tmp_path / "graphs", overrides=[*common, "compile={optimizer_step: true, cuda_graphs: true}"],
                         fast=fast)
    try:
        recipe.train()
        recipe.print_samples()  # generated eagerly (set_stance), as recipe_main does after training
    finally:
        recipe.cleanup()
    assert "What the model learned" in capsys.readouterr().out
    run_recipe(tmp_path / "plain", overrides=[*common, "compile={optimizer_step: true}"], fast=fast)
    graphs, plain = [v for _, v in losses(tmp_path / "graphs")], [v for _, v in losses(tmp_path / "plain")]
    assert len(graphs) == len(plain) == 12
    assert graphs[0] == pytest.approx(plain[0], rel=1e-3)  # the same kernels, replayed
    assert graphs == pytest.approx(plain, rel=5e-2)  # GPU runs are not bitwise repeatable; the curve is the same
    assert graphs[-1] < graphs[0]
