"""Checkpointer for Hugging Face MoE checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): reads the Hub format
and writes it back, so a fine-tuned directory loads unchanged in transformers, vLLM or SGLang.

Written here rather than reused: torchtune's ``FullModelHFCheckpointer`` maps keys for torchtune's dense
families only (and keeps whole copies of the state dict while converting); MoE checkpoints need stacked experts
split into per-expert tensors, written one at a time.
"""

from pathlib import Path
from typing import Any, Optional, Union

import torch
from torchtune.utils import get_logger

from torchtune_moe.models._hf import (
    EXTRA_STATE_FILE,
    HFLayout,
    build_from_hf_config,
    copy_hf_side_files,
    detect_family,
    hf_layout,
    is_extra_state_key,
    load_hf_state_dict,
    read_hf_config,
    save_hf_state_dict,
)

log = get_logger("INFO")

__all__ = ["HFMoECheckpointer", "is_extra_state_key", "EXTRA_STATE_FILE"]


class HFMoECheckpointer:
    """Loads and saves a Hugging Face MoE checkpoint directory.

    Loading reads config.json, checks every tensor of the (sharded) safetensors files by name and shape against
    the model config.json describes (from the file headers, before reading data) and stops with a list of
    the missing, unexpected and mis-shaped tensors; the per-expert Hub tensors are stacked into the
    ``experts.gate_up_proj`` / ``experts.down_proj`` tensors of torchtune_moe (one full copy of the model, in
    the stored dtype).

    Saving writes the Hub format into ``save_dir``: ``model-0000i-of-0000n.safetensors`` shards of at most
    ``max_shard_size`` bytes with per-expert keys as published and ``model.safetensors.index.json``, streamed
    one tensor at a time (no second copy of the model), plus every non-weight file of ``checkpoint_dir``
    (config.json, tokenizer and generation files, license, ...). Router state the Hub format has no slot for
    (``expert_bias`` of aux-loss-free balancing, Expert Threshold ``thresholds``) goes to
    ``torchtune_moe_extra_state.safetensors`` beside it, with a warning; loading picks it back up.

    Args:
        checkpoint_dir (str): Hub model directory (config.json + safetensors), e.g. from
            ``huggingface-cli download Qwen/Qwen3-30B-A3B --local-dir ...``; or a directory this checkpointer
            saved (resuming).
        output_dir (str): the run's output directory (the recipe saves into ``{output_dir}/step_{N}``).
        max_shard_size (int): largest safetensors shard in bytes. Default 5 GB (as the Hub checkpoints).
        model_type (Optional[str]): expected config.json ``model_type`` (``mixtral``, ``qwen2_moe``,
            ``qwen3_moe``, ``olmoe``); checked at construction so a config pointed at another family's
            checkpoint stops at once. None: any supported family.

    Raises:
        ValueError: no config.json, an unsupported family or option, or ``model_type`` mismatch.
    """

    def __init__(
        self,
        checkpoint_dir: str,
        output_dir: str,
        max_shard_size: int = 5_000_000_000,
        model_type: Optional[str] = None,
    ) -> None:
        if checkpoint_dir is None:
            raise ValueError("checkpointer.checkpoint_dir is required: the Hugging Face model directory to fine-tune")
        if not isinstance(max_shard_size, int) or max_shard_size < 1:
            raise ValueError(f"checkpointer.max_shard_size must be a positive number of bytes, got {max_shard_size!r}")
        self.checkpoint_dir = Path(checkpoint_dir)
        self.output_dir = Path(output_dir)
        self.max_shard_size = max_shard_size
        self.config = read_hf_config(self.checkpoint_dir)
        self.family = detect_family(self.config)
        if model_type is not None and model_type != self.family.model_type:
            raise ValueError(
                f"checkpointer.model_type is {model_type!r} but {self.checkpoint_dir}/config.json is a "
                f"{self.family.model_type!r} checkpoint"
            )
        # Validates every config.json option now (before any training work) and gives the key layout.
        self._layout: HFLayout = hf_layout(build_from_hf_config(self.config, device="meta"), self.family)

    def load_checkpoint(self) -> dict[str, Any]:
        """``{"model": state_dict}`` in torchtune_moe key names (router state from the extra-state file
        included when present; check keys with :func:`is_extra_state_key` to tolerate its absence).

        Raises:
            ValueError: missing, unexpected or mis-shaped tensors, listed.
        """
        state_dict = load_hf_state_dict(self.checkpoint_dir, self._layout)
        log.info(
            f"Loaded {len(state_dict)} tensors of {self.family.model_type} from {self.checkpoint_dir} "
            f"({sum(t.numel() for t in state_dict.values()):,} values)"
        )
        return {"model": state_dict}

    def save_checkpoint(self, model_state_dict: dict[str, torch.Tensor], save_dir: Union[str, Path]) -> None:
        """Writes the Hub files into ``save_dir`` (existing and empty; the recipe renames it into place).

        Raises:
            ValueError: the state dict does not match config.json (missing, unexpected or mis-shaped keys).
        """
        save_dir = Path(save_dir)
        written = save_hf_state_dict(model_state_dict, self._layout, save_dir, self.max_shard_size)
        copied = copy_hf_side_files(self.checkpoint_dir, save_dir)
        shards = sum(name.endswith(".safetensors") and name.startswith("model-") for name in written)
        log.info(
            f"Saved {self.family.model_type} in Hugging Face format to {save_dir}: {shards} safetensors shards + "
            f"index, {', '.join(copied)}" + (f", {EXTRA_STATE_FILE}" if EXTRA_STATE_FILE in written else "")
        )
