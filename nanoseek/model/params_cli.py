"""`nanoseek params <preset or path>`: total and activated parameters, split by part."""

import argparse
import sys
from pathlib import Path

from ..config import PRESETS, ConfigError, ModelConfig, get_preset
from .params import format_counts


def resolve_config(spec: str) -> ModelConfig:
    """A preset name, a checkpoint folder, or a config.json file; ConfigError naming the file if none."""
    if spec in PRESETS:
        return get_preset(spec)
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ConfigError(f"{spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a config.json or folder")
    return ModelConfig.from_json(path)  # its errors name the file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=f"a preset ({', '.join(sorted(PRESETS))}) or a checkpoint folder / config.json")


def run(args) -> int:
    try:
        config = resolve_config(args.model)
    except ConfigError as e:
        print(f"nanoseek params: {e}", file=sys.stderr)
        return 2
    print(format_counts(args.model, config))
    return 0
