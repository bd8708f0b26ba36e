"""fp8 training of the dense linear layers (``enable_fp8_training``): which layers convert, what stays, the
recipe's wiring (convert, train, save, resume) in torchao's emulation on CPU, and a GPU run."""

from functools import partial

import pytest
import torch
from torchao.float8.float8_linear import Float8Linear

from torchtune_moe.models import moe
from torchtune_moe.training import FP8_RECIPES, convert_to_float8_training

from tests.recipes._recipe_helpers import losses, run_recipe


def _model(device=None):
    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        return moe(
            vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=64, num_experts=8,
            experts_per_token=2, moe_hidden_dim=32, moe_layer_ids=[1], dense_hidden_dim=96,
            shared_expert_hidden_dim=48, shared_expert_gate=True,
        ).to(torch.bfloat16)


def _converted(model):
    return sorted(name for name, m in model.named_modules() if isinstance(m, Float8Linear))


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_dense_layers_convert_the_rest_stays_and_the_state_dict_is_unchanged(recipe):
    """Attention projections, the dense FFN and the shared expert train in fp8; the output projection, the
    router, the shared expert's one-output gate (not a multiple of 16) and the routed experts stay as they are;
    the state dict keeps its keys and values; forward and backward run (torchao's emulation on CPU) and stay
    close to bf16."""
    ref, model = _model(), _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert convert_to_float8_training(model, recipe, emulate=True) == len(_converted(model))
    attn = [f"layers.{i}.attn.{p}" for i in (0, 1) for p in ("k_proj", "output_proj", "q_proj", "v_proj")]
    dense = [f"layers.0.mlp.{p}" for p in ("w1", "w2", "w3")]
    shared = [f"layers.1.mlp.shared_expert.{p}" for p in ("w1", "w2", "w3")]
    assert _converted(model) == sorted(attn + dense + shared)
    plain = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert plain == {"output", "layers.1.mlp.router.gate", "layers.1.mlp.shared_expert_gate"}
    after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    tokens = torch.randint(0, 256, (2, 16))
    out, want = model(tokens).float(), ref(tokens).float()
    assert (out - want).norm() / want.norm() < 0.1  # fp8 rounding of every dense GEMM's operands
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_meta_model_converts_and_bad_recipe_is_refused():
    """The recipe converts before loading weights (a model on the meta device); an unknown recipe name is
    refused by name."""
    model = _model("meta")
    assert convert_to_float8_training(model) == 14
    assert all(p.is_meta for p in model.parameters())
    with pytest.raises(ValueError, match="fp8_recipe_name must be one of tensorwise, rowwise, rowwise_with_gw_hp"):
        convert_to_float8_training(_model("meta"), "blockwise")


def test_recipe_trains_saves_and_resumes_with_fp8_dense_layers(tmp_path, monkeypatch):
    """The recipe's wiring, in torchao's emulation on CPU (the check for a GPU of compute capability 8.9+ stood in
    for): the dense layers convert before training, the loss falls, the checkpoint holds the same keys as a bf16
    run's, and a resume continues from it."""
    import moe_full_finetune

    from torchtune_moe.training import _recipe_config

    monkeypatch.setattr(_recipe_config, "_below_capability", lambda cfg, minimum: None)  # as on an H100
    monkeypatch.setattr(
        moe_full_finetune, "convert_to_float8_training", partial(convert_to_float8_training, emulate=True)
    )
    common = ["dtype=bf16", "batch_size=8", "save_every_n_steps=4", "optimizer.lr=3e-3"]
    fp8 = ["enable_fp8_training=true", "fp8_recipe_name=rowwise", *common]
    recipe = run_recipe(tmp_path / "fp8", overrides=["max_steps_per_epoch=8", "epochs=1", *fp8])
    assert len(_converted(recipe._model)) == 16  # q, k, v, output_proj of 4 layers
    logged = [v for _, v in losses(tmp_path / "fp8")]
    assert len(logged) == 8 and all(v == v for v in logged) and logged[-1] < logged[0]
    run_recipe(tmp_path / "bf16", overrides=["max_steps_per_epoch=4", *common])
    from safetensors import safe_open

    def keys(step_dir):  # the epoch-end checkpoints (mid-epoch ones are DCP shards only)
        with safe_open(str(tmp_path / step_dir / "model.safetensors"), "pt") as f:
            return sorted(f.keys())

    assert keys("fp8/step_8") == keys("bf16/step_4")
    resumed = run_recipe(
        tmp_path / "fp8", overrides=["max_steps_per_epoch=8", "epochs=2", "resume_from_checkpoint=true", *fp8]
    )
    assert resumed.global_step == 16 and len(_converted(resumed._model)) == 16


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
    reason="needs a CUDA GPU of compute capability 8.9+",
)
def test_recipe_trains_with_fp8_dense_layers_on_gpu(tmp_path):
    """``tiny/full`` on the GPU with real fp8 GEMMs (compiled, as the GPU configs run): the loss falls as in bf16."""
    common = ["device=cuda", "dtype=bf16", "compile=true", "batch_size=32", "max_steps_per_epoch=60"]
    run_recipe(tmp_path / "fp8", overrides=[*common, "enable_fp8_training=true"])
    run_recipe(tmp_path / "bf16", overrides=common)
    fp8, bf16 = [v for _, v in losses(tmp_path / "fp8")], [v for _, v in losses(tmp_path / "bf16")]
    assert len(fp8) == len(bf16) == 60
    last_fp8, last_bf16 = sum(fp8[-10:]) / 10, sum(bf16[-10:]) / 10  # the mean of the last 10 steps: less noise
    assert last_fp8 < 0.5 * fp8[0]
    assert abs(last_fp8 - last_bf16) < 0.1 * last_bf16 + 0.05


def test_recipe_checks_gpu_and_dtype_for_fp8_training(monkeypatch):
    """On a GPU (faked here): compute capability 8.9 is the least (``torch._scaled_mm``), then dtype bf16."""
    from torchtune_moe.config import load_config
    from torchtune_moe.training import _recipe_config

    monkeypatch.setattr(_recipe_config.utils, "get_device", lambda device=None: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    cfg = load_config("tiny/full", ["enable_fp8_training=true", "dtype=bf16"])
    with pytest.raises(ValueError, match=r"8\.9\+ .*got NVIDIA A100 \(compute capability 8\.0\)"):
        _recipe_config._check_fp8_training(cfg)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    with pytest.raises(ValueError, match=r"enable_fp8_training: true needs dtype: bf16 .*got dtype: fp32"):
        _recipe_config._check_fp8_training(load_config("tiny/full", ["enable_fp8_training=true", "dtype=fp32"]))
    _recipe_config._check_fp8_training(cfg)  # allowed
