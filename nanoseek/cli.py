"""The `nanoseek` command line: one subcommand per job, each defined in the module that does the work.

Each command module exposes `add_arguments(parser)` and `run(args)`; modules are imported only when
their command runs, so `nanoseek params` does not pay for importing the server or the trainer.

Bad input ends a command with one line on stderr and exit status 2: an unknown command, a flag
argparse refuses (an unknown flag, a value of the wrong type, a missing required one) and a
missing optional package alike.
"""

import argparse
import importlib
import sys

from .runtime import tune_allocator

# name -> (module, one-line help)
COMMANDS = {
    "params": ("nanoseek.model.params_cli", "parameter counts of a preset or checkpoint, by part"),
    "demo": ("nanoseek.demo", "build a preset model and print its size and a greedy continuation"),
    "train": ("nanoseek.train.pretrain", "pretrain a DeepSeek-V3-architecture model (MTP, loss-free balancing)"),
    "sft": ("nanoseek.train.sft", "supervised fine-tuning on chat JSONL"),
    "tokenizer": ("nanoseek.tokenizer", "train a byte-level BPE tokenizer on a corpus"),
    "generate": ("nanoseek.inference.cli", "generate text from a checkpoint (streaming)"),
    "serve": ("nanoseek.serve.server", "OpenAI-compatible HTTP server with a chat page"),
    "chat": ("nanoseek.serve.chat", "chat with a model in the terminal"),
    "train-vlm": ("nanoseek.train.vlm", "train image+text input (DeepSeek-VL2 manner)"),
    "eval-vlm": ("nanoseek.train.vlm_eval", "accuracy and AUC of a vision-language model on a MedMNIST .npz"),
}

# optional packages some commands import only when they need them: module -> (pip name, nanoseek extra)
OPTIONAL = {"PIL": ("Pillow", "vision"), "fastapi": ("fastapi", "serve"), "uvicorn": ("uvicorn", "serve"),
            "matplotlib": ("matplotlib", "train")}


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors in one line ("PROG: error: MESSAGE; see PROG --help"), exit status 2,
    instead of the usage block followed by the message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = OneLineParser(prog="nanoseek", description="The DeepSeek-V3 system in readable PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"nanoseek: unknown command {name!r}; choose from {', '.join(COMMANDS)} (nanoseek --help)",
              file=sys.stderr)
        return 2
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("nanoseek"):
            print(f"nanoseek {name}: not available in this version ({e.name} is missing)", file=sys.stderr)
            return 2
        return _missing_package(name, e.name)
    tune_allocator()
    command_parser = OneLineParser(prog=f"nanoseek {name}", description=help_text)
    module.add_arguments(command_parser)
    args = command_parser.parse_args(argv[1:])
    try:
        return module.run(args) or 0
    except ModuleNotFoundError as e:  # an optional package imported only by the feature asked for (--image: Pillow)
        if e.name is None or e.name.split(".")[0] not in OPTIONAL:
            raise
        return _missing_package(name, e.name)


def _missing_package(command: str, module: str | None) -> int:
    top = (module or "").split(".")[0]
    package, extra = OPTIONAL.get(top, (module, _extra(command)))
    print(f"nanoseek {command} needs the package {package!r}: pip install 'nanoseek[{extra}]'", file=sys.stderr)
    return 2


def _extra(command: str) -> str:
    return {"serve": "serve", "chat": "serve", "train": "train", "sft": "train", "train-vlm": "vision",
            "eval-vlm": "vision"}.get(command, "test")


if __name__ == "__main__":
    sys.exit(main())
