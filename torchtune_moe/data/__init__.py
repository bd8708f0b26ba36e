"""Data for torchtune-moe: a character tokenizer and synthetic tasks that need no download."""

from torchtune_moe.data._synthetic import (
    TASK_NAMES,
    TaskExample,
    generate_examples,
    sample_prompts,
    synthetic_tasks,
)
from torchtune_moe.data._tokenizer import CharTokenizer, char_tokenizer

__all__ = [
    "CharTokenizer",
    "TASK_NAMES",
    "TaskExample",
    "char_tokenizer",
    "generate_examples",
    "sample_prompts",
    "synthetic_tasks",
]
