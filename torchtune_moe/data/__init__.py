"""Data for torchtune-moe: a character tokenizer, synthetic tasks that need no download, and the data adapters
the recipes share (dataset building with named errors, raw columns, routing-replay collation)."""

from torchtune_moe.data._adapters import (
    RawColumn,
    RowErrors,
    build_dataset,
    check_dataset,
    collate_with_routing,
    load_raw_rows,
)
from torchtune_moe.data._synthetic import (
    TASK_NAMES,
    TaskDataset,
    TaskExample,
    answer_matches,
    generate_examples,
    sample_prompts,
    synthetic_tasks,
)
from torchtune_moe.data._tokenizer import CharTokenizer, char_tokenizer

__all__ = [
    "CharTokenizer",
    "TASK_NAMES",
    "TaskDataset",
    "TaskExample",
    "answer_matches",
    "char_tokenizer",
    "generate_examples",
    "sample_prompts",
    "synthetic_tasks",
    "RawColumn",
    "RowErrors",
    "build_dataset",
    "check_dataset",
    "collate_with_routing",
    "load_raw_rows",
]
