"""OLMoE tokenizer: the checkpoint's GPT-NeoX style ``tokenizer.json`` through torchtune's Hugging Face tokenizer."""

from typing import Any, Mapping, Optional

from torchtune.data import Message, PromptTemplate, truncate
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer, ModelTokenizer

__all__ = ["OlmoeTokenizer"]


class _NoBosHuggingFaceTokenizer(HuggingFaceBaseTokenizer):
    """torchtune's ``HuggingFaceBaseTokenizer`` requires a BOS token; OLMo tokenizers have none (documents are
    separated by EOS only), so a missing BOS is allowed here (``bos_id`` None, nothing prepended)."""

    def _infer_bos_eos_tokens(self) -> None:
        self.bos_id = self.eos_id = None
        for source in (self.config or {}, self.generation_config or {}):
            for attr, key in (("bos_id", "bos_token"), ("eos_id", "eos_token")):
                token = source.get(key)
                if isinstance(token, dict):
                    token = token.get("content")
                if getattr(self, attr) is None and isinstance(token, str):
                    setattr(self, attr, self.tokenizer.token_to_id(token))
                token_id = source.get(f"{key}_id")
                if getattr(self, attr) is None and isinstance(token_id, int):
                    setattr(self, attr, token_id)
        if self.eos_id is None:
            raise ValueError("could not find the EOS token in tokenizer_config.json or generation_config.json")

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        return super().encode(text, add_bos=add_bos and self.bos_id is not None, add_eos=add_eos)


class OlmoeTokenizer(ModelTokenizer, Transform):
    """OLMoE's tokenizer (``tokenizer.json``, GPT-NeoX BPE with OLMo's special tokens) as a torchtune model
    tokenizer: messages are encoded one by one and concatenated (with a prompt template if given), then EOS.

    Args:
        path (str): the checkpoint's ``tokenizer.json``.
        tokenizer_config_path (Optional[str]): ``tokenizer_config.json`` (EOS, BOS, pad tokens).
        generation_config_path (Optional[str]): ``generation_config.json`` (fallback for the token ids).
        max_seq_len (Optional[int]): truncate tokenized samples to this length.
        prompt_template (Optional[PromptTemplate]): a torchtune prompt template.
    """

    def __init__(
        self,
        path: str,
        tokenizer_config_path: Optional[str] = None,
        generation_config_path: Optional[str] = None,
        max_seq_len: Optional[int] = None,
        prompt_template: Optional[PromptTemplate] = None,
    ):
        self._hf = _NoBosHuggingFaceTokenizer(
            path, tokenizer_config_json_path=tokenizer_config_path, generation_config_path=generation_config_path
        )
        self.max_seq_len = max_seq_len
        self.prompt_template = prompt_template
        pad = (self._hf.config or {}).get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        pad_id = self._hf.tokenizer.token_to_id(pad) if isinstance(pad, str) else None
        self.pad_id = pad_id if pad_id is not None else self.eos_id
        self.special_tokens = {t.content: i for i, t in self._hf.tokenizer.get_added_tokens_decoder().items() if t.special}
        self.stop_tokens = [self.eos_id]

    @property
    def bos_id(self) -> Optional[int]:
        return self._hf.bos_id

    @property
    def eos_id(self) -> int:
        return self._hf.eos_id

    @property
    def vocab_size(self) -> int:
        return self._hf.tokenizer.get_vocab_size()

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Text -> ids (BOS only if the tokenizer has one)."""
        return self._hf.encode(text, add_bos=add_bos, add_eos=add_eos)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text."""
        return self._hf.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def tokenize_messages(self, messages: list[Message], *, add_eos: bool = True) -> tuple[list[int], list[bool]]:
        """Messages -> (tokens, mask): BOS (if any), each message's text encoded as is, EOS; truncated to
        ``max_seq_len`` keeping the final EOS.

        (torchtune's ``tokenize_messages_no_special_tokens`` is not used: it strips trailing spaces for
        SentencePiece, which changes the text for a byte-level BPE tokenizer.)
        """
        templated = self.prompt_template(messages) if self.prompt_template is not None else messages
        tokens: list[int] = []
        mask: list[bool] = []
        if self.bos_id is not None and templated:
            tokens.append(self.bos_id)
            mask.append(templated[0].masked)
        for message in templated:
            ids: list[int] = []
            for item in message.content:
                if item["type"] != "text":
                    raise RuntimeError(f"Unsupported message content type: {item['type']}")
                ids += self.encode(item["content"], add_bos=False, add_eos=False)
            tokens += ids
            mask += [message.masked] * len(ids)
            if self.max_seq_len and len(tokens) >= self.max_seq_len:
                break
        if add_eos:
            tokens.append(self.eos_id)
            mask.append(mask[-1] if mask else True)
        if self.max_seq_len:
            tokens = truncate(tokens, self.max_seq_len, self.eos_id if add_eos else None)
            mask = truncate(mask, self.max_seq_len, True if add_eos else None)
        return tokens, mask

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        """Adds ``tokens`` and ``mask`` from ``sample["messages"]``."""
        messages = sample.pop("messages")
        tokens, mask = self.tokenize_messages(messages, add_eos=not inference)
        sample["tokens"] = tokens
        sample["mask"] = mask
        return sample
