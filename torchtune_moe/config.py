"""Config handling for torchtune-moe recipes: config-name resolution, loading with overrides, validation.

Configs are torchtune configs: YAML parsed by ``torchtune.config.parse`` with ``key=value`` / ``~key`` overrides,
components built with ``torchtune.config.instantiate``. What this module adds:

- **Names**: ``--config tiny/full`` resolves to the config shipped in the package (``tune-moe ls`` lists them),
  so recipes run from any directory; a path to a YAML file works too.
- **Validation before any work**: :func:`validate_config` checks a config against the keys a recipe knows. A
  misspelt key, an unknown ``_component_``, an argument a component does not take, or an impossible value
  raises ``ValueError`` naming the key and what is allowed. torchtune's ``config.validate`` only checks
  top-level components and reports a bare ``TypeError``, so it is not enough here; its component lookup
  (``_get_component_from_path``) is reused.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
import sys
from dataclasses import dataclass, field
from importlib.resources import as_file
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torchtune import config as tt_config
from torchtune.config._parse import TuneRecipeArgumentParser
from torchtune.config._utils import _get_component_from_path, _merge_yaml_and_cli_args

from torchtune_moe._packaged_configs import find_config, packaged_configs

__all__ = [
    "Key",
    "resolve_config",
    "load_config",
    "parse",
    "validate_config",
    "boolean",
    "integer",
    "number",
    "one_of",
    "string",
    "component",
    "section",
]

_COMPONENT = "_component_"


# ----------------------------------------------------------------------------------------------- resolving


def resolve_config(name: str | Path) -> Path:
    """Path of the config ``name``: an existing YAML file, else a packaged config (``tiny/full`` or
    ``tiny/full.yaml``).

    Raises:
        ValueError: neither; the message lists the packaged configs.
    """
    path = Path(name)
    if path.is_file():
        return path
    try:
        resource = find_config(str(name))
    except ValueError:
        available = ", ".join(packaged_configs()) or "(none)"
        raise ValueError(
            f"--config {name}: no such file, and no packaged config of that name. Packaged configs: {available} "
            f"(`tune-moe ls` lists them, `tune-moe cp NAME FILE` copies one to edit)"
        ) from None
    with as_file(resource) as p:  # a real file for regular and editable installs
        return Path(p)


def _resolve_argv(argv: list[str]) -> None:
    """Replaces the value of ``--config`` in ``argv`` (in place) by the resolved path."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            argv[i + 1] = str(resolve_config(argv[i + 1]))
        elif arg.startswith("--config="):
            argv[i] = "--config=" + str(resolve_config(arg.split("=", 1)[1]))


def load_config(name: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``name`` (file or packaged name) with torchtune-style overrides (``key=value``, ``~key``)
    applied, exactly as ``tune run RECIPE --config NAME key=value ...`` builds it."""
    parser = TuneRecipeArgumentParser()
    yaml_args, cli_args = parser.parse_known_args(["--config", str(resolve_config(name)), *overrides])
    return _merge_yaml_and_cli_args(yaml_args, cli_args)


def parse(recipe_main: Callable[[DictConfig], Any]) -> Callable[..., Any]:
    """``torchtune.config.parse`` that also accepts packaged config names for ``--config``.

    Use it on a recipe's main function, like torchtune's decorator.
    """
    parsed = tt_config.parse(recipe_main)

    @functools.wraps(recipe_main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            _resolve_argv(sys.argv)
        except ValueError as e:
            sys.exit(f"error: {e}")
        return parsed(*args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------------------------- validating

# A check returns None when the value is fine, else a phrase saying what is allowed ("an integer >= 1").
Check = Callable[[Any], Optional[str]]


@dataclass(frozen=True)
class Key:
    """A config key a recipe knows.

    Args:
        check (Check): returns None for a good value, else what is allowed.
        required (bool): the key must be present.
        nullable (bool): ``null`` is allowed.
        doc (str): one line for error messages.
        recipe_kwargs (tuple[str, ...]): keyword arguments the recipe itself passes to this component (checked to
            be accepted by it).
        children (Optional[Mapping[str, Key]]): known sub-keys when the value is a plain mapping (a section; a key
            whose check also allows other values, as ``compile: true``, checks them only when given a mapping).
    """

    check: Check
    required: bool = False
    nullable: bool = False
    doc: str = ""
    recipe_kwargs: tuple[str, ...] = ()
    children: Optional[Mapping[str, "Key"]] = field(default=None)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def boolean() -> Check:
    """``true`` or ``false``."""
    return lambda v: None if isinstance(v, bool) else "true or false"


def integer(min_value: Optional[int] = None) -> Check:
    """An integer, at least ``min_value``."""
    allowed = "an integer" + (f" >= {min_value}" if min_value is not None else "")
    return lambda v: None if _is_int(v) and (min_value is None or v >= min_value) else allowed


def number(min_value: Optional[float] = None, strict: bool = False, allow_inf: bool = True) -> Check:
    """A number greater than (``strict``) or at least ``min_value``."""
    op = ">" if strict else ">="
    allowed = "a number" + (f" {op} {min_value}" if min_value is not None else "")

    def check(v: Any) -> Optional[str]:
        if isinstance(v, str) and allow_inf and v.strip().lower() in ("inf", "infinity"):
            v = float("inf")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            return allowed
        if min_value is not None and (v <= min_value if strict else v < min_value):
            return allowed
        return None

    return check


def one_of(*values: Any) -> Check:
    """One of ``values``."""
    return lambda v: None if v in values else "one of " + ", ".join(repr(x) for x in values)


def string() -> Check:
    """A non-empty string."""
    return lambda v: None if isinstance(v, str) and v else "a non-empty string"


def component(allow_list: bool = False) -> Check:
    """A mapping with ``_component_`` (its arguments are checked by :func:`validate_config`); with
    ``allow_list``, a list of such mappings too (e.g. several datasets)."""

    def ok(v: Any) -> bool:
        return isinstance(v, Mapping) and _COMPONENT in v

    allowed = "a mapping with a _component_ key" + (" (or a list of them)" if allow_list else "")
    return lambda v: None if ok(v) or (allow_list and isinstance(v, list) and v and all(map(ok, v))) else allowed


def section() -> Check:
    """A plain mapping whose keys are checked against ``Key.children``."""
    return lambda v: None if isinstance(v, Mapping) and _COMPONENT not in v else "a mapping"


def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _check_component(path: str, node: Mapping[str, Any], recipe_kwargs: Sequence[str] = ()) -> None:
    """Imports ``node['_component_']`` and checks that it accepts the node's keyword arguments."""
    target = node[_COMPONENT]
    if not isinstance(target, str) or not target:
        raise ValueError(f"{path}._component_: must be a dotted path such as 'torch.optim.AdamW', got {target!r}")
    try:
        obj = _get_component_from_path(target)
    except Exception as e:  # InstantiationError or ValueError, with torchtune's explanation
        raise ValueError(f"{path}._component_: cannot import '{target}': {e}") from None
    if not callable(obj):
        raise ValueError(f"{path}._component_: '{target}' is not callable")
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # some builtins have no signature: nothing more to check
        return
    params = sig.parameters
    for key, value in node.items():
        if key != _COMPONENT and key in params:
            allowed = _argument_type_problem(params[key], value)
            if allowed:
                raise ValueError(f"{path}.{key}: got {value!r}; allowed: {allowed} (an argument of '{target}')")
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    named = [n for n, p in params.items() if p.kind not in (inspect.Parameter.VAR_POSITIONAL,)]
    for key in node:
        if key != _COMPONENT and key not in params:
            raise ValueError(
                f"{path}.{key}: '{target}' has no argument '{key}'.{_suggest(key, named)} "
                f"Its arguments: {', '.join(named)}"
            )
    for key in recipe_kwargs:
        if key not in params:
            raise ValueError(
                f"{path}._component_: '{target}' must accept the argument '{key}', which the recipe passes "
                f"(its arguments: {', '.join(named)})"
            )


def _annotation_names(annotation: Any) -> set[str]:
    """The type names in a parameter annotation (``Union[float, Tensor]`` -> {float, Tensor}; also string
    annotations), without Optional/None."""
    if annotation is inspect.Parameter.empty:
        return set()
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None) or repr(annotation)
    return set(re.findall(r"[A-Za-z_][A-Za-z_0-9]*", text)) - {"typing", "torch", "Optional", "Union", "None", "NoneType"}


def _argument_type_problem(param: inspect.Parameter, value: Any) -> Optional[str]:
    """What a component argument must be when ``value`` plainly is not it, judged from the parameter's annotation
    (``int``, ``float``, ``bool``, ``Union[float, Tensor]``, optional or not) or, without one, its default;
    None when fine or unknown. Catches ``optimizer.lr=abc`` before the component sees it."""
    names = _annotation_names(param.annotation)
    default = param.default
    if names == {"bool"} or (not names and isinstance(default, bool)):
        return None if value is None or isinstance(value, bool) else "true or false"
    kind = None
    if names and names <= {"int", "float", "Tensor"} and names & {"int", "float"}:
        kind = "an integer" if names == {"int"} else "a number"
    elif not names and isinstance(default, (int, float)) and not isinstance(default, bool):
        kind = "a number"  # an int default may still take a float (Adam's weight_decay=0)
    if kind is None or isinstance(value, (list, tuple, dict)) or value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, str) and value.strip().lower() in ("inf", "-inf", "infinity", "nan"):
            return None
        return kind
    if kind == "an integer" and isinstance(value, float) and not value.is_integer():
        return kind
    return None


def _walk_components(path: str, value: Any) -> None:
    """Checks every nested mapping with ``_component_`` inside ``value``."""
    if isinstance(value, Mapping):
        if _COMPONENT in value:
            _check_component(path, value)
        for k, v in value.items():
            if k != _COMPONENT:
                _walk_components(f"{path}.{k}", v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _walk_components(f"{path}[{i}]", v)


def _validate_mapping(prefix: str, values: Mapping[str, Any], spec: Mapping[str, Key]) -> None:
    for name in values:
        if name not in spec:
            where = f"{prefix}{name}"
            raise ValueError(
                f"{where}: unknown config key.{_suggest(name, spec)} Known keys"
                f"{' of ' + prefix[:-1] if prefix else ''}: {', '.join(sorted(spec))}"
            )
    for name, key in spec.items():
        where = f"{prefix}{name}"
        if name not in values:
            if key.required:
                raise ValueError(f"{where}: missing required config key ({key.doc or 'see the recipe docs'})")
            continue
        value = values[name]
        if value is None:
            if key.nullable:
                continue
            raise ValueError(f"{where}: must not be null; allowed: {key.check(object()) or 'a value'}")
        allowed = key.check(value)
        if allowed is not None:
            raise ValueError(f"{where}: got {value!r}; allowed: {allowed}")
        if key.children is not None and isinstance(value, Mapping):
            _validate_mapping(f"{where}.", value, key.children)
        elif isinstance(value, Mapping) and _COMPONENT in value:
            _check_component(where, value, key.recipe_kwargs)
            for k, v in value.items():
                if k != _COMPONENT:
                    _walk_components(f"{where}.{k}", v)
        else:
            _walk_components(where, value)


def validate_config(cfg: DictConfig, spec: Mapping[str, Key]) -> None:
    """Checks ``cfg`` against the keys a recipe knows (``spec``), before any work.

    - every top-level key (and sub-key of sections) is known (else the closest known key is suggested);
    - required keys are present, values pass their check (type, range, allowed values);
    - every ``_component_`` anywhere imports, takes the arguments given to it, and takes those the recipe passes.

    Interpolations (``${output_dir}/logs``) are resolved first.

    Raises:
        ValueError: naming the first bad key and what is allowed.
    """
    try:
        values = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ValueError(f"{key or 'config'}: cannot resolve the config: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config: expected a mapping at the top level, got {type(values).__name__}")
    _validate_mapping("", values, spec)

