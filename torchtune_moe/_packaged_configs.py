"""The YAML configs shipped inside the package (``torchtune_moe/configs``), found through importlib.resources
so they work from an installed wheel as well as from a checkout."""

from importlib.resources import files
from importlib.resources.abc import Traversable

# The recipe of the packaged configs (`tune-moe ls` shows it next to each config, as `tune ls` does for
# torchtune's); the `*lora` configs belong to LORA_RECIPE.
RECIPE = "moe_full_finetune"
LORA_RECIPE = "moe_lora_finetune"


def recipe_of(name: str) -> str:
    """The recipe a packaged config is for."""
    return LORA_RECIPE if name.endswith("lora") else RECIPE

_SUFFIXES = (".yaml", ".yml")


def packaged_configs() -> dict[str, Traversable]:
    """Map each packaged config's name (its path under ``configs/`` without the suffix, e.g. ``tiny/full``)
    to its resource, sorted by name."""
    found: dict[str, Traversable] = {}

    def walk(node: Traversable, prefix: str) -> None:
        for child in node.iterdir():
            if child.is_dir():
                walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith(_SUFFIXES):
                found[prefix + child.name.rsplit(".", 1)[0]] = child

    root = files("torchtune_moe") / "configs"
    if root.is_dir():
        walk(root, "")
    return dict(sorted(found.items()))


def find_config(name: str) -> Traversable:
    """The packaged config called ``name`` (``tiny/full`` or ``tiny/full.yaml``).

    Raises:
        ValueError: no packaged config has that name; the message lists the available ones.
    """
    configs = packaged_configs()
    key = name[: -len(".yaml")] if name.endswith(".yaml") else name
    key = key[: -len(".yml")] if key.endswith(".yml") else key
    if key not in configs:
        available = ", ".join(configs) or "(none)"
        raise ValueError(f"Unknown config '{name}'. Available packaged configs: {available}")
    return configs[key]
