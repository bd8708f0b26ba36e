"""Helpers for the Hugging Face family tests: tiny random transformers models saved to disk and compared with
ours (fp32 logits and loss), and the save -> transformers round trip through HFMoECheckpointer.

Importable from any test (tests/ is on sys.path through tests/conftest.py).
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from torchtune_moe.training import from_hf_pretrained  # noqa: E402
from torchtune_moe.models import build_from_hf_config  # noqa: E402
from torchtune_moe.training._hf_checkpointer import HFMoECheckpointer  # noqa: E402

ATOL = 1e-4

# Small dims that grouped_mm accepts (multiples of 8).
TINY = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def save_tiny_hf(config_cls, model_cls, path: Path, seed: int = 0, **config_kwargs):
    """Builds a random transformers model (norm weights and biases randomised too, so that a missing norm or
    bias shows), saves it with ``save_pretrained`` and returns ``(model in eval mode, path)``."""
    torch.manual_seed(seed)
    kwargs = dict(TINY)
    kwargs.update(config_kwargs)
    model = model_cls(config_cls(**kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))  # a side file to carry
    return model.eval(), path


def compare(hf_model, ours, seed: int = 1, seq_len: int = 16) -> None:
    """fp32 logits within ATOL and the same next-token cross-entropy."""
    torch.manual_seed(seed)
    vocab = hf_model.config.vocab_size
    tokens = torch.randint(0, vocab, (2, seq_len))
    with torch.no_grad():
        hf_out = hf_model(tokens, labels=tokens)
        logits = ours(tokens)
    diff = (hf_out.logits - logits).abs().max().item()
    assert diff <= ATOL, f"max abs logit difference {diff}"
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, hf_out.loss, atol=ATOL, rtol=0)


def load_and_compare(hf_model, path: Path, **kwargs):
    """``from_hf_pretrained`` matches transformers; returns our model."""
    ours = from_hf_pretrained(path, dtype=torch.float32, **kwargs)
    assert not ours.training
    compare(hf_model, ours)
    return ours


def checkpointer_round_trip(hf_model, path: Path, out: Path, max_shard_size: int = 10_000):
    """Load with HFMoECheckpointer into a model built from config.json, perturb it, save it, load the saved
    directory with transformers (every key found, none missing) and compare again. Returns the saved dir."""
    ckpt = HFMoECheckpointer(str(path), max_shard_size=max_shard_size)
    ours = build_from_hf_config(json.loads((path / "config.json").read_text()), device="cpu")
    state_dict = ckpt.load_checkpoint(ours)["model"]
    ours.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # a "fine-tuned" model, different from the original
    save_dir = out / "step_1"
    save_dir.mkdir(parents=True)
    ckpt.save_checkpoint(ours.state_dict(), save_dir)
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        save_dir, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    compare(reloaded.eval(), ours.eval())
    # Same per-expert key names as the original Hub checkpoint, the original config and side files.
    original = set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]) if (
        path / "model.safetensors.index.json"
    ).exists() else set(_safetensors_keys(path / "model.safetensors"))
    saved = set(json.loads((save_dir / "model.safetensors.index.json").read_text())["weight_map"])
    assert saved == original
    assert (save_dir / "config.json").read_text() == (path / "config.json").read_text()
    assert (save_dir / "tokenizer_config.json").exists()
    return save_dir


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def single_moe_layer_aux_loss(hf_model, ours) -> None:
    """With one MoE layer our aux loss equals transformers' ``router_aux_loss_coef * aux_loss`` exactly."""
    from torchtune_moe.modules import collect_aux_loss

    torch.manual_seed(2)
    tokens = torch.randint(0, hf_model.config.vocab_size, (2, 16))
    hf_model.train()
    ours.train()
    out = hf_model(tokens, output_router_logits=True)
    ours(tokens)
    torch.testing.assert_close(collect_aux_loss(ours), hf_model.config.router_aux_loss_coef * out.aux_loss)


def describe(model) -> dict:
    """What distinguishes two models of equal structure: shapes and the hyperparameters not in shapes."""
    from torchtune_moe.modules import moe_layers

    first = model.layers[0].attn
    routers = [layer.router for _, layer in moe_layers(model)]
    return {
        "shapes": {k: tuple(v.shape) for k, v in model.state_dict().items()},
        "rope_base": first.pos_embeddings.base,
        "max_seq_len": model.max_seq_len,
        "eps": model.norm.eps,
        "norm_topk_prob": {r.norm_topk_prob for r in routers},
        "aux_loss_coeff": {layer.aux_loss_coeff for _, layer in moe_layers(model)},
        "padding_idx": model.tok_embeddings.padding_idx,
    }


def param_counts(model, count_input_embedding: bool = True) -> tuple[int, int]:
    """(total, active per token) parameters of a built model (meta works): active counts K of the E routed
    experts of each MoE layer; ``count_input_embedding=False`` leaves the input embedding out of the active
    count, as some publishers do."""
    from torchtune_moe.modules import moe_layers

    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    E, K = [(layer.router.num_experts, layer.router.experts_per_token) for _, layer in moe_layers(model)][0]
    active = total - routed + routed * K // E
    if not count_input_embedding:
        active -= model.tok_embeddings.weight.numel()
    return total, active
