"""Data adapters of the MoE recipes: build a configured dataset with errors that name the file, the row and the
column; read the raw rows behind a torchtune dataset; carry a raw column (routing replay) into each sample and
collate it.

torchtune's ``SFTDataset`` keeps its rows private and its transforms keep only ``tokens``/``mask``/``labels``;
the raw rows are read here with ``datasets.load_dataset`` and the same arguments the builder passes to it (the
Arrow cache makes that second read cheap).
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune.config._utils import _get_component_from_path

from torchtune_moe.modules import RoutingRecord

__all__ = [
    "build_dataset",
    "check_dataset",
    "collate_with_routing",
    "load_raw_rows",
    "RawColumn",
    "RowErrors",
]


def _describe_source(node: dict) -> str:
    files = node.get("data_files")
    if files is not None:
        return f"data_files {files!r}"
    return f"source {node.get('source')!r}" if "source" in node else f"'{node.get('_component_')}'"


def build_dataset(key: str, cfg_dataset: DictConfig, tokenizer: Any) -> Any:
    """Instantiates the dataset config ``cfg_dataset`` with ``tokenizer``; any failure (a missing, empty or
    malformed data file, a bad argument) raises ValueError naming ``key`` and the data file or source.

    Raises:
        ValueError: naming the key, the file or source, and the cause.
    """
    from torchtune import config  # local: torchtune.config imports the whole torchtune package

    node = OmegaConf.to_container(cfg_dataset, resolve=True)
    try:
        return config.instantiate(cfg_dataset, tokenizer)
    except Exception as e:  # datasets raises many types (StopIteration for an empty JSON file, ...)
        cause = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if type(e).__name__ == "DatasetGenerationError" and e.__cause__ is not None:
            cause += f" ({type(e.__cause__).__name__}: {e.__cause__})"
        hint = " (is the file empty?)" if isinstance(e, StopIteration) else ""
        raise ValueError(f"{key}: cannot build the dataset from {_describe_source(node)}{hint}: {cause}") from e


def load_raw_rows(cfg_dataset: DictConfig) -> Optional[Any]:
    """The rows (a ``datasets.Dataset``) that a ``load_dataset``-backed torchtune dataset builder reads
    (``source`` + ``split`` + the builder's extra ``load_dataset`` keyword arguments), or None when the builder
    does not read through ``load_dataset`` or filters the rows (``filter_fn``: indices would not line up)."""
    from datasets import load_dataset

    node = OmegaConf.to_container(cfg_dataset, resolve=True)
    builder = _get_component_from_path(node["_component_"])
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return None
    if "source" not in params or node.get("filter_fn") is not None:
        return None
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    named = {n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    source = node.get("source", params["source"].default)
    if source is inspect.Parameter.empty:
        return None
    split = node.get("split", params["split"].default if "split" in params else "train")
    kwargs = {k: v for k, v in node.items() if k != "_component_" and k not in named}
    return load_dataset(source, split=split, **kwargs)


def check_dataset(key: str, ds: Any, rows: Optional[Any] = None) -> None:
    """Transforms sample 0 of ``ds`` now, so a missing column stops setup (with the columns found); with the raw
    ``rows``, also every first row holding a null in some column, so a null the transform cannot take stops
    setup naming the row and the column.

    Raises:
        ValueError: naming ``key``, the row, and the columns.
    """
    if len(ds) == 0:
        raise ValueError(f"{key}: the dataset has no samples")
    columns = list(rows.column_names) if rows is not None else None
    try:
        ds[0]
    except KeyError as e:
        found = f"; columns found: {columns}" if columns is not None else ""
        raise ValueError(
            f"{key}: row 0 has no column {e} the dataset's transform reads{found} (map columns with the builder's "
            f"column_map, e.g. dataset.column_map.input=question)"
        ) from e
    except Exception as e:
        raise ValueError(f"{key}: row 0 cannot be turned into a sample: {type(e).__name__}: {e}") from e
    if rows is None or len(rows) != len(ds):
        return
    import pyarrow.compute as pc

    for column in rows.column_names:
        nulls = pc.is_null(rows.data.column(column))
        if not pc.any(nulls).as_py():
            continue
        row = pc.index(nulls, True).as_py()
        try:
            ds[row]
        except Exception as e:
            raise ValueError(
                f"{key}: row {row} has a null '{column}' ({type(e).__name__}: {e}); fix or drop that row"
            ) from e


class RowErrors(torch.utils.data.Dataset):
    """Wraps a map-style dataset so that a sample that fails to load (a null or malformed field found during
    training) raises ValueError naming the dataset key and the row index."""

    def __init__(self, ds: Any, key: str = "dataset"):
        self.ds, self.key = ds, key

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, idx: int) -> dict:
        try:
            return self.ds[idx]
        except Exception as e:
            raise ValueError(f"{self.key}: row {idx} cannot be turned into a sample: {type(e).__name__}: {e}") from e


class RawColumn(torch.utils.data.Dataset):
    """Adds the raw column ``column`` of ``rows`` (the dataset's raw rows, same order) to each sample of ``ds``:
    torchtune's SFT transforms keep only ``tokens``/``mask``/``labels``."""

    def __init__(self, ds: Any, rows: Any, column: str):
        if len(ds) != len(rows):
            raise ValueError(f"RawColumn: the dataset has {len(ds)} samples but {len(rows)} raw rows")
        self.ds, self.rows, self.column = ds, rows, column

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, idx: int) -> dict:
        sample = dict(self.ds[idx])
        sample[self.column] = self.rows[idx][self.column]
        return sample


def collate_with_routing(batch: list[dict], *, collate_fn: Callable[[list[dict]], dict], column: str) -> dict:
    """Collates a batch whose samples carry per-token routing ``[S_b, L, K]`` in ``column`` (nested lists, an
    array, or their JSON string); the routing is checked against each sample's token count, padded to the
    batch's padded length and returned as ``[B, S, L, K]`` under the same key."""
    routing = [sample.pop(column) for sample in batch]
    routing = [json.loads(r) if isinstance(r, str) else r for r in routing]
    lengths = [len(sample["tokens"]) for sample in batch]
    out = collate_fn(batch)
    B, S = out["tokens"].shape
    arr_TLK = RoutingRecord.from_batch(routing, seq_len=S, lengths=lengths).to_array()
    out[column] = arr_TLK.view(B, S, *arr_TLK.shape[1:])
    return out
