"""A tiny character-level tokenizer that satisfies torchtune's ``ModelTokenizer`` protocol.

It needs no tokenizer file, so a model can be trained from scratch with no download.
Message tokenization follows torchtune's ``tokenize_messages_no_special_tokens`` (BOS at
the start of each turn, EOS after each assistant message, per-token masks,
``max_seq_len`` truncation with :func:`torchtune.data.truncate`), like the
Llama2/Mistral/Gemma tokenizers.
"""

from __future__ import annotations

from typing import Any, Mapping

from torchtune.data import Message, PromptTemplateInterface, truncate
from torchtune.data._prompt_templates import _get_prompt_template, _TemplateType
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import BaseTokenizer, ModelTokenizer

# Special tokens come first so that ``pad_id == 0``, the default ``padding_idx`` of
# torchtune's ``padded_collate_sft`` and ``PackedDataset``.
PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
SPECIAL_TOKENS: dict[str, int] = {PAD: 0, BOS: 1, EOS: 2, UNK: 3}
# Newline, tab and the 95 printable ASCII characters (space .. '~').
CHARACTERS: str = "\n\t" + "".join(chr(c) for c in range(32, 127))

# Shown in place of characters the vocabulary does not have.
_UNK_TEXT = "\ufffd"


class CharTokenizer(ModelTokenizer, BaseTokenizer, Transform):
    """Character-level tokenizer: 4 special tokens + ``\\n``, ``\\t`` and printable ASCII.

    ``vocab_size`` is 101. Characters outside the vocabulary encode to ``<|unk|>``.
    Because every character is one token, ``encode(a) + encode(b) == encode(a + b)``
    (without BOS/EOS), so no whitespace trimming is ever needed.

    Args:
        max_seq_len (int | None): if set, :meth:`tokenize_messages` truncates to this
            many tokens (keeping EOS last, like torchtune's tokenizers). It is also the
            length ``PackedDataset`` packs to. Default None (no truncation).
        prompt_template (PromptTemplateInterface | None): optional torchtune prompt template
            applied to messages before tokenization. Default None.

    Example:
        >>> tok = CharTokenizer()
        >>> tok.decode(tok.encode("rev abc="))
        'rev abc='
    """

    def __init__(
        self,
        max_seq_len: int | None = None,
        prompt_template: PromptTemplateInterface | None = None,
    ) -> None:
        if max_seq_len is not None and max_seq_len < 2:
            raise ValueError(f"max_seq_len must be None or >= 2, got {max_seq_len}")
        self.max_seq_len = max_seq_len
        self.prompt_template = prompt_template
        self.special_tokens: dict[str, int] = dict(SPECIAL_TOKENS)
        offset = len(self.special_tokens)
        self._char_to_id: dict[str, int] = {c: i + offset for i, c in enumerate(CHARACTERS)}
        self._id_to_text: list[str] = list(self.special_tokens) + list(CHARACTERS)
        self._id_to_text[self.unk_id] = _UNK_TEXT
        self.stop_tokens: list[int] = [self.eos_id]

    @property
    def pad_id(self) -> int:
        return self.special_tokens[PAD]

    @property
    def bos_id(self) -> int:
        return self.special_tokens[BOS]

    @property
    def eos_id(self) -> int:
        return self.special_tokens[EOS]

    @property
    def unk_id(self) -> int:
        return self.special_tokens[UNK]

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_text)

    def encode(
        self,
        text: str,
        add_bos: bool = True,
        add_eos: bool = True,
        trim_leading_whitespace: bool = False,
    ) -> list[int]:
        """Encode ``text`` one token per character.

        ``trim_leading_whitespace`` is accepted for compatibility with torchtune's
        ``tokenize_messages_no_special_tokens`` and ignored: that flag exists to undo
        SentencePiece's implicit leading space, which a character vocabulary never adds.
        """
        unk = self.unk_id
        ids = [self._char_to_id.get(c, unk) for c in text]
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Decode ids to text. pad/bos/eos are dropped if ``skip_special_tokens``,
        otherwise written as ``<|pad|>`` etc.; ``<|unk|>`` always decodes to U+FFFD."""
        out = []
        skip = {self.pad_id, self.bos_id, self.eos_id}
        n = self.vocab_size
        for i in token_ids:
            i = int(i)
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {n})")
            if i in skip:
                if not skip_special_tokens:
                    out.append(self._special_name(i))
                continue
            out.append(self._id_to_text[i])
        return "".join(out)

    def _special_name(self, token_id: int) -> str:
        for name, i in self.special_tokens.items():
            if i == token_id:
                return name
        raise KeyError(token_id)

    def tokenize_messages(
        self,
        messages: list[Message],
        *,
        add_start_tokens: bool = True,
        add_end_tokens: bool = True,
    ) -> tuple[list[int], list[bool]]:
        """Tokenize messages into ``(tokens, mask)``; ``mask[i]`` is True where token
        ``i`` belongs to a ``masked`` message (not trained on).

        Same semantics as torchtune's ``tokenize_messages_no_special_tokens`` (used by
        the Llama2/Mistral/Gemma tokenizers): BOS before each turn if
        ``add_start_tokens``, EOS after each assistant message if ``add_end_tokens``
        (pass False for inference prompts), BOS/EOS masked like their message, and
        truncation to ``max_seq_len`` with :func:`torchtune.data.truncate` (EOS kept
        last). That helper itself is not called because it ``rstrip(" ")``-s every
        text item, relying on SentencePiece to re-add the space as a word prefix;
        with one token per character the space would be lost (e.g. a prompt template
        ``"Q: "`` would become ``"Q:"``).
        """
        if self.prompt_template is not None:
            messages = self.prompt_template(messages)
        bos_id = self.bos_id if add_start_tokens else None
        eos_id = self.eos_id if add_end_tokens else None
        tokens: list[int] = []
        mask: list[bool] = []
        start_of_turn = True
        last_masked = False
        for message in messages:
            last_masked = message.masked
            if start_of_turn and bos_id is not None:
                tokens.append(bos_id)
                mask.append(message.masked)
            for item in message.content:
                if item["type"] != "text":
                    raise RuntimeError(f"Unsupported message content type: {item['type']}")
                ids = self.encode(item["content"], add_bos=False, add_eos=False)
                tokens.extend(ids)
                mask.extend([message.masked] * len(ids))
            # An assistant message ends the turn.
            start_of_turn = message.role == "assistant"
            if start_of_turn and eos_id is not None:
                tokens.append(eos_id)
                mask.append(message.masked)
            if self.max_seq_len is not None and len(tokens) >= self.max_seq_len:
                break
        if self.max_seq_len is not None and tokens:
            tokens = truncate(tokens, self.max_seq_len, eos_id)
            mask = truncate(mask, self.max_seq_len, last_masked if eos_id is not None else None)
        return tokens, mask

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        """Model transform for ``SFTDataset``: ``"messages"`` -> ``"tokens"``, ``"mask"``."""
        messages = sample.pop("messages")
        tokens, mask = self.tokenize_messages(messages, add_end_tokens=not inference)
        sample["tokens"] = tokens
        sample["mask"] = mask
        return sample


def char_tokenizer(
    max_seq_len: int | None = None,
    prompt_template: _TemplateType | None = None,
) -> CharTokenizer:
    """Config builder: ``_component_: torchtune_moe.data.char_tokenizer``.

    ``prompt_template`` is resolved like torchtune's tokenizer builders do: a dotpath
    string of a template class or a ``{role: (prepend, append)}`` dict.
    """
    template = _get_prompt_template(prompt_template) if prompt_template is not None else None
    return CharTokenizer(max_seq_len=max_seq_len, prompt_template=template)
