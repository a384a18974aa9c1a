"""`nanoseek train`: pretrain a DeepSeek-V3-architecture model from scratch on a text corpus.

    nanoseek train                                    # the main job: Python's stdlib sources, preset 'small', 10 min
    nanoseek train --corpus ../shared/data/text/tinyshakespeare.txt --out runs/shakespeare --minutes 5
    nanoseek train --set n_routed_experts=0 --set intermediate_size=640   # any config field
    nanoseek train --resume runs/stdlib               # continue exactly from the newest intact checkpoint

A run folder holds data/ (the tokenizer and token shards, reused by later runs on the same corpus),
step-N/ checkpoints (Hugging Face layout; `nanoseek.load(run/"latest")`), metrics.jsonl and
train_plot.png. At the end the model completes a few prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from ..config import PRESETS, ConfigError, ModelConfig, get_preset
from ..data import (DataError, PackedLoader, TokenStream, corpus_fingerprint, iter_documents, prepare_shards,
                    read_meta, resolve_corpus, tokenizer_fingerprint, val_batches)
from ..model.params import count_parameters, human
from ..model.transformer import build_model
from ..tokenizer import MIN_VOCAB_SIZE, Tokenizer, sample_texts
from ..checkpoint import CheckpointError
from .checkpoint import (branch_from, check_resumable_by, list_checkpoints, read_state, report_user_errors,
                         resolve_resume)
from ..runtime import pick_device, set_threads
from .metrics import pick_dtype
from .trainer import Settings, Trainer

CODE_PROMPTS = ["import os\n\ndef ", "class Stack:\n    def __init__(self", "    for i in range(", "def fibonacci(n):\n"]

SETTING_HELP = {
    "steps": "optimizer steps (default: as many as fit --minutes)",
    "minutes": "time budget for training; the step count is fixed after a 10-step probe",
    "schedule": "cosine | wsd",
    "mtp_depth": "MTP depth D trained (<= num_nextn_predict_layers; 0 = no MTP loss)",
    "mtp_lambda": "weight of the MTP loss",
    "bias_gamma": "router-bias update speed (auxiliary-loss-free balancing); 0 = off",
    "balance_alpha": "weight of the sequence-wise balance loss; 0 = off",
    "dtype": "fp32 | bf16 (autocast; weights and optimizer stay fp32) | auto (bf16 where its matmuls are faster)",
    "activation_checkpointing": "recompute activations in backward to save memory",
    "save_every": "checkpoint every N steps (and always at the end)",
    "keep": "checkpoints to keep",
}


def add_settings_arguments(parser: argparse.ArgumentParser, defaults: Settings, helps: dict | None = None) -> None:
    """One --flag per Settings field, typed from its default; helps overrides SETTING_HELP."""
    helps = {**SETTING_HELP, **(helps or {})}
    for field in dataclasses.fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=default, help=helps.get(field.name))
        else:
            kind = {"steps": int, "minutes": float}.get(field.name, type(default))
            parser.add_argument(flag, type=kind, default=default, help=helps.get(field.name))


def settings_from_args(args, default_steps: int | None = None) -> Settings:
    """The run's settings: --steps wins over --minutes; default_steps when neither is given."""
    settings = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    if settings.steps is not None:
        settings.minutes = None
    elif settings.minutes is None:
        settings.steps = default_steps
    return settings


def start_args(args) -> dict:
    """The flags a run was started with, kept in its training state: a resume may repeat them."""
    return {name: value for name, value in vars(args).items() if name not in ("resume", "func", "command")}


def refuse_changes_on_resume(args, add_arguments, applying: tuple[str, ...], started_with: dict) -> None:
    """A resumed run keeps the settings, model and data it was started with: a flag given to
    change them is refused, not silently ignored. A flag repeating the value the run was started
    with (`started_with`: its settings, corpus, folders) passes, so the first command with --resume
    added works; one whose start value is not kept passes only at its default. applying: the flags
    that do apply to a resumed run."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))

    def same(value, start) -> bool:
        if value == start:
            return True
        paths = isinstance(value, (str, Path)) and isinstance(start, (str, Path))
        return paths and Path(value).resolve() == Path(start).resolve()

    changed = [name for name, value in vars(args).items()
               if name in defaults and name not in (*applying, "resume") and value != defaults[name]
               and not (name in started_with and same(value, started_with[name]))]
    if changed:
        raise ConfigError(f"{', '.join('--' + n.replace('_', '-') for n in changed)}: a resumed run keeps the "
                          "settings it was started with (its trainer_state.json); drop these flags, or start a new run")


def open_resume(command: str, args, add_arguments, applying: tuple[str, ...],
                kept: tuple[str, ...]) -> tuple[Path, dict]:
    """The checkpoint `--resume` names and its training state, after the checks every resumed command
    makes in this order: written by this command; no flag changing what the run started with (its
    flags, settings and folder, plus the `kept` entries of its state, each under its flag's name);
    then the later checkpoints of a left branch set aside."""
    checkpoint = resolve_resume(args.resume)
    state = read_state(checkpoint)
    check_resumable_by(command, state, checkpoint)
    refuse_changes_on_resume(args, add_arguments, applying,
                             {**state.get("args", {}), **state["settings"], **{name: state[name] for name in kept},
                              "out": checkpoint.parent})
    branch_from(checkpoint)
    return checkpoint, state


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", default="stdlib", help="folder, .txt, .jsonl with 'text', or 'stdlib' (Python's own sources)")
    parser.add_argument("--out", default=None, help="run folder (default runs/<corpus name>)")
    parser.add_argument("--preset", default="small", choices=sorted(n for n in PRESETS if not n.startswith("deepseek")))
    parser.add_argument("--config", default=None, help="a config.json to start from instead of a preset")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field (JSON value, or true/false/none, or a plain string)")
    parser.add_argument("--tokenizer", default=None, help="an existing tokenizer (folder or tokenizer.json); default: train one")
    parser.add_argument("--vocab-size", type=int, default=None, help=f"vocabulary of the trained tokenizer (default: the config's, at least {MIN_VOCAB_SIZE})")
    parser.add_argument("--tokenizer-max-bytes", type=int, default=20_000_000)
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--prompt", action="append", default=None, help="prompt to complete at the end (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--temperature", type=float, default=0.6, help="sampling temperature of the completions (0: greedy)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (a CUDA GPU when there is one)")
    parser.add_argument("--resume", default=None, help="a run folder or checkpoint to continue exactly (its settings are used)")
    # defaults: the main job, ~10 minutes in all on 2 cores (data preparation and completions included)
    # (small batches: in a budget of a few million tokens, more updates beat larger ones)
    add_settings_arguments(parser, Settings(minutes=9.0, batch_size=8, seq_len=256, lr=3e-3, warmup_steps=30,
                                            eval_every=100, eval_batches=20, save_every=200))


# fields the tokenizer decides, whatever --set says
TOKENIZER_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_WORDS = {"true": True, "false": False, "none": None, "null": None}


def parse_set_value(text: str):
    """A --set VALUE: true/false/none in any case (Python's spelling too), else JSON, else the
    text itself (string fields such as scoring_func)."""
    if text.strip().lower() in _WORDS:
        return _WORDS[text.strip().lower()]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def base_config(args) -> ModelConfig:
    """The preset (or --config) with every --set applied and the vocabulary the tokenizer is to have:
    the model before the tokenizer fixes its vocabulary and special token ids. Known before any
    data work, so a bad field (or a vocabulary size that is not --tokenizer's) fails at once."""
    config = ModelConfig.from_json(args.config) if args.config else get_preset(args.preset)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    changes = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE with a ModelConfig field")
        if key in TOKENIZER_FIELDS:
            raise ConfigError(f"--set {key}: the special token ids are the tokenizer's, not a setting")
        changes[key] = parse_set_value(value)
    if args.vocab_size is not None and changes.get("vocab_size", args.vocab_size) != args.vocab_size:
        raise ConfigError(f"--vocab-size {args.vocab_size} and --set vocab_size={changes['vocab_size']} disagree")
    asked = args.vocab_size if args.vocab_size is not None else changes.get("vocab_size")  # 0 is refused, not unset
    if isinstance(asked, int) and asked < MIN_VOCAB_SIZE:  # other types: config.validate names them
        raise ConfigError(f"--vocab-size {asked}: a byte-level BPE with nanoseek's special tokens needs at least {MIN_VOCAB_SIZE}")
    # the size the tokenizer is trained to; a preset's own can be below that minimum (`test` has 256,
    # for tests that build models without a tokenizer)
    changes["vocab_size"] = asked if asked is not None else max(config.vocab_size, MIN_VOCAB_SIZE)
    if not 0 < args.val_fraction < 1:
        raise ConfigError(f"--val-fraction {args.val_fraction}: must be between 0 and 1")
    if args.tokenizer_max_bytes < 1:  # 0 would train a tokenizer without a single merge
        raise ConfigError(f"--tokenizer-max-bytes {args.tokenizer_max_bytes}: must be a whole number >= 1")
    config = config.replace(**changes)
    config.validate()
    if args.tokenizer and asked is not None:  # the model's vocabulary is the given tokenizer's
        size = Tokenizer.load(args.tokenizer).vocab_size
        if size != asked:
            flag = f"--vocab-size {asked}" if args.vocab_size is not None else f"--set vocab_size={asked}"
            raise ConfigError(f"{flag}: the tokenizer {args.tokenizer} has {size} tokens; drop the flag, or leave "
                              "out --tokenizer to train one of that size")
    return config


def model_config(base: ModelConfig, tok: Tokenizer) -> ModelConfig:
    """base with the tokenizer's vocabulary size and special token ids."""
    config = base.replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                          pad_token_id=tok.pad_id)
    config.validate()
    return config


def stored_data_dir(data_dir: Path, run_dir: Path) -> str:
    """data_dir as trainer_state.json keeps it: relative to the run folder when inside it, so a
    moved or copied run still finds its shards."""
    try:
        return str(data_dir.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(data_dir.resolve())


def resumed_data_dir(stored: str, run_dir: Path) -> Path:
    """The shards of a run being resumed. Older runs stored an absolute path: when that is gone
    (the run was moved), the run's own data/ is used."""
    path = Path(stored)
    if not path.is_absolute():
        return run_dir / path
    if not path.exists() and (run_dir / "data").is_dir():
        return run_dir / "data"
    return path


def prepare_data(args, run_dir: Path, vocab_size: int) -> tuple[Tokenizer, Path]:
    """The tokenizer and shards under run_dir/data, reused when made from this very corpus (and,
    with --tokenizer, this tokenizer; without, one trained to the same vocabulary size from the same
    --tokenizer-max-bytes) with the same val fraction."""
    data_dir = run_dir / "data"
    fingerprint = corpus_fingerprint(args.corpus)
    try:
        meta = read_meta(data_dir)
    except DataError:
        meta = {}
    reusable = (meta.get("corpus_fingerprint") == fingerprint and meta.get("val_fraction") == args.val_fraction
                and (data_dir / "tokenizer.json").exists())
    if args.tokenizer:
        tok = Tokenizer.load(args.tokenizer)
        reusable = reusable and meta.get("tokenizer_sha256") == tokenizer_fingerprint(tok)
    elif (reusable and meta.get("tokenizer_vocab_size", meta.get("vocab_size")) == vocab_size
          and meta.get("tokenizer_max_bytes") == args.tokenizer_max_bytes):  # absent: made with --tokenizer
        # the size asked for, not the size made: a small corpus gives fewer merges than asked
        tok = Tokenizer.load(data_dir)
    else:
        reusable = False
        start = time.perf_counter()
        texts = sample_texts((t for _, t in iter_documents(args.corpus)), args.tokenizer_max_bytes)
        tok = Tokenizer.train(texts, vocab_size)
        print(f"trained a {vocab_size}-token BPE tokenizer on {resolve_corpus(args.corpus)} in {time.perf_counter() - start:.1f}s")
    if not reusable:
        start = time.perf_counter()
        made = {} if args.tokenizer else {"tokenizer_max_bytes": args.tokenizer_max_bytes, "tokenizer_vocab_size": vocab_size}
        meta = prepare_shards(args.corpus, tok, data_dir, val_fraction=args.val_fraction, extra_meta=made)
        tok.save(data_dir)
        n = {k: sum(v["tokens"]) for k, v in meta["splits"].items()}
        print(f"tokenized {meta['corpus']}: {n['train']:,} train / {n['val']:,} val tokens in {time.perf_counter() - start:.1f}s")
    return tok, data_dir


def plot_line(run_dir: Path) -> str:
    """Where the end-of-run plot is, or why there is none (it needs matplotlib)."""
    plot = run_dir / "train_plot.png"
    return str(plot) if plot.is_file() else "none (it needs matplotlib: pip install 'nanoseek[train]')"


def fresh_run_dir(args) -> Path:
    """--out, which must not hold another run's checkpoints; by default runs/<corpus>, or
    runs/<corpus>-2, -3, ... when that one is taken, so a rerun never overwrites a finished run."""
    if args.out:
        if list_checkpoints(args.out):
            raise CheckpointError(f"{args.out} already holds checkpoints of a run: continue it with --resume {args.out}, "
                                  "or train into another --out")
        return Path(args.out)
    base = "stdlib" if args.corpus == "stdlib" else Path(str(resolve_corpus(args.corpus))).stem
    run_dir, n = Path("runs") / base, 1
    while list_checkpoints(run_dir):
        n += 1
        run_dir = Path("runs") / f"{base}-{n}"
    return run_dir


@torch.no_grad()
def complete(model, tok: Tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.0, seed: int = 0) -> str:
    """Continue prompt (after <bos>) by sampling at temperature (0: greedy), recomputing the whole window each step."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([tok.encode(prompt, bos=True)])
    window = model.config.max_position_embeddings
    for _ in range(max_new_tokens):
        logits = model(ids[:, -window:].to(model.device))[0, -1].float().cpu()
        if temperature > 0:
            next_id = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)
        else:
            next_id = logits.argmax(-1, keepdim=True)
        if int(next_id) == tok.eos_id:
            break
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return tok.decode(ids[0, 1:].tolist())


def run(args) -> int:
    return report_user_errors("train", lambda: _run(args))


def _run(args) -> int:
    torch.manual_seed(0)
    set_threads(args.threads)
    device = pick_device(args.device)
    resumed = args.resume is not None
    if not args.temperature >= 0:  # the completions at the end: a negative one would quietly mean greedy
        raise ConfigError(f"--temperature {args.temperature}: must be a number >= 0 (0: greedy)")
    if resumed:
        checkpoint, state = open_resume("train", args, add_arguments,
                                        ("threads", "device", "prompt", "max_new_tokens", "temperature"),
                                        kept=("corpus",))
        settings = Settings.from_dict(state["settings"])
        run_dir = checkpoint.parent
        data_dir = resumed_data_dir(state["data_dir"], run_dir)
        tok = Tokenizer.load(checkpoint)
        config = ModelConfig.from_json(checkpoint / "config.json")
        corpus = state["corpus"]
        print(f"resuming {checkpoint} at step {state['step']}")
    else:
        corpus = args.corpus
        settings = settings_from_args(args)
        base = base_config(args)
        settings.validate(mtp_modules=base.num_nextn_predict_layers, context=base.max_position_embeddings)
        settings.dtype = pick_dtype(settings.dtype, device)
        run_dir = fresh_run_dir(args)
        tok, data_dir = prepare_data(args, run_dir, base.vocab_size)
        config = model_config(base, tok)
    train_stream, val_stream = TokenStream(data_dir, "train"), TokenStream(data_dir, "val")
    loader = PackedLoader(train_stream, settings.batch_size, settings.seq_len, seed=settings.seed)
    val = val_batches(val_stream, settings.batch_size, settings.seq_len, settings.eval_batches)
    model = build_model(config, seed=settings.seed).to(device)  # initialised on the CPU: the same weights on any device
    counts = count_parameters(config)
    print(f"model: {human(counts['total'])} parameters ({human(counts['activated'])} activated per token) "
          f"+ {human(counts['mtp_total'])} in {config.num_nextn_predict_layers} MTP module(s); "
          f"{len(train_stream):,} training tokens; batch {settings.batch_size}x{settings.seq_len}x{settings.grad_accum}; "
          f"{settings.dtype}; " + (f"{torch.get_num_threads()} threads" if device.type == "cpu" else str(device)))
    trainer = Trainer(model, settings, tok, loader, val, run_dir,
                      extra_state={"data_dir": stored_data_dir(data_dir, run_dir), "corpus": corpus,
                                   "args": state.get("args", {}) if resumed else start_args(args)})
    if resumed:
        trainer.load(checkpoint)
    result = trainer.fit(resumed=resumed)
    print(f"\ntrained {result['step']} steps in {result['elapsed'] / 60:.1f} min; "
          f"val loss {result.get('val_loss', float('nan')):.3f}"
          + (f", MTP draft agrees with the model on {100 * result['val_mtp_agree']:.0f}% of val tokens"
             if "val_mtp_agree" in result else ""))
    prompts = args.prompt or (CODE_PROMPTS if corpus == "stdlib" else [tok.decode(val_stream.read(1, 8).tolist())])
    for prompt in prompts:
        text = complete(model, tok, prompt, args.max_new_tokens, temperature=args.temperature)
        print(f"\n--- {prompt!r}\n{text}")
    latest = (run_dir / "latest").resolve()
    print(f"\ncheckpoint: {latest}  (load with nanoseek.load('{run_dir / 'latest'}'))")
    print(f"metrics:    {run_dir / 'metrics.jsonl'}")
    print(f"plot:       {plot_line(run_dir)}")
    return 0
