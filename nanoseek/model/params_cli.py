"""`nanoseek params <preset or path>`: total and activated parameters, split by part."""

import argparse
from pathlib import Path

from ..config import PRESETS, ModelConfig, get_preset
from .params import format_counts


def resolve_config(spec: str) -> ModelConfig:
    """A preset name, a checkpoint folder, or a config.json file."""
    if spec in PRESETS:
        return get_preset(spec)
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise SystemExit(f"{spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a config.json or folder")
    return ModelConfig.from_json(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=f"a preset ({', '.join(sorted(PRESETS))}) or a checkpoint folder / config.json")


def run(args) -> int:
    print(format_counts(args.model, resolve_config(args.model)))
    return 0
