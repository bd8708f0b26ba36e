"""torchtune's ``TransformerDecoder`` with a check of its input tokens and an output that can be left to the loss."""

from typing import Union

import torch
from torchtune.modules import TransformerDecoder

__all__ = ["MoETransformerDecoder"]


class MoETransformerDecoder(TransformerDecoder):
    """torchtune's ``TransformerDecoder`` whose ``forward`` refuses misuse with a ValueError naming the shape or
    the range, instead of an index error deep inside the embedding (or a device-side assert on GPU):

    - ``tokens`` must be ``[batch, seq_len]`` integer token ids, with ``seq_len >= 1`` and ``batch >= 1``;
    - every id must lie in ``[0, vocab_size)``.

    The shape checks are free. The id range needs the values: on the CPU it is checked on every call (no device
    sync there); on an accelerator reading ``min``/``max`` back would stall the host every step, so it is
    checked on the first call only (one sync, which catches a tokenizer / vocab mismatch before training) —
    set ``check_token_ids = True`` to check every call.

    ``skip_output_layer = True`` (set by :meth:`~torchtune_moe.modules.LinearCrossEntropyLoss.set_model_output`)
    makes ``forward`` return the final normed hidden states ``[B, S, D]`` instead of logits: the loss applies the
    output projection itself, as in later torchtune releases. Everything else is torchtune's ``TransformerDecoder``.
    """

    #: Check the id range of every forward on accelerators too (costs one host sync per call).
    check_token_ids: bool = False
    #: Return the normed hidden states, not logits (the loss owns the output projection).
    skip_output_layer: bool = False

    def forward(self, tokens: torch.Tensor, **kwargs) -> Union[torch.Tensor, list[torch.Tensor]]:
        """
        Args:
            tokens (torch.Tensor): [B, S] token ids.
            **kwargs: ``mask``, ``input_pos``, ... of torchtune's ``TransformerDecoder.forward``.

        Returns:
            torch.Tensor: [B, S, vocab_size] logits (a list with chunked output, as torchtune's), or [B, S, D]
            normed hidden states with ``skip_output_layer``.

        Raises:
            ValueError: tokens of the wrong rank or dtype, an empty batch or sequence, or ids out of range.
        """
        self._check_tokens(tokens)
        return super().forward(tokens, **kwargs)

    def unembed(self, h: torch.Tensor) -> Union[torch.Tensor, list[torch.Tensor]]:
        """The final norm, then the output projection unless ``skip_output_layer`` is set."""
        if self.skip_output_layer:
            return self.norm(h)
        return super().unembed(h)

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            shape = list(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be a [batch, seq_len] tensor of token ids, got shape {shape}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must hold integer token ids, got dtype {tokens.dtype}")
        if tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise ValueError(f"tokens is empty: shape {list(tokens.shape)} (batch and seq_len must be >= 1)")
        if tokens.is_meta or torch.compiler.is_compiling():
            return  # no values to read (meta / fake tensors while tracing)
        if tokens.device.type == "cpu" or self.check_token_ids or not getattr(self, "_ids_checked", False):
            vocab_size = self.tok_embeddings.num_embeddings
            low, high = int(tokens.min()), int(tokens.max())
            self._ids_checked = True
            if low < 0 or high >= vocab_size:
                raise ValueError(
                    f"token ids must be in [0, {vocab_size}) (the model's vocab_size), got ids from {low} to {high}"
                )

    # Keep torchtune's type name in reprs and messages: this is a TransformerDecoder with a guard.
    def _get_name(self) -> str:
        return "TransformerDecoder"

