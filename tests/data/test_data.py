"""Tests for torchtune_moe.data: CharTokenizer and the synthetic tasks dataset."""

from __future__ import annotations

import re

import pytest
import torch
from omegaconf import OmegaConf

from torchtune import config
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, Message, padded_collate_sft
from torchtune.datasets import PackedDataset
from torchtune.modules.transforms.tokenizers import tokenize_messages_no_special_tokens

from torchtune_moe.data import (
    TASK_NAMES,
    CharTokenizer,
    TaskDataset,
    TaskExample,
    char_tokenizer,
    generate_examples,
    sample_prompts,
    synthetic_tasks,
)


@pytest.fixture
def tok() -> CharTokenizer:
    return CharTokenizer()


def _messages(user: str, answer: str, masked: bool = True) -> list[Message]:
    return [
        Message(role="user", content=user, masked=masked),
        Message(role="assistant", content=answer, masked=False),
    ]


# ----------------------------------------------------------------------------- tokenizer


def test_vocab_and_special_ids(tok: CharTokenizer) -> None:
    assert tok.vocab_size <= 128
    assert tok.vocab_size == 101
    ids = {tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id}
    assert len(ids) == 4 and max(ids) < tok.vocab_size
    assert tok.pad_id == 0  # default padding_idx of padded_collate_sft / PackedDataset
    assert tok.special_tokens["<|eos|>"] == tok.eos_id
    assert tok.stop_tokens == [tok.eos_id]
    assert tok.max_seq_len is None


def test_round_trip_all_characters(tok: CharTokenizer) -> None:
    text = "".join(chr(c) for c in range(32, 127)) + "\n\tHello, world!\n"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert len(ids) == len(text) + 2
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    # no BOS/EOS when asked
    assert tok.encode("ab", add_bos=False, add_eos=False) == tok.encode("ab")[1:-1]


def test_encode_is_additive_and_ids_distinct(tok: CharTokenizer) -> None:
    a, b = "rev abc=", "cba"
    kw = dict(add_bos=False, add_eos=False)
    assert tok.encode(a, **kw) + tok.encode(b, **kw) == tok.encode(a + b, **kw)
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    ids = [tok.encode(c, **kw)[0] for c in chars]
    assert len(set(ids)) == len(chars)


def test_decode_special_and_unknown(tok: CharTokenizer) -> None:
    ids = tok.encode("hé")  # 'é' is not in the vocabulary
    assert ids[2] == tok.unk_id
    assert tok.decode(ids) == "h\ufffd"
    assert tok.decode(ids + [tok.pad_id], skip_special_tokens=False) == (
        "<|bos|>h\ufffd<|eos|><|pad|>"
    )
    # tensors of ids decode too
    assert tok.decode(torch.tensor(tok.encode("xy"))) == "xy"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_tokenize_messages_masks_prompt(tok: CharTokenizer) -> None:
    tokens, mask = tok.tokenize_messages(_messages("add 1+2=", "3"))
    assert tokens == tok.encode("add 1+2=3")  # BOS + chars + EOS
    # BOS and the 8 prompt chars are masked; answer and EOS are trained on
    assert mask == [True] * 9 + [False, False]


def test_tokenize_messages_train_on_input(tok: CharTokenizer) -> None:
    tokens, mask = tok.tokenize_messages(_messages("add 1+2=", "3", masked=False))
    assert tokens == tok.encode("add 1+2=3")
    assert not any(mask)


def test_tokenize_messages_no_end_tokens(tok: CharTokenizer) -> None:
    tokens, mask = tok.tokenize_messages(_messages("up ab=", "AB"), add_end_tokens=False)
    assert tokens == tok.encode("up ab=AB", add_eos=False)
    assert tok.eos_id not in tokens
    assert len(mask) == len(tokens)
    # a prompt-only inference input is exactly BOS + prompt characters
    prompt_only = [Message(role="user", content="up ab=")]
    tokens, _ = tok.tokenize_messages(prompt_only, add_end_tokens=False)
    assert tokens == tok.encode("up ab=", add_eos=False)


def test_tokenize_messages_multi_turn(tok: CharTokenizer) -> None:
    msgs = _messages("copy ab=", "ab") + _messages("rev ab=", "ba")
    tokens, mask = tok.tokenize_messages(msgs)
    # every turn starts with BOS and every assistant message ends with EOS
    assert tokens == tok.encode("copy ab=ab") + tok.encode("rev ab=ba")
    assert mask.count(False) == 2 * 3  # two answers of 2 chars + EOS each


def test_tokenize_messages_truncates_to_max_seq_len() -> None:
    tok = char_tokenizer(max_seq_len=8)
    tokens, mask = tok.tokenize_messages(_messages("copy abcdef=", "abcdef"))
    assert len(tokens) == len(mask) == 8
    assert tokens[-1] == tok.eos_id  # torchtune's truncate keeps EOS last
    assert tok.decode(tokens) == "copy a"  # BOS + 6 chars + EOS
    # inference (no end tokens): plain cut, no EOS
    tokens, mask = tok.tokenize_messages(_messages("copy abcdef=", "abcdef"), add_end_tokens=False)
    assert tok.decode(tokens) == "copy ab" and len(mask) == 8


@pytest.mark.parametrize("max_seq_len", [None, 5, 9, 12, 40])
@pytest.mark.parametrize("add_end_tokens", [True, False])
def test_tokenize_messages_matches_torchtune(max_seq_len: int | None, add_end_tokens: bool) -> None:
    """Same tokens and mask as torchtune's helper (for text without trailing spaces)."""
    tok = CharTokenizer(max_seq_len=max_seq_len)
    msgs = [
        Message(role="system", content="be brief", masked=True),
        *_messages("copy abc=", "abc"),
        *_messages("rev ab=", "ba", masked=False),
    ]
    expected = tokenize_messages_no_special_tokens(
        tok, msgs, bos_id=tok.bos_id, eos_id=tok.eos_id if add_end_tokens else None
    )
    assert tok.tokenize_messages(msgs, add_end_tokens=add_end_tokens) == expected


def test_tokenize_messages_keeps_trailing_spaces(tok: CharTokenizer) -> None:
    tokens, _ = tok.tokenize_messages(_messages("say hi ", "hi "))
    assert tok.decode(tokens) == "say hi hi "


def test_call_is_a_model_transform(tok: CharTokenizer) -> None:
    out = tok({"messages": _messages("len abc=", "3"), "other": 1})
    assert "messages" not in out and out["other"] == 1
    assert out["tokens"] == tok.encode("len abc=3")
    out = tok({"messages": _messages("len abc=", "3")}, inference=True)
    assert out["tokens"][-1] != tok.eos_id


def test_char_tokenizer_builder_and_template() -> None:
    tok = char_tokenizer(max_seq_len=64, prompt_template={"user": ("Q: ", "\n")})
    assert tok.max_seq_len == 64
    tokens, mask = tok.tokenize_messages(_messages("add 1+1=", "2"))
    assert tok.decode(tokens) == "Q: add 1+1=\n2"
    assert mask.count(False) == 2
    with pytest.raises(ValueError, match="max_seq_len"):
        char_tokenizer(max_seq_len=1)


# ----------------------------------------------------------------------------- tasks


def _expected(prompt: str) -> str:
    """Independently recompute the answer of a prompt."""
    keyword, arg = prompt.rstrip("=").split(" ", 1)
    if keyword == "copy":
        return arg
    if keyword == "rev":
        return "".join(reversed(arg))
    if keyword == "sort":
        return "".join(sorted(arg))
    if keyword == "up":
        return arg.upper()
    if keyword == "len":
        return str(len(arg))
    if keyword == "add":
        a, b = arg.split("+")
        return str(int(a) + int(b))
    if keyword == "next":
        xs = [int(x) for x in arg.split(",")]
        assert xs[2] - xs[1] == xs[1] - xs[0]
        return str(xs[2] + (xs[2] - xs[1]))
    raise AssertionError(f"unknown keyword in {prompt!r}")


def test_every_task_answers_are_correct() -> None:
    examples = generate_examples(700, seed=3)
    seen = {e.task for e in examples}
    assert seen == set(TASK_NAMES)
    for e in examples:
        assert re.fullmatch(r"[a-z]+ [a-h0-9+,]+=", e.prompt), e
        assert e.answer == _expected(e.prompt), e
        assert 1 <= len(e.answer) <= 5


def test_known_examples_per_task() -> None:
    # hand-checked: each task with a specific prompt/answer pair
    by_task = {e.task: e for e in generate_examples(len(TASK_NAMES), seed=0)}
    for task, e in by_task.items():
        assert e.answer == _expected(e.prompt)
    assert by_task["reverse"].prompt.startswith("rev ")
    assert by_task["upper"].answer == by_task["upper"].prompt[3:-1].upper()
    assert sorted(by_task["sort"].answer) == list(by_task["sort"].answer)


def test_tasks_cycle_and_subset() -> None:
    ex = generate_examples(2 * len(TASK_NAMES), seed=0)
    assert [e.task for e in ex] == list(TASK_NAMES) * 2
    ex = generate_examples(10, tasks=["add", "sort"])
    assert [e.task for e in ex] == ["add", "sort"] * 5
    assert {e.task for e in generate_examples(5, tasks="copy")} == {"copy"}


def test_generation_is_deterministic() -> None:
    a = generate_examples(50, seed=11)
    assert a == generate_examples(50, seed=11)
    assert a != generate_examples(50, seed=12)
    assert a != generate_examples(50, seed=11, split="test")


def test_sample_prompts() -> None:
    ps = sample_prompts(len(TASK_NAMES), seed=5)
    assert [p.task for p in ps] == list(TASK_NAMES)
    assert ps == sample_prompts(len(TASK_NAMES), seed=5)
    for p in ps:
        assert isinstance(p, TaskExample)
        assert p.prompt.endswith("=") and p.answer == _expected(p.prompt)
        assert p.is_correct(p.answer) and p.is_correct(f" {p.answer}\n")
        assert not p.is_correct(p.answer + "x")
    assert [p.task for p in sample_prompts(3, tasks=["add"])] == ["add"] * 3


# ----------------------------------------------------------------------------- dataset


def test_dataset_samples_tokens_and_labels(tok: CharTokenizer) -> None:
    ds = synthetic_tasks(tok, num_samples=40, seed=1)
    assert isinstance(ds, TaskDataset) and len(ds) == 40
    examples = generate_examples(40, seed=1)
    for i in range(len(ds)):
        s = ds[i]
        assert s["tokens"] == tok.encode(examples[i].prompt + examples[i].answer)
        labels = [int(x) for x in s["labels"]]
        assert len(labels) == len(s["tokens"]) == len(s["mask"])
        for t, m, lab in zip(s["tokens"], s["mask"], labels):
            assert lab == (CROSS_ENTROPY_IGNORE_IDX if m else t)
        # exactly the answer + EOS is trained on
        trained = [t for t, lab in zip(s["tokens"], labels) if lab != CROSS_ENTROPY_IGNORE_IDX]
        assert trained == tok.encode(examples[i].answer, add_bos=False)
        assert max(s["tokens"]) < tok.vocab_size and tok.unk_id not in s["tokens"]


def test_dataset_train_on_input(tok: CharTokenizer) -> None:
    s = synthetic_tasks(tok, num_samples=3, train_on_input=True)[0]
    assert [int(x) for x in s["labels"]] == s["tokens"]


def test_dataset_is_deterministic(tok: CharTokenizer) -> None:
    a = synthetic_tasks(tok, num_samples=30, seed=7)
    b = synthetic_tasks(tok, num_samples=30, seed=7)
    c = synthetic_tasks(tok, num_samples=30, seed=8)
    ta = [a[i]["tokens"] for i in range(30)]
    assert ta == [b[i]["tokens"] for i in range(30)]
    assert ta != [c[i]["tokens"] for i in range(30)]


def test_padded_collate_sft_batch(tok: CharTokenizer) -> None:
    ds = synthetic_tasks(tok, num_samples=16)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=padded_collate_sft)
    batch = next(iter(loader))
    lengths = [len(ds[i]["tokens"]) for i in range(8)]
    assert batch["tokens"].shape == batch["labels"].shape == (8, max(lengths))
    assert batch["tokens"].dtype == torch.long
    for row, n in enumerate(lengths):
        assert batch["tokens"][row, n:].eq(tok.pad_id).all()
        assert batch["labels"][row, n:].eq(CROSS_ENTROPY_IGNORE_IDX).all()
        assert batch["tokens"][row, :n].tolist() == ds[row]["tokens"]


def test_packed_dataset() -> None:
    tok = char_tokenizer(max_seq_len=128)
    ds = synthetic_tasks(tok, num_samples=200, packed=True)
    assert isinstance(ds, PackedDataset)
    pack = ds[0]
    assert pack["tokens"].shape == pack["labels"].shape == (128,)
    assert int(pack["seq_lens"].sum()) == 128
    assert (pack["labels"] != CROSS_ENTROPY_IGNORE_IDX).any()
    with pytest.raises(ValueError, match="max_seq_len"):
        synthetic_tasks(CharTokenizer(), num_samples=10, packed=True)


def test_config_instantiation() -> None:
    cfg = OmegaConf.create(
        {
            "tokenizer": {"_component_": "torchtune_moe.data.char_tokenizer", "max_seq_len": 64},
            "dataset": {
                "_component_": "torchtune_moe.data.synthetic_tasks",
                "num_samples": 12,
                "tasks": ["add", "reverse"],
            },
        }
    )
    tok = config.instantiate(cfg.tokenizer)
    ds = config.instantiate(cfg.dataset, tokenizer=tok)
    assert isinstance(tok, CharTokenizer) and tok.max_seq_len == 64
    assert len(ds) == 12
    assert tok.decode(ds[0]["tokens"]).startswith("add ")
    assert tok.decode(ds[1]["tokens"]).startswith("rev ")


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"tasks": ["add", "divide"]}, "tasks"),
        ({"tasks": []}, "tasks"),
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": -5}, "num_samples"),
        ({"split": "dev"}, "split"),
    ],
)
def test_bad_arguments_raise(tok: CharTokenizer, kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument) as err:
        synthetic_tasks(tok, **kwargs)
    if argument == "tasks":
        assert all(name in str(err.value) for name in TASK_NAMES)  # lists allowed values
    if argument == "tasks" and kwargs["tasks"]:
        assert "divide" in str(err.value)


def test_sample_prompts_bad_n() -> None:
    with pytest.raises(ValueError, match="n must be"):
        sample_prompts(0)
    with pytest.raises(ValueError, match="tasks"):
        sample_prompts(3, tasks=["nope"])
