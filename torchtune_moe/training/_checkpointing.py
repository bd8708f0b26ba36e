"""Checkpointing for the MoE recipe: the checkpointer interface, the native checkpointer, and atomic saves.

A training checkpoint is one directory ``{output_dir}/step_{N}`` (N = optimizer steps taken) holding the model
files, written by a :class:`Checkpointer`, plus ``recipe_state.pt`` (optimizer, lr scheduler, progress,
dataloader position, RNG states), written by the recipe. The directory is written aside and renamed into place
(:func:`atomic_directory`), so a crash or a kill while saving leaves the previous checkpoints untouched and
never leaves a half-written ``step_{N}``: a directory of that name is complete by construction.

Written here rather than reused: torchtune's checkpointers (``FullModelHFCheckpointer``,
``FullModelTorchTuneCheckpointer``) write their files straight into the output directory (a kill mid-save
leaves a mix of old and new files) and map keys for torchtune's dense model families only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol, runtime_checkable

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from torchtune_moe.training._hf_files import read_headers, write_safetensors
from torchtune_moe.training._sharded_checkpoint import DCP_DIRNAME, dcp_problems, read_slices_into, tensor_meta
from torchtune_moe.training._state_dict import check_state_dict

__all__ = [
    "Checkpointer",
    "MoECheckpointer",
    "MODEL_KEY",
    "RECIPE_STATE_FILENAME",
    "atomic_directory",
    "checkpoint_dir_name",
    "find_latest_checkpoint",
    "list_checkpoints",
    "remove_stale_temporaries",
    "checkpoint_problems",
    "latest_intact_checkpoint",
]

#: Key of the model state dict in the dict :meth:`Checkpointer.load_checkpoint` returns.
MODEL_KEY = "model"
#: File the recipe adds to every checkpoint directory (everything but the model weights).
RECIPE_STATE_FILENAME = "recipe_state.pt"

_STEP_DIR_RE = re.compile(r"^step_(\d+)$")
_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"


@runtime_checkable
class Checkpointer(Protocol):
    """What the recipe needs from a checkpointer (``checkpointer._component_`` in a config).

    Constructor: ``__init__(self, checkpoint_dir: str | None, output_dir: str, ...)``. ``checkpoint_dir`` holds
    the weights to start from (None: the model starts from its random initialisation); on
    ``resume_from_checkpoint: true`` the recipe passes the latest ``{output_dir}/step_{N}`` instead, so
    :meth:`save_checkpoint`'s files must be readable by :meth:`load_checkpoint`.

    Implementations: :class:`MoECheckpointer` (models built from scratch, torchtune-moe's own key names) and
    ``torchtune_moe.training.HFMoECheckpointer`` (Hugging Face families, Hub format).
    """

    def load_checkpoint(self) -> dict[str, Any]:
        """Returns ``{"model": state_dict}`` with torchtune-moe key names, or ``{}`` / ``{"model": None}`` when
        there is nothing to load (``checkpoint_dir`` is None)."""
        ...

    def save_checkpoint(self, model_state_dict: dict[str, torch.Tensor], save_dir: Path) -> None:
        """Writes the model files into ``save_dir``: an existing, empty, temporary directory that the recipe
        renames into place (and to which it adds ``recipe_state.pt``) after this returns."""
        ...


class MoECheckpointer:
    """Native checkpointer: one ``model.safetensors`` holding the model's state dict under torchtune-moe's key
    names (those of the ``moe()`` builder), and, when ``model_config`` is given, ``model_config.json`` with the
    builder config that rebuilds the model::

        from torchtune import config
        from omegaconf import OmegaConf
        model = config.instantiate(OmegaConf.create(json.load(open(d / "model_config.json"))))
        model.load_state_dict(MoECheckpointer(d, d).load_checkpoint()["model"])

    Args:
        checkpoint_dir (str | None): directory holding ``model.safetensors`` to start from; None trains from the
            model's random initialisation.
        output_dir (str): the run's output directory (checkpoints go to ``{output_dir}/step_{N}``; kept for the
            common checkpointer signature).
        model_config (dict | None): the ``model`` section of the config (``${model}`` in YAML), saved beside the
            weights. Default None (not saved).

    Raises:
        FileNotFoundError: ``checkpoint_dir`` is given but holds no ``model.safetensors`` (at load time).
    """

    MODEL_FILENAME = "model.safetensors"
    CONFIG_FILENAME = "model_config.json"

    def __init__(
        self,
        checkpoint_dir: Optional[str],
        output_dir: str,
        model_config: Optional[dict] = None,
    ) -> None:
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.output_dir = Path(output_dir)
        if isinstance(model_config, DictConfig):
            model_config = OmegaConf.to_container(model_config, resolve=True)
        self.model_config = model_config

    def _model_path(self) -> Path:
        path = self.checkpoint_dir / self.MODEL_FILENAME
        if not path.is_file():
            raise FileNotFoundError(
                f"checkpointer.checkpoint_dir: no {self.MODEL_FILENAME} in {self.checkpoint_dir} (MoECheckpointer "
                f"reads the files it writes; for a Hugging Face checkpoint use "
                f"torchtune_moe.training.HFMoECheckpointer)"
            )
        return path

    def load_checkpoint(self) -> dict[str, Any]:
        """``{"model": state_dict}`` read from ``checkpoint_dir/model.safetensors``; ``{"model": None}`` when
        ``checkpoint_dir`` is None."""
        if self.checkpoint_dir is None:
            return {MODEL_KEY: None}
        path = self._model_path()
        try:
            return {MODEL_KEY: load_file(str(path))}
        except Exception as e:  # safetensors raises SafetensorError for a truncated or garbage file
            raise ValueError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from e

    def load_sharded(self, model: torch.nn.Module) -> int:
        """Loads ``checkpoint_dir/model.safetensors`` into ``model`` (materialised, FSDP2-sharded or not), each
        rank reading only the slices its shards hold; keys and shapes are checked from the header first
        (router buffers may be absent). Returns the number of values this rank read."""
        path = self._model_path()
        try:
            headers = read_headers({str(path): []})
        except ValueError as e:
            raise ValueError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from e
        check_state_dict(model, {k: torch.empty(shape, device="meta") for k, (shape, _) in headers.items()})
        return read_slices_into(model, {k: [(str(path), k, ())] for k in headers})

    def save_checkpoint(self, model_state_dict: dict[str, torch.Tensor], save_dir: Path) -> None:
        """Writes ``model.safetensors`` (and ``model_config.json``) into ``save_dir``, one tensor at a time (a
        :class:`~torchtune_moe.training.GatheredStateDict` is gathered key by key as it is written)."""
        save_dir = Path(save_dir)
        entries = [
            (k, (lambda k=k: model_state_dict[k]), shape, dtype) for k, (shape, dtype) in tensor_meta(model_state_dict).items()
        ]
        write_safetensors(save_dir / self.MODEL_FILENAME, entries)
        if self.model_config is not None:
            with open(save_dir / self.CONFIG_FILENAME, "w") as f:
                json.dump(self.model_config, f, indent=2, sort_keys=True)


def checkpoint_dir_name(step: int) -> str:
    """Name of the checkpoint directory of optimizer step ``step``: ``step_{step}``."""
    return f"step_{step}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """The complete checkpoints of ``output_dir`` as ``(step, path)``, oldest first.

    Complete means a ``step_{N}`` directory holding ``recipe_state.pt``: temporary directories of an interrupted
    save (``.step_{N}.tmp-*``) never match.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR_RE.match(child.name)
        if m and child.is_dir() and (child / RECIPE_STATE_FILENAME).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def find_latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    """The complete checkpoint of ``output_dir`` with the highest step, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def _safetensors_problem(path: Path) -> Optional[str]:
    """Why the safetensors file ``path`` is unreadable (header or size), or None. Reads the header only."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path}: truncated ({size} bytes, no safetensors header)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{path}: truncated or not a safetensors file (header of {n} bytes, file of {size})"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        return f"{path}: not a safetensors file (unreadable header: {e})"
    if 8 + n + end != size:
        return f"{path}: truncated or padded ({size} bytes, the header describes {8 + n + end})"
    return None


def checkpoint_problems(checkpoint_dir: str | Path) -> list[str]:
    """What is wrong with the files of a checkpoint directory, one line per bad file; empty when intact.

    Checks, without loading any tensor: every ``*.safetensors`` file's header against its size (subdirectories
    included: the LoRA recipe's ``adapter/``), the sharded training state (``distcp/``: its metadata, and every data
    file it names long enough for its byte ranges), and that
    ``recipe_state.pt`` (when present) is a complete torch zip archive (its directory is at the end of the file,
    so a truncated file fails).
    """
    checkpoint_dir = Path(checkpoint_dir)
    problems = []
    for path in sorted(checkpoint_dir.rglob("*.safetensors")):
        problem = _safetensors_problem(path)
        if problem:
            problems.append(problem)
    if (checkpoint_dir / DCP_DIRNAME).is_dir():
        problems += dcp_problems(checkpoint_dir / DCP_DIRNAME)
    state = checkpoint_dir / RECIPE_STATE_FILENAME
    if state.exists():
        try:
            with zipfile.ZipFile(state) as z:
                if not z.namelist():
                    problems.append(f"{state}: an empty archive")
        except (zipfile.BadZipFile, OSError) as e:
            problems.append(f"{state}: truncated or corrupt ({e})")
    return problems


def latest_intact_checkpoint(output_dir: str | Path, before_step: Optional[int] = None) -> Optional[tuple[int, Path]]:
    """The complete checkpoint of ``output_dir`` with the highest step (below ``before_step`` if given) whose files
    pass :func:`checkpoint_problems`, as ``(step, path)``; None if there is none."""
    for step, path in reversed(list_checkpoints(output_dir)):
        if (before_step is None or step < before_step) and not checkpoint_problems(path):
            return step, path
    return None


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def remove_stale_temporaries(parent: str | Path) -> None:
    """Deletes what interrupted saves left in ``parent`` (``.step_*.tmp-*`` / ``.step_*.old-*`` directories)."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for child in parent.iterdir():
        if child.name.startswith(".") and (_TMP_MARK in child.name or _OLD_MARK in child.name) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(final_dir: str | Path) -> Iterator[Path]:
    """Yields an empty temporary directory beside ``final_dir``; on a normal exit, fsyncs its files and renames
    it to ``final_dir`` (replacing an existing one); on an exception, deletes it.

    A process killed at any point leaves either the old ``final_dir`` (or none) or the complete new one, plus
    at worst a hidden ``.NAME.tmp-*`` / ``.NAME.old-*`` directory that :func:`remove_stale_temporaries`
    deletes; readers never see a half-written ``final_dir``.

    Example::

        with atomic_directory(output_dir / "step_100") as tmp:
            checkpointer.save_checkpoint(state_dict, tmp)
            torch.save(recipe_state, tmp / RECIPE_STATE_FILENAME)
    """
    final_dir = Path(final_dir)
    parent = final_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}{_TMP_MARK}", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); give it a normal directory's permissions
    try:
        yield tmp
        _fsync_tree(tmp)
        if final_dir.exists():
            # os.replace cannot replace a non-empty directory: move the old one aside first. A kill between the
            # two renames leaves no final_dir (the older checkpoints are untouched), never a mixed one.
            old = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}{_OLD_MARK}", dir=parent))
            os.replace(final_dir, old / final_dir.name)
            os.replace(tmp, final_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final_dir)
        _fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
