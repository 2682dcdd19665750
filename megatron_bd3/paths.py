"""Where a path named on the command line or in a run config is looked for.

One rule for every path a run names (docs/training.md, "Paths"), implemented by `resolve_path`:

- An absolute path is used as is (`~` expands to the home directory).
- A relative path resolves against the current directory; `base:` inside a YAML resolves
  against the directory of the file that names it.
- Only a config path (the run YAML given to a command, `base:`, `deepspeed.config`) that does not
  exist there is looked up among the configs shipped inside this package, by name:
  `tiny_cpu.yaml` or `tiny_cpu` for a run YAML, `deepspeed/zero1.json`, `zero1.json` or `zero1`
  for a DeepSpeed JSON. The checkout-era spellings `configs/tiny_cpu.yaml` and
  `configs/deepspeed/zero1.json` name the same shipped files.
- Data paths (`data.manifest`, `data.tokenizer`, `checkpoint.init_from`) and output paths
  (`checkpoint.dir`, `logging.output_dir`) never fall back to the package; an output path need
  not exist yet.

A path that must exist and is found nowhere raises ConfigError naming the key and every place
tried.
"""

from __future__ import annotations

import os
from pathlib import Path

SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"

# Keys whose relative paths may name a shipped file: the run YAML given to a command ("config"),
# `base:` inside a YAML, and the DeepSpeed JSON.
YAML_KEYS = ("config", "base")
DEEPSPEED_KEY = "deepspeed.config"
# Keys a run writes to: resolved against the current directory, never required to exist.
OUTPUT_KEYS = ("checkpoint.dir", "logging.output_dir")


def shipped_config(name: str) -> Path:
    """The file of a shipped config by name (`tiny_cpu.yaml`, `deepspeed/zero1.json`)."""
    return SHIPPED_CONFIGS / name


def shipped_config_names() -> list[str]:
    """Names of the shipped run YAMLs and DeepSpeed JSONs, as `resolve_path` accepts them."""
    yamls = sorted(p.name for p in SHIPPED_CONFIGS.glob("*.yaml"))
    jsons = sorted(f"deepspeed/{p.name}" for p in (SHIPPED_CONFIGS / "deepspeed").glob("*.json"))
    return yamls + jsons


def _shipped_candidate(path: Path, key: str) -> Path | None:
    """The shipped file a relative config path names, or None when it names none by its form."""
    parts = list(path.parts)
    if parts[:1] == ["configs"]:  # the spelling from when configs/ sat in the checkout
        parts = parts[1:]
    if key == DEEPSPEED_KEY:
        if parts[:1] == ["deepspeed"]:
            parts = parts[1:]
        folder, suffix = SHIPPED_CONFIGS / "deepspeed", ".json"
    else:
        folder, suffix = SHIPPED_CONFIGS, ".yaml"
    if len(parts) != 1 or parts[0] in (".", ".."):
        return None  # shipped names are flat inside their folder
    name = parts[0] if parts[0].endswith((suffix, ".yml")) else parts[0] + suffix
    return folder / name


def resolve_path(
    text: str | os.PathLike, key: str, *, relative_to: str | os.PathLike | None = None
) -> Path:
    """Resolve the path `text` given for `key` (a dotted run-config key, "config" for the run
    YAML of a command line, "base" for `base:`) by the rules in this module's docstring.

    `relative_to` is the directory a relative path is taken against (the including file's
    directory for `base:`); None means the current directory. A path found in the current
    directory is returned as given (relative), so messages stay short and every process of a
    launch, which shares the launcher's directory, sees the same file.
    """
    from megatron_bd3.training.config import ConfigError  # config.py imports this module

    path = Path(text).expanduser()
    if path.is_absolute():
        if key in OUTPUT_KEYS or path.exists():
            return path
        raise ConfigError(f"{key}: {path} does not exist")
    local = path if relative_to is None else Path(relative_to) / path
    if key in OUTPUT_KEYS or local.exists():
        return local
    where = "the current directory" if relative_to is None else "the including file's directory"
    tried = [f"{local.resolve()} ({where})"]
    if key in YAML_KEYS or key == DEEPSPEED_KEY:
        shipped = _shipped_candidate(path, key)
        if shipped is not None and shipped.is_file():
            return shipped
        tried.append(
            f"{shipped} (shipped configs)"
            if shipped is not None
            else f"the shipped configs in {SHIPPED_CONFIGS} (name not of their form)"
        )
        wanted = key == DEEPSPEED_KEY  # list the JSONs for a JSON, the YAMLs for a YAML
        names = [n for n in shipped_config_names() if n.startswith("deepspeed/") == wanted]
        hint = "; shipped: " + ", ".join(names)
    else:
        hint = " (data paths are never looked up in the package)"
    raise ConfigError(f"{key}: {text} does not exist; tried {', '.join(tried)}{hint}")
