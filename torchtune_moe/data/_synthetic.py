"""Small synthetic text tasks a tiny MoE model can learn on CPU in a few hundred steps.

Every example is a short prompt that starts with a task keyword (so experts have an
easy signal to specialise on) and ends with ``=``, followed by a short answer::

    copy dbe=      -> dbe
    rev dbe=       -> ebd
    sort dbe=      -> bde
    up dbe=        -> DBE
    add 3+5=       -> 8
    len dbe=       -> 3
    next 2,4,6=    -> 8

Examples are generated in memory from a seed (no files, no network) and served by
:class:`TaskDataset` with torchtune's :class:`~torchtune.data.InputOutputToMessages`
(prompt = user message, answer = assistant message), exactly as torchtune's ``SFTDataset``
serves file rows, so samples are ``{"tokens", "mask", "labels", ...}`` dicts that
torchtune's ``padded_collate_sft`` and ``PackedDataset`` handle unchanged.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, InputOutputToMessages, validate_messages
from torchtune.datasets import PackedDataset
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import ModelTokenizer

# Small alphabets and number ranges keep the tasks learnable by a ~1-3M parameter model.
LETTERS = "abcdefgh"
MIN_WORD_LEN, MAX_WORD_LEN = 2, 5
MAX_ADDEND = 9  # add: a + b with 0 <= a, b <= MAX_ADDEND
MAX_COUNT = 9  # len: words of 1..MAX_COUNT letters, answer is one digit


def _word(rng: random.Random, lo: int = MIN_WORD_LEN, hi: int = MAX_WORD_LEN) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _copy(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"copy {w}=", w


def _reverse(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"rev {w}=", w[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"sort {w}=", "".join(sorted(w))


def _upper(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"up {w}=", w.upper()


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, MAX_ADDEND), rng.randint(0, MAX_ADDEND)
    return f"add {a}+{b}=", str(a + b)


def _count(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 1, MAX_COUNT)
    return f"len {w}=", str(len(w))


def _next(rng: random.Random) -> tuple[str, str]:
    start, step = rng.randint(0, 9), rng.randint(1, 3)
    seq = [start + i * step for i in range(4)]
    return "next " + ",".join(map(str, seq[:3])) + "=", str(seq[3])


@dataclass(frozen=True)
class _Task:
    keyword: str
    description: str
    make: Callable[[random.Random], tuple[str, str]]


# Ordered easiest -> hardest (roughly); this order is also the cycling order of examples.
_TASKS: dict[str, _Task] = {
    "copy": _Task("copy", "repeat the word", _copy),
    "upper": _Task("up", "uppercase the word", _upper),
    "count": _Task("len", "number of letters (1-9)", _count),
    "add": _Task("add", "sum of two digits", _add),
    "next": _Task("next", "next term of an arithmetic sequence", _next),
    "reverse": _Task("rev", "reverse the word", _reverse),
    "sort": _Task("sort", "sort the letters", _sort),
}

#: Names accepted by ``tasks=`` arguments, in the order examples cycle through them.
TASK_NAMES: tuple[str, ...] = tuple(_TASKS)

_SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class TaskExample:
    """One synthetic example: ``prompt`` (ends with ``=``) and its expected ``answer``."""

    task: str
    prompt: str
    answer: str

    def is_correct(self, completion: str) -> bool:
        """True if a generated continuation of ``prompt`` equals ``answer`` (:func:`answer_matches`)."""
        return answer_matches(completion, self.answer)


def answer_matches(completion: str, expected: Any) -> bool:
    """True if a generated ``completion`` equals the ``expected`` answer, ignoring surrounding whitespace (the one
    rule the recipes' sample table and :meth:`TaskExample.is_correct` use)."""
    return completion.strip() == str(expected).strip()


def _check_tasks(tasks: str | Iterable[str] | None) -> list[str]:
    if tasks is None:
        return list(TASK_NAMES)
    names = [tasks] if isinstance(tasks, str) else [str(t) for t in tasks]
    if not names:
        raise ValueError(f"tasks must not be empty; allowed values: {list(TASK_NAMES)}")
    unknown = [t for t in names if t not in _TASKS]
    if unknown:
        raise ValueError(
            f"tasks: unknown task name(s) {unknown}; allowed values: {list(TASK_NAMES)}"
        )
    return names


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def generate_examples(
    num_samples: int,
    *,
    seed: int = 0,
    tasks: str | Iterable[str] | None = None,
    split: str = "train",
) -> list[TaskExample]:
    """Deterministically generate ``num_samples`` examples, cycling through ``tasks``.

    The same ``(seed, split)`` always gives the same examples; different splits use
    independent random streams.
    """
    _check_positive("num_samples", num_samples)
    names = _check_tasks(tasks)
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
    # A string seed is hashed with SHA-512 by ``random``: stable across runs/platforms.
    rng = random.Random(f"torchtune_moe.synthetic:{split}:{seed}")
    out = []
    for i in range(num_samples):
        name = names[i % len(names)]
        prompt, answer = _TASKS[name].make(rng)
        out.append(TaskExample(name, prompt, answer))
    return out


def sample_prompts(
    n: int = len(TASK_NAMES),
    *,
    seed: int = 1234,
    tasks: str | Iterable[str] | None = None,
) -> list[TaskExample]:
    """Prompts + expected answers for printing a few completions after training.

    Cycles through ``tasks`` (all by default), so ``n >= len(tasks)`` shows each task.
    To reproduce the training-time prefix, encode a prompt as
    ``tokenizer.encode(ex.prompt, add_bos=True, add_eos=False)`` and generate until
    ``tokenizer.eos_id``; the decoded continuation should equal ``ex.answer``.
    """
    _check_positive("n", n)
    return generate_examples(n, seed=seed, tasks=tasks, split="test")


class TaskDataset(torch.utils.data.Dataset):
    """Map-style SFT dataset over in-memory rows, producing what torchtune's ``SFTDataset`` produces: the
    message transform turns a row into messages, the model transform (the tokenizer) into ``tokens``/``mask``,
    and ``labels`` are the tokens with ``CROSS_ENTROPY_IGNORE_IDX`` where masked.

    Written here rather than reused: ``SFTDataset`` only reads through ``datasets.load_dataset`` (a hub name or
    files), and our rows are generated in memory.

    Args:
        rows (Sequence[dict]): the raw rows (kept, public: ``rows``).
        message_transform (Transform): row -> ``{"messages": [...]}``.
        model_transform (Transform): the tokenizer.
    """

    def __init__(self, rows: Sequence[dict[str, Any]], *, message_transform: Transform, model_transform: Transform):
        self.rows = list(rows)
        self._message_transform = message_transform
        self._model_transform = model_transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self._message_transform(self.rows[index])
        validate_messages(sample["messages"])
        out = self._model_transform(sample)
        out["labels"] = [CROSS_ENTROPY_IGNORE_IDX if m else t for t, m in zip(out["tokens"], out["mask"])]
        return out


def synthetic_tasks(
    tokenizer: ModelTokenizer,
    *,
    num_samples: int = 10_000,
    seed: int = 0,
    tasks: str | Iterable[str] | None = None,
    train_on_input: bool = False,
    packed: bool = False,
    split: str = "train",
) -> TaskDataset | PackedDataset:
    """Config builder: ``_component_: torchtune_moe.data.synthetic_tasks``.

    Args:
        tokenizer (ModelTokenizer): any torchtune model tokenizer (e.g. ``char_tokenizer``).
        num_samples (int): number of examples (>= 1). Default 10_000.
        seed (int): generation seed; same seed and split give the same data. Default 0.
        tasks (str | Iterable[str] | None): subset of :data:`TASK_NAMES`; None = all.
        train_on_input (bool): also compute loss on the prompt. Default False.
        packed (bool): pack with torchtune's ``PackedDataset`` to
            ``tokenizer.max_seq_len`` (must be set). Default False.
        split (str): ``"train"``, ``"validation"`` or ``"test"`` (independent streams).

    Returns:
        TaskDataset | PackedDataset: samples are dicts with ``tokens``, ``mask`` and
        ``labels`` (``PackedDataset``: ``tokens``, ``labels``, ``input_pos``,
        ``seq_lens``). Use :func:`generate_examples` with the same arguments to see
        the underlying ``TaskExample`` of each index.

    Raises:
        ValueError: unknown task name, ``num_samples < 1``, unknown ``split``, or
            ``packed=True`` without ``tokenizer.max_seq_len``.
    """
    examples = generate_examples(num_samples, seed=seed, tasks=tasks, split=split)
    if packed and getattr(tokenizer, "max_seq_len", None) is None:
        raise ValueError("packed=True requires the tokenizer's max_seq_len to be set")
    rows = [{"task": e.task, "input": e.prompt, "output": e.answer} for e in examples]
    ds = TaskDataset(
        rows,
        message_transform=InputOutputToMessages(train_on_input=train_on_input),
        model_transform=tokenizer,
    )
    if packed:
        return PackedDataset(ds, max_seq_len=tokenizer.max_seq_len)
    return ds
