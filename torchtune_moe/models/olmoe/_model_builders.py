"""OLMoE published size (values of the Hub config.json) and the tokenizer."""

from typing import Optional

from torchtune.data._prompt_templates import _get_prompt_template, _TemplateType
from torchtune.modules import TransformerDecoder

from torchtune_moe.models._hf import hf_aux_loss_coeff
from torchtune_moe.models.olmoe._component_builders import olmoe
from torchtune_moe.models.olmoe._tokenizer import OlmoeTokenizer

__all__ = ["olmoe_1b_7b", "olmoe_tokenizer"]


def olmoe_1b_7b(
    *, max_seq_len: int = 4096, aux_loss_coeff: float = hf_aux_loss_coeff(0.01, 8, 16), **moe_kwargs
) -> TransformerDecoder:
    """OLMoE-1B-7B (-0924, -0125 and their -Instruct): 16 layers, 64 experts, top-8, 6.9B parameters, 1.3B active.

    Args:
        max_seq_len (int): RoPE cache length (config.json max_position_embeddings: 4096).
        aux_loss_coeff (float): default reproduces the published ``router_aux_loss_coef`` 0.01
            (``0.01 * top_k 8 / 16 MoE layers``).
        **moe_kwargs: training options of :func:`torchtune_moe.models.moe` (OLMoE was pretrained with a router
            z-loss of 0.001, which transformers does not apply: ``z_loss_coeff=0.001`` adds it).
    """
    return olmoe(
        vocab_size=50304,
        num_layers=16,
        num_heads=16,
        num_kv_heads=16,
        embed_dim=2048,
        moe_intermediate_dim=1024,
        num_experts=64,
        experts_per_token=8,
        max_seq_len=max_seq_len,
        rope_base=10_000.0,
        norm_eps=1e-5,
        norm_topk_prob=False,
        pad_token_id=1,
        aux_loss_coeff=aux_loss_coeff,
        **moe_kwargs,
    )


def olmoe_tokenizer(
    path: str,
    tokenizer_config_path: Optional[str] = None,
    generation_config_path: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    prompt_template: Optional[_TemplateType] = None,
) -> OlmoeTokenizer:
    """OLMoE tokenizer from the checkpoint's ``tokenizer.json`` (see :class:`OlmoeTokenizer`).

    Args:
        path (str): ``tokenizer.json``.
        tokenizer_config_path (Optional[str]): ``tokenizer_config.json``.
        generation_config_path (Optional[str]): ``generation_config.json``.
        max_seq_len (Optional[int]): truncate tokenized samples to this length.
        prompt_template (Optional[_TemplateType]): a torchtune prompt template.
    """
    template = _get_prompt_template(prompt_template) if prompt_template is not None else None
    return OlmoeTokenizer(
        path,
        tokenizer_config_path=tokenizer_config_path,
        generation_config_path=generation_config_path,
        max_seq_len=max_seq_len,
        prompt_template=template,
    )
