"""`nanoseek sft`: supervised fine-tuning of a pretrained checkpoint on chat conversations.

    nanoseek sft --init runs/stdlib/latest --data chats.jsonl --out runs/sft --steps 200

The data is JSONL in OpenAI messages form, one conversation a line:
`{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`. Conversations are
rendered with the tokenizer's chat template (DeepSeek-V3's) and the loss covers only the
assistant's replies and the end-of-sentence after each; system and user text and the role tokens
are context. One conversation per row, truncated to seq_len, padded to the longest in the batch.
Checkpoints, logging and `--resume` work as in `nanoseek train`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import zlib
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..data import jsonl_lines
from ..checkpoint import load as load_model
from ..tokenizer import Tokenizer, TokenizerError
from .checkpoint import list_checkpoints, report_user_errors
from .pretrain import add_settings_arguments, open_resume, plot_line, settings_from_args, start_args
from ..runtime import pick_device, set_threads
from .metrics import pick_dtype
from .trainer import IGNORE, Settings, Trainer


DEFAULT_SEQ_LEN = 512  # conversations are cut to this many tokens (to the model's context when shorter)
DEFAULT_STEPS = 200  # without --steps or --minutes


class SFTDataError(ValueError):
    """The chat data is missing or malformed; names the file and line."""


def read_conversations(path: str | Path) -> list[tuple[int, list[dict]]]:
    """(line number, messages) of each conversation of a chat JSONL file."""
    conversations = []
    for lineno, line in jsonl_lines(path, SFTDataError, "chat data"):
        try:
            messages = json.loads(line)["messages"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SFTDataError(f"{path}:{lineno}: expected {{\"messages\": [...]}} ({e})") from e
        if not isinstance(messages, list):
            raise SFTDataError(f"{path}:{lineno}: \"messages\" must be a list of {{\"role\", \"content\"}} "
                               f"objects, got {type(messages).__name__}")
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
            raise SFTDataError(f"{path}:{lineno}: no assistant message, nothing to learn from")
        conversations.append((lineno, messages))
    if not conversations:
        raise SFTDataError(f"{path}: no conversations")
    return conversations


def encode_examples(tok: Tokenizer, conversations: list[list[dict]], seq_len: int,
                    names: list[str] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each conversation -> (inputs, targets) of at most seq_len tokens; targets are IGNORE except
    where the token to predict is part of an assistant reply. names[i] is how an error calls
    conversation i (its file and line; default: its index)."""
    examples = []
    for i, messages in enumerate(conversations):
        try:
            ids, mask = tok.encode_chat_for_training(messages)
        except TokenizerError as e:
            raise SFTDataError(f"{names[i] if names else f'conversation {i}'}: {e}") from e
        ids, mask = np.array(ids[: seq_len + 1], dtype=np.int64), np.array(mask[: seq_len + 1])
        targets = np.where(mask[1:], ids[1:], IGNORE)
        if (targets != IGNORE).any():  # a reply cut off entirely by truncation teaches nothing
            examples.append((ids[:-1], targets))
    return examples


def collate(examples: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: padding comes after every real token, so causal
    attention never lets a real token see it, and its targets are ignored."""
    width = max(len(x) for x, _ in examples)
    inputs = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        inputs[row, : len(x)] = torch.from_numpy(x)
        targets[row, : len(y)] = torch.from_numpy(y)
    return inputs, targets


class ChatLoader:
    """Batches of conversations in a seeded order per epoch; resumable like PackedLoader."""

    def __init__(self, examples: list, batch_size: int, pad_id: int, seed: int = 0):
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = -1, None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = []
        while len(chosen) < self.batch_size:
            if self.index >= len(self.examples):
                self.epoch, self.index = self.epoch + 1, 0
            if self._order_epoch != self.epoch:
                self._order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))
                self._order_epoch = self.epoch
            chosen.append(self.examples[self._order[self.index]])
            self.index += 1
        return collate(chosen, self.pad_id)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.index = state["seed"], state["epoch"], state["index"]


def split_conversations(conversations: list[tuple[int, list[dict]]], val_fraction: float) -> tuple[list, list]:
    """(line, messages) pairs held out by a hash of the conversation's text, so the split survives
    reordering the file."""
    train, val = [], []
    for item in conversations:
        key = zlib.crc32(json.dumps(item[1], sort_keys=True).encode())
        (val if key % 10_000 < val_fraction * 10_000 else train).append(item)
    if not val and len(train) > 1 and val_fraction > 0:  # 0: the user holds out nothing
        val.append(train.pop())
    return train, val


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init", help="pretrained checkpoint folder (e.g. runs/stdlib/latest)")
    parser.add_argument("--data", help="chat JSONL: {\"messages\": [{\"role\", \"content\"}, ...]} per line")
    parser.add_argument("--out", default="runs/sft")
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (a CUDA GPU when there is one)")
    parser.add_argument("--resume", default=None, help="a run folder or checkpoint to continue exactly")
    add_settings_arguments(parser, Settings(lr=3e-4, warmup_steps=20, seq_len=DEFAULT_SEQ_LEN, eval_every=50, log_every=5),
                           helps={"steps": f"optimizer steps (default: {DEFAULT_STEPS}, or as many as fit --minutes)"})


def run(args) -> int:
    return report_user_errors("sft", lambda: _run(args), more_errors=(SFTDataError,))


def encode_split(tok: Tokenizer, data, train_conv: list, val_conv: list, seq_len: int, val_fraction: float) -> tuple[list, list]:
    """The training and validation examples of (line, messages) pairs; an error when there is
    nothing to train on (the loader could not fill a single batch)."""
    if not train_conv:
        raise SFTDataError(f"{data}: --val-fraction {val_fraction} holds out all {len(val_conv)} conversations, "
                           "none is left to train on")
    train = encode_examples(tok, [m for _, m in train_conv], seq_len, [f"{data}:{line}" for line, _ in train_conv])
    val = encode_examples(tok, [m for _, m in val_conv], seq_len, [f"{data}:{line}" for line, _ in val_conv])
    if not train:
        raise SFTDataError(f"{data}: no training conversation has an assistant token within its first "
                           f"--seq-len {seq_len} tokens (the prompts are longer): raise --seq-len")
    return train, val


def _run(args) -> int:
    torch.manual_seed(0)
    set_threads(args.threads)
    device = pick_device(args.device)
    if args.resume:
        checkpoint, state = open_resume("sft", args, add_arguments, ("threads", "device"),
                                        kept=("data", "init", "val_fraction"))
        settings = Settings.from_dict(state["settings"])
        init, data, run_dir, val_fraction = checkpoint, state["data"], checkpoint.parent, state["val_fraction"]
        print(f"resuming {checkpoint} at step {state['step']}")
    else:
        if not args.init or not args.data:
            raise SFTDataError("needs --init CHECKPOINT and --data CHATS.jsonl (or --resume RUN)")
        settings = settings_from_args(args, default_steps=DEFAULT_STEPS)
        settings.validate()  # the MTP depth is capped by the model's below
        if not 0 <= args.val_fraction < 1:  # 1 would hold out every conversation
            raise ConfigError(f"--val-fraction {args.val_fraction}: must be at least 0 and below 1")
        settings.dtype = pick_dtype(settings.dtype, device)
        init, data, run_dir, val_fraction = Path(args.init), args.data, Path(args.out), args.val_fraction
        if list_checkpoints(run_dir):
            raise CheckpointError(f"{run_dir} already holds checkpoints of a run: continue it with --resume {run_dir}, "
                                  "or fine-tune into another --out")
    conversations = read_conversations(data)  # before loading the model: bad data fails at once
    data_sha256 = hashlib.sha256(Path(data).read_bytes()).hexdigest()
    if args.resume and state.get("data_sha256", data_sha256) != data_sha256:  # older runs did not record it
        raise SFTDataError(f"{data} has changed since this run started: resuming on other conversations would not "
                           "continue it exactly; restore the file, or fine-tune into a new --out")
    tok = Tokenizer.load(init)
    model = load_model(init, dtype=torch.float32, device=device)
    settings.mtp_depth = min(settings.mtp_depth, len(model.mtp))
    context = model.config.max_position_embeddings
    if not args.resume and args.seq_len == DEFAULT_SEQ_LEN and context < DEFAULT_SEQ_LEN:
        settings.seq_len = context  # the default, not asked for: fit it to the model (an explicit one past it is refused)
    train_conv, val_conv = split_conversations(conversations, val_fraction)
    train, val_examples = encode_split(tok, data, train_conv, val_conv, settings.seq_len, val_fraction)
    val = [collate(val_examples[i : i + settings.batch_size], tok.pad_id)
           for i in range(0, min(len(val_examples), settings.batch_size * settings.eval_batches), settings.batch_size)]
    n_targets = sum(int((y != IGNORE).sum()) for _, y in train)
    print(f"SFT: {len(train)} train / {len(val_examples)} val conversations, {n_targets:,} assistant tokens to learn")
    loader = ChatLoader(train, settings.batch_size, tok.pad_id, seed=settings.seed)
    trainer = Trainer(model, settings, tok, loader, val, run_dir,
                      extra_state={"data": str(Path(data).resolve()), "val_fraction": val_fraction, "data_sha256": data_sha256,
                                   # the base model and the flags the run started from, whichever checkpoint it resumes
                                   "init": state["init"] if args.resume else str(Path(init).resolve()),
                                   "args": state.get("args", {}) if args.resume else start_args(args)})
    if args.resume:
        trainer.load(checkpoint)
    result = trainer.fit(resumed=bool(args.resume))
    print(f"\nfine-tuned {result['step']} steps; val loss on assistant tokens {result.get('val_loss', float('nan')):.3f}")
    # a sample reply to the first held-out prompt (a conversation of replies only has none)
    prompt = [m for m in val_conv[0][1] if m.get("role") != "assistant"][:2] if val_conv else []
    if prompt:
        ids = torch.tensor([tok.encode_chat(prompt)])
        model.eval()
        with torch.no_grad():
            for _ in range(64):
                next_id = model(ids.to(device))[0, -1].argmax().cpu()
                if int(next_id) == tok.eos_id:
                    break
                ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        print(f"\n{tok.decode(ids[0].tolist())}")
    print(f"\ncheckpoint: {(run_dir / 'latest').resolve()}\nplot: {plot_line(run_dir)}")
    return 0
