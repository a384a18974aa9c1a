"""Training checkpoints: a Hugging Face-layout model folder plus everything needed to continue exactly.

    run_dir/step-000500/   config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
                           trainer_state.json (step, settings, data position, metrics so far),
                           training_state.pt (optimizer moments, RNG), manifest.json (size + sha256 of each file)
    run_dir/latest -> step-000500

A checkpoint is written under a hidden temporary name and renamed into place once complete (the
manifest is the last file written), and older ones are deleted only after that, so a crash at
any moment leaves the previous checkpoint intact. On resume every file is checked against the
manifest: a truncated or corrupt checkpoint is refused with an error naming the file.

A run resumed from an earlier checkpoint than its newest starts a new branch (`branch_from`): the
later checkpoints of the left branch are renamed `abandoned-step-N` at once (kept, not deleted: the
resume may have been a mistake, and a checkpoint of the same step from another device is not the
same), and `latest` points at the branch point, so the new branch's saves, the rotation and a later
`--resume RUN` never meet the old branch.

The training state is a torch file (optimizer state is a nest of tensors and numbers); it is read
with `weights_only=True`, torch's restricted unpickler that cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import CheckpointError, load_weights, replace_dir, save
from ..config import ConfigError
from ..data import DataError
from ..model.transformer import DeepSeekModel
from ..runtime import DeviceError
from ..tokenizer import Tokenizer, TokenizerError

STATE_FILE = "trainer_state.json"
TENSORS_FILE = "training_state.pt"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# what a save killed midway leaves: .step-N.partial, the temporary folder save() makes beside it
# (..step-N.partial.tmp-XXXX) and replace_dir()'s swapped-out folders (.step-N.old-PID,
# ..step-N.partial.old-PID); each holds up to a whole checkpoint
_STALE = re.compile(r"^\.\.?step-\d+\.(partial|old-)")
# the trainer_state.json keys each command needs to resume a run: a run of the other command lacks them
_RESUME_KEYS = {"train": ("data_dir", "corpus"), "sft": ("data", "init", "val_fraction")}
# errors the commands report as a one-line message: bad input or a damaged checkpoint
USER_ERRORS = (CheckpointError, ConfigError, DataError, DeviceError, TokenizerError)


def report_user_errors(command: str, body: Callable[[], int | None], more_errors: tuple = ()) -> int:
    """Run a command's body: its exit status (0 for None), or, on bad input or a damaged checkpoint
    (USER_ERRORS and more_errors), a one-line message and status 2 instead of a traceback. So is
    an OSError (an --out that cannot be written, a full disk while writing metrics or the plot):
    its message names the path, which is what the user can act on. NANOSEEK_DEBUG=1 lets them
    through with their tracebacks, for when the cause is in the code."""
    try:
        status = body()
    except (*USER_ERRORS, *more_errors, OSError) as e:
        if os.environ.get("NANOSEEK_DEBUG", "") not in ("", "0"):
            raise
        print(f"nanoseek {command}: error: {e}", file=sys.stderr)
        return 2
    return 0 if status is None else status


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(run_dir: str | os.PathLike, model: DeepSeekModel, tokenizer: Tokenizer, state: dict,
                    tensors: dict, keep: int = 2) -> Path:
    """Write run_dir/step-{state['step']}, point run_dir/latest at it, keep the newest `keep`.
    A failed write (a full disk) raises CheckpointError, its temporary folder removed."""
    run_dir = Path(run_dir)
    name = f"step-{state['step']:06d}"
    partial = run_dir / f".{name}.partial"
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    extra = {**tokenizer.files(), STATE_FILE: json.dumps(state, indent=1) + "\n", TENSORS_FILE: buffer.getvalue()}
    final = run_dir / name
    link = run_dir / f".latest-{os.getpid()}"
    try:
        save(model, partial, extra_files=extra)
        manifest = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(partial.iterdir()) if f.is_file()}
        with open(partial / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        replace_dir(partial, final)
        _point_latest(run_dir, name, link)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        if link.is_symlink():
            link.unlink()
        raise CheckpointError(f"could not write checkpoint {final}: {e}") from e
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    for stale in run_dir.iterdir():
        if _STALE.match(stale.name) and stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _point_latest(run_dir: Path, name: str, link: Path) -> None:
    """run_dir/latest -> name, replaced atomically through the temporary symlink `link`."""
    link.unlink(missing_ok=True)
    link.symlink_to(name)
    if (run_dir / "latest").is_dir() and not (run_dir / "latest").is_symlink():
        shutil.rmtree(run_dir / "latest")  # a copy of a checkpoint, left by copying the run without symlinks
    os.replace(link, run_dir / "latest")


def branch_from(checkpoint: str | os.PathLike) -> list[Path]:
    """Resuming from `checkpoint` while its run holds later ones: set those aside (renamed
    abandoned-step-N) and point `latest` at `checkpoint`. Returns what was set aside."""
    checkpoint = Path(checkpoint).resolve()
    run_dir = checkpoint.parent
    checkpoints = [c.resolve() for c in list_checkpoints(run_dir)]
    later = checkpoints[checkpoints.index(checkpoint) + 1:] if checkpoint in checkpoints else []
    for abandoned in later:
        _set_aside(abandoned)
    if later:
        _point_latest(run_dir, checkpoint.name, run_dir / f".latest-{os.getpid()}")
    return later


def _set_aside(checkpoint: Path) -> None:
    """Rename a checkpoint of a left branch to abandoned-step-N (abandoned-step-N.2, ... if taken):
    resume and rotation only see step-N folders, and nothing the user trained is deleted."""
    aside, n = checkpoint.with_name(f"abandoned-{checkpoint.name}"), 1
    while aside.exists():
        n += 1
        aside = checkpoint.with_name(f"abandoned-{checkpoint.name}.{n}")
    os.rename(checkpoint, aside)
    print(f"note: resuming from an earlier checkpoint: {checkpoint.name} is kept as {aside.name}", file=sys.stderr)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """step-N folders of a run, oldest first."""
    run_dir = Path(run_dir)
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))] if run_dir.is_dir() else []
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise CheckpointError unless every file listed in the manifest is there, whole and unchanged."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(f"{path} has no {MANIFEST}: not a complete training checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{manifest_path} is corrupt ({e})") from e
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{manifest_path} is corrupt: expected a JSON object, got {type(manifest).__name__}")
    for name, info in manifest.items():
        if not (isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("sha256"), str)):
            raise CheckpointError(f"{manifest_path} is corrupt: its entry for {name} is not {{\"bytes\", \"sha256\"}}")
        file = path / name
        if not file.exists():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        size = file.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint file {file} is truncated or altered: {size} bytes, expected {info['bytes']}")
        if _sha256(file) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {file} is corrupt: its sha256 does not match {MANIFEST}")


def resolve_resume(path: str | os.PathLike) -> Path:
    """A checkpoint folder (verified; an error if damaged), or a run folder: its newest intact checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"nothing to resume at {path}")
    if (path / MANIFEST).exists() or (path / STATE_FILE).exists() or not list_checkpoints(path):
        verify_checkpoint(path)
        return path.resolve()
    for candidate in reversed(list_checkpoints(path)):
        try:
            verify_checkpoint(candidate)
            return candidate
        except CheckpointError as e:
            warnings.warn(f"refusing checkpoint {candidate.name}: {e}; trying the previous one")
    raise CheckpointError(f"no intact checkpoint in {path}")


def read_state(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text())


def check_resumable_by(command: str, state: dict, checkpoint: str | os.PathLike) -> None:
    """Raise CheckpointError unless `nanoseek {command}` wrote this checkpoint's state."""
    if all(key in state for key in _RESUME_KEYS[command]):
        return
    writer = next((c for c, keys in _RESUME_KEYS.items() if all(key in state for key in keys)), None)
    if writer:
        raise CheckpointError(f"{checkpoint} is a `nanoseek {writer}` run, not a `nanoseek {command}` one: "
                              f"continue it with nanoseek {writer} --resume")
    raise CheckpointError(f"{checkpoint} was not written by `nanoseek {command}`: its {STATE_FILE} lacks "
                          + ", ".join(k for k in _RESUME_KEYS[command] if k not in state))


def load_checkpoint(path: str | os.PathLike, model: DeepSeekModel) -> tuple[dict, dict]:
    """Verify, fill model's weights, and return (trainer_state.json, training_state.pt contents)."""
    path = Path(path)
    verify_checkpoint(path)
    load_weights(model, path)
    try:
        tensors = torch.load(path / TENSORS_FILE, weights_only=True, map_location="cpu")  # resumable on another device
    except Exception as e:  # torch raises several kinds for a damaged file
        raise CheckpointError(f"{path / TENSORS_FILE}: unreadable training state ({e})") from e
    return read_state(path), tensors
