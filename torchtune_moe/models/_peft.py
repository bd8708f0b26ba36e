"""LoRA adapters in the PEFT format, Hub names: the key mapping (pure; the files are read and written by
:mod:`torchtune_moe.training._peft_files`).

The adapter of each Hub module is named by the module's Hub name, in the per-expert layout the Hub
checkpoints use (``model.layers.L.mlp.experts.E.gate_proj`` and each family's own names, e.g. Mixtral's
``block_sparse_moe.experts.E.w1``): ``base_model.model.<module>.lora_A.weight`` [r, in] and ``.lora_B.weight``
[out, r]. This is the layout PEFT writes for the Hub models (and converts itself to transformers 5's fused
experts when it loads an adapter) and the one vLLM's fused-MoE LoRA loader reads.

Experts stacked on the Hub too (GPT-OSS: ``mlp.experts.gate_up_proj`` [E, D, 2I], ``down_proj`` [E, I, D]) have no
per-expert modules: their adapters are LoRA on the parameter, as PEFT's ``target_parameters`` writes it (see
:func:`_stacked_to_peft`).
"""

import math
from bisect import bisect_right
from typing import Optional

import torch
from torch import nn

from torchtune_moe.models._hf_families import detect_family
from torchtune_moe.modules.peft import LoRAMoELinear, adapter_state_dict, lora_factors, lora_modules
from torchtune_moe.modules.peft._apply import _factor_keys

__all__ = ["peft_adapter_tensors", "adapter_state_from_peft"]

_PREFIX = "base_model.model."


def _base_weight_names(module: nn.Module) -> list[str]:
    return ["gate_up_proj", "down_proj"] if isinstance(module, LoRAMoELinear) else ["weight"]


def _base_shapes(model: nn.Module) -> dict[str, tuple]:
    """Dense shapes of every base (non-adapter) state-dict entry (NF4 expert weights are stored flattened)."""
    adapter, dense = set(), {}
    for name, module in lora_modules(model):
        adapter.update(f"{name}.{p}" for p in module.adapter_params())
        if isinstance(module, LoRAMoELinear):
            dense.update({f"{name}.{k}": tuple(v) for k, v in module.base_shapes.items()})
    return {k: dense.get(k, tuple(v.shape)) for k, v in model.state_dict().items() if k not in adapter}


def _hub_pieces(model: nn.Module, config: dict) -> dict[str, list[tuple[str, tuple, int, int]]]:
    """Our base weight key -> [(Hub key, leading expert index, first row, rows)] through the family's converter.

    The family's ``tune_to_hf`` is run on a probe state dict whose values number their own rows (a stride-0
    last dimension keeps it small), so each Hub tensor it returns tells which rows of which of our tensors it
    is: the key map stays described in one place, the family's converter.
    """
    shapes = _base_shapes(model)
    starts, keys, probe, start = [], [], {}, 0
    for key, shape in shapes.items():
        lead = shape[:-1]
        n = math.prod(lead)
        strides = tuple(math.prod(lead[i + 1 :]) for i in range(len(lead))) + (0,)
        probe[key] = torch.arange(start, start + n, dtype=torch.int64).as_strided(shape, strides)
        starts.append(start)
        keys.append(key)
        start += max(n, 1)
    hub = detect_family(config).tune_to_hf(probe, config)
    pieces: dict[str, list] = {}
    for hf_key, view in hub.items():
        if view.ndim not in (2, 3) or view.numel() == 0:
            continue
        pos = int(view.flatten()[0])
        i = bisect_right(starts, pos) - 1
        key, shape = keys[i], shapes[keys[i]]
        if view.ndim == 3:
            # Experts stacked on the Hub too: our whole tensor, as stored or transposed (lead None: the stack).
            E, O, I = shape if len(shape) == 3 else (0, 0, 0)
            if pos == starts[i] and tuple(view.shape) in ((E, O, I), (E, I, O)):
                pieces.setdefault(key, []).append((hf_key, None, 0, O))
            continue
        if view.stride(-1) != 0 or view.shape[-1] != shape[-1]:
            raise RuntimeError(f"{hf_key}: the {config.get('model_type')} converter reshapes {key}; cannot map adapters")
        coords = []
        local = pos - starts[i]
        for size in reversed(shape[:-1]):
            coords.append(local % size)
            local //= size
        coords.reverse()  # (expert, row) for stacked experts, (row,) for a linear
        pieces.setdefault(key, []).append((hf_key, tuple(coords[:-1]), coords[-1], view.shape[0]))
    return pieces


def _adapter_slots(model: nn.Module, config: dict):
    """Yields ``(hub_module, A key, A index, B key, B index, rank, alpha)`` for every Hub module an adapter of
    ``model`` covers: the Hub module's lora_A is ``state_dict[A key][A index]``, its lora_B likewise."""
    pieces = _hub_pieces(model, config)
    for name, module in lora_modules(model):
        for w in _base_weight_names(module):
            _, b, parts = lora_factors(module, w)
            a_key, b_key = (f"{name}.{k}" for k in _factor_keys(module, w))
            r, out_rows = module.rank, b.shape[-2]
            for hf_key, lead, row0, rows in pieces[f"{name}.{w}"]:
                if lead is None:  # stacked on the Hub: the whole factors (see _stacked_to_peft)
                    yield hf_key, a_key, None, b_key, None, r, module.alpha
                    continue
                part = row0 * parts // out_rows
                yield (
                    hf_key.removesuffix(".weight"),
                    a_key, lead + (slice(part * r, (part + 1) * r),),
                    b_key, lead + (slice(row0, row0 + rows),),
                    r, module.alpha,
                )


def _stacked_to_peft(a_ERI: torch.Tensor, b_EOR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our per-expert factors of a stacked parameter (A [E, r, in], B [E, out, r], one pair per expert) -> PEFT's
    ``ParamWrapper`` ``lora_A.weight`` [E*r, in] (expert-major rows) and ``lora_B.weight`` [out, r*E] (rank-major
    columns), whose delta PEFT forms as ``einsum("o r e, e r i -> e i o")`` (the Hub's [E, in, out]; or its
    transpose for a parameter stored [E, out, in]): the same ``scale * B_e @ A_e`` per expert."""
    E, r, fan_in = a_ERI.shape
    return a_ERI.reshape(E * r, fan_in), b_EOR.permute(1, 2, 0).reshape(b_EOR.shape[1], r * E)


def _stacked_from_peft(a: torch.Tensor, b: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_stacked_to_peft`."""
    return a.reshape(num_experts, -1, a.shape[-1]), b.reshape(b.shape[0], -1, num_experts).permute(2, 0, 1)


def _stacked_peft_names(params: list[str]) -> dict[str, str]:
    """Hub parameter -> the PEFT key prefix of its adapter. PEFT wraps each targeted parameter of one module in a
    ``ParamWrapper`` around the previous one, in the module's parameter order: the first is innermost, under
    ``n - 1`` ``base_layer.`` (our slots follow the Hub's order: ``gate_up_proj`` then ``down_proj``)."""
    out, by_module = {}, {}
    for param in params:
        by_module.setdefault(param.rpartition(".")[0], []).append(param)
    for module, names in by_module.items():
        for i, param in enumerate(names):
            out[param] = f"{_PREFIX}{module}." + "base_layer." * (len(names) - 1 - i)
    return out


def peft_adapter_tensors(
    model: nn.Module,
    config: dict,
    *,
    base_model_name_or_path: Optional[str] = None,
    lora_dropout: float = 0.0,
    adapter_state: Optional[dict[str, torch.Tensor]] = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """The PEFT tensors (Hub names, CPU, contiguous) and ``adapter_config.json`` of the adapters of ``model``
    for the Hub model ``config`` describes.

    Args:
        model (nn.Module): a model with LoRA modules (:func:`~torchtune_moe.models.lora_model`).
        config (dict): the base checkpoint's config.json.
        base_model_name_or_path (Optional[str]): recorded in adapter_config.json.
        lora_dropout (float): recorded in adapter_config.json.
        adapter_state (Optional[dict]): the adapter values by state-dict key (e.g. gathered from FSDP shards);
            default: ``model``'s own.

    Raises:
        ValueError: no adapter, adapters of different ranks or alphas, or an unsupported family.
    """
    sd = adapter_state_dict(model) if adapter_state is None else adapter_state
    tensors, targets, ranks, stacked = {}, set(), set(), {}
    for module_name, a_key, a_idx, b_key, b_idx, r, alpha in _adapter_slots(model, config):
        ranks.add((r, float(alpha)))
        if a_idx is None:  # a stacked Hub parameter (module_name is its name)
            stacked[module_name] = _stacked_to_peft(sd[a_key], sd[b_key])
            continue
        tensors[f"{_PREFIX}{module_name}.lora_A.weight"] = sd[a_key][a_idx].cpu().contiguous()
        tensors[f"{_PREFIX}{module_name}.lora_B.weight"] = sd[b_key][b_idx].cpu().contiguous()
        targets.add(module_name.rsplit(".", 1)[-1])
    for param, prefix in _stacked_peft_names(list(stacked)).items():
        for which, t in zip(("lora_A", "lora_B"), stacked[param]):
            tensors[f"{prefix}{which}.weight"] = t.cpu().contiguous()
    if not tensors:
        raise ValueError("the model has no LoRA adapter to save")
    if len(ranks) != 1:
        raise ValueError(f"a PEFT adapter has one rank and alpha; the model's adapters have {sorted(ranks)}")
    ((r, alpha),) = ranks
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": lora_dropout,
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    if stacked:  # PEFT matches a target parameter as a suffix of "module.parameter": the module's last name and it
        adapter_config["target_parameters"] = sorted({".".join(p.split(".")[-2:]) for p in stacked})
    return tensors, adapter_config


def adapter_state_from_peft(
    model: nn.Module, config: dict, tensors: dict[str, torch.Tensor], adapter_config: dict, where: str = "adapter"
) -> dict[str, torch.Tensor]:
    """PEFT tensors (per-expert layout, as :func:`peft_adapter_tensors` names them) -> an adapter state dict of
    ``model`` (CPU; load it with ``model.load_state_dict(sd, strict=False)``).

    Raises:
        ValueError: missing or unexpected tensors, or a rank / alpha other than the model's, listed (prefixed by
            ``where``, e.g. the adapter directory).
    """
    out = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in adapter_state_dict(model).items()}
    used, missing = set(), []
    slots = list(_adapter_slots(model, config))
    prefixes = _stacked_peft_names([s[0] for s in slots if s[2] is None])
    for module_name, a_key, a_idx, b_key, b_idx, r, alpha in slots:
        if adapter_config.get("r") != r or float(adapter_config.get("lora_alpha", -1)) != float(alpha):
            raise ValueError(
                f"{where}: r={adapter_config.get('r')}, lora_alpha={adapter_config.get('lora_alpha')}, but the "
                f"model's adapters have lora_rank={r}, lora_alpha={alpha}"
            )
        if a_idx is None:  # a stacked Hub parameter
            names = [f"{prefixes[module_name]}{which}.weight" for which in ("lora_A", "lora_B")]
            missing += [n for n in names if n not in tensors]
            if all(n in tensors for n in names):
                for n, want in zip(names, _stacked_to_peft(out[a_key], out[b_key])):
                    if tensors[n].shape != want.shape:
                        raise ValueError(f"{where}: {n} has shape {tuple(tensors[n].shape)}; the model needs "
                                         f"{tuple(want.shape)}")
                a, b = _stacked_from_peft(tensors[names[0]], tensors[names[1]], out[a_key].shape[0])
                out[a_key], out[b_key] = a.to(out[a_key].dtype).contiguous(), b.to(out[b_key].dtype).contiguous()
                used.update(names)
            continue
        for which, key, idx in (("lora_A", a_key, a_idx), ("lora_B", b_key, b_idx)):
            name = f"{_PREFIX}{module_name}.{which}.weight"
            if name not in tensors:
                missing.append(name)
                continue
            out[key][idx] = tensors[name]
            used.add(name)
    unexpected = sorted(set(tensors) - used)
    if missing or unexpected:
        raise ValueError(
            f"{where}: the adapter does not match the model: missing {missing[:20]}, unexpected {unexpected[:20]}"
        )
    return out
