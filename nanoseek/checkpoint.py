"""Load and save models as Hugging Face DeepseekV3-layout folders of safetensors.

A folder holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Routed experts are stored per expert
(`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`); MTP module k as layer
num_hidden_layers + k. FP8 e4m3 weights with 128x128 block scales (`weight_scale_inv`, the format
DeepSeek-V3 is released in) are dequantised on load. Only safetensors are read: a pickle from a
user's path could run arbitrary code, so `.bin` checkpoints are refused.

Saving writes to a temporary folder and renames it into place, so a crash never leaves a
half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig, read_config_json
from .data import apply_umask
from .model.transformer import DeepSeekModel, build_model

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FP8_BLOCK = 128
_EXPERTS_RE = re.compile(r"^(.*\.mlp\.experts\.)(gate_up_proj|down_proj)$")


class CheckpointError(ValueError):
    """A checkpoint folder is missing, truncated, or does not match its config; names the tensor."""


@dataclass
class _Target:
    shape: tuple[int, ...]
    write: Callable[[torch.Tensor], None]
    required: bool = True
    covers: tuple[str, ...] = ()  # per-expert keys that a fused expert tensor fills at once


def _hf_name(model: DeepSeekModel, name: str) -> str:
    """Internal parameter name -> checkpoint key (MTP module k lives at layer L + k)."""
    if name.startswith("mtp."):
        k, rest = name[len("mtp."):].split(".", 1)
        return f"model.layers.{model.config.num_hidden_layers + int(k)}.{rest}"
    return name


def _targets(model: DeepSeekModel) -> dict[str, _Target]:
    """Every checkpoint key the model reads, with its expected shape and where it goes."""
    cfg = model.config
    targets: dict[str, _Target] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        key = _hf_name(model, name)
        match = _EXPERTS_RE.match(key)
        if match is None:
            targets[key] = _Target(tuple(tensor.shape), lambda src, t=tensor: t.data.copy_(src))
            continue
        prefix, kind = match.groups()
        E, I, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        t = tensor.data
        if kind == "gate_up_proj":
            for e in range(E):
                targets[f"{prefix}{e}.gate_proj.weight"] = _Target((I, D), lambda s, e=e, t=t: t[e, :, :I].copy_(s.T))
                targets[f"{prefix}{e}.up_proj.weight"] = _Target((I, D), lambda s, e=e, t=t: t[e, :, I:].copy_(s.T))
            # transformers-style fused layout, (E, 2I, D), accepted on load
            covers = tuple(f"{prefix}{e}.{p}_proj.weight" for e in range(E) for p in ("gate", "up"))
            targets[key] = _Target((E, 2 * I, D), lambda s, t=t: t.copy_(s.transpose(1, 2)), False, covers)
        else:
            for e in range(E):
                targets[f"{prefix}{e}.down_proj.weight"] = _Target((D, I), lambda s, e=e, t=t: t[e].copy_(s.T))
            covers = tuple(f"{prefix}{e}.down_proj.weight" for e in range(E))
            targets[key] = _Target((E, D, I), lambda s, t=t: t.copy_(s.transpose(1, 2)), False, covers)
    # DeepSeek stores copies of the shared embedding and head with every MTP module.
    for k in range(cfg.num_nextn_predict_layers):
        layer = f"model.layers.{cfg.num_hidden_layers + k}"
        noop = lambda src: None  # noqa: E731
        targets[f"{layer}.embed_tokens.weight"] = _Target((cfg.vocab_size, cfg.hidden_size), noop, False)
        targets[f"{layer}.shared_head.head.weight"] = _Target((cfg.vocab_size, cfg.hidden_size), noop, False)
    return targets


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{index}: not UTF-8 text ({e})") from e
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard files, got {type(weight_map).__name__}")
        for key, name in weight_map.items():
            if not isinstance(name, str):
                raise CheckpointError(f"{index}: tensor {key} is mapped to {name!r}, not a shard file name")
        files = sorted(set(weight_map.values()))
        for name in files:
            if "/" in name or "\\" in name or name.startswith("."):
                raise CheckpointError(f"{index}: shard name {name!r} points outside the folder")
            if not (path / name).exists():
                raise CheckpointError(f"{index} lists {name}, which is missing from {path}")
        return [path / name for name in files]
    if (path / SINGLE_FILE).exists():
        return [path / SINGLE_FILE]
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if others:
        return [path / name for name in others]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise CheckpointError(
            f"{path} holds only pickle checkpoints (.bin/.pt); nanoseek reads safetensors only, because "
            "unpickling a file can run arbitrary code. Convert it with a trusted tool first."
        )
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """e4m3 weight (out, in) times its per-block scale (ceil(out/128), ceil(in/128)) -> fp32."""
    if weight.dim() != 2:
        raise CheckpointError(f"block-scaled fp8 weights are matrices, not of shape {tuple(weight.shape)}")
    out_dim, in_dim = weight.shape
    rows = (out_dim + block - 1) // block
    cols = (in_dim + block - 1) // block
    if tuple(scale_inv.shape) != (rows, cols):
        raise CheckpointError(f"block scale of shape {tuple(scale_inv.shape)} does not fit a weight of {tuple(weight.shape)}")
    scale = scale_inv.float().repeat_interleave(block, 0)[:out_dim].repeat_interleave(block, 1)[:, :in_dim]
    return weight.float() * scale


def _checkpoint_dtype(raw_config: dict) -> torch.dtype:
    name = raw_config.get("dtype") or raw_config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
        return torch.bfloat16  # an fp8 release is served in bf16
    return dtype


def load(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> DeepSeekModel:
    """Load a Hugging Face-layout folder into a DeepSeekModel (in `dtype`, default: the checkpoint's).

    The model comes in evaluation mode, as transformers' from_pretrained gives it (a vision stem's
    batch norms and the tower's stochastic depth act only in training mode); call .train() to train it."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder")
    config_path = path / CONFIG_NAME
    if not config_path.exists():
        raise CheckpointError(f"{path} has no {CONFIG_NAME}")
    raw_config = read_config_json(config_path)
    config = _match_mtp_depth(ModelConfig.from_json(config_path, raw_config), path)
    dtype = dtype or _checkpoint_dtype(raw_config)
    model = build_model(config, dtype=dtype, device=device, init=False)
    load_weights(model, path)
    return model.eval()


def _checkpoint_keys(path: Path) -> set[str]:
    keys: set[str] = set()
    for file in _weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                keys.update(f.keys())
        except SafetensorError as e:
            raise CheckpointError(f"{file}: unreadable safetensors file (truncated or corrupt?): {e}") from e
    return keys


def _match_mtp_depth(config: ModelConfig, path: Path) -> ModelConfig:
    """Checkpoints converted without their MTP layers (transformers drops them) load as depth 0."""
    if not config.num_nextn_predict_layers:
        return config
    keys = _checkpoint_keys(path)
    present = 0
    while present < config.num_nextn_predict_layers and any(
        key.startswith(f"model.layers.{config.num_hidden_layers + present}.") for key in keys
    ):
        present += 1
    if present < config.num_nextn_predict_layers:
        warnings.warn(
            f"{path}: config.json declares {config.num_nextn_predict_layers} MTP module(s) but the weights hold "
            f"{present}; loading with num_nextn_predict_layers={present}"
        )
        config = config.replace(num_nextn_predict_layers=present)
    return config


def load_weights(model: DeepSeekModel, path: str | os.PathLike) -> None:
    """Fill every parameter of `model` from the folder; fails naming any missing, unexpected or mis-shaped tensor."""
    path = Path(path)
    targets = _targets(model)
    filled: set[str] = set()
    unexpected: list[str] = []
    files = _weight_files(path)
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                keys = list(f.keys())
                key_set = set(keys)
                for key in keys:
                    if key.endswith("_scale_inv") or key.endswith("rotary_emb.inv_freq"):
                        continue
                    target = targets.get(key)
                    if target is None:
                        # transformers writes empty shared_experts tensors when n_shared_experts is 0
                        if 0 not in f.get_slice(key).get_shape():
                            unexpected.append(key)
                        continue
                    tensor = f.get_tensor(key)
                    if tuple(tensor.shape) != target.shape:  # checked first: dequantising keeps the shape
                        raise CheckpointError(
                            f"tensor {key} in {file.name} has shape {tuple(tensor.shape)}, "
                            f"but the config expects {target.shape}"
                        )
                    if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                        scale_key = key + "_scale_inv"
                        scale = f.get_tensor(scale_key) if scale_key in key_set else _find_tensor(scale_key, files)
                        if scale is None:
                            raise CheckpointError(f"{file.name}: fp8 tensor {key} has no {scale_key}")
                        try:
                            tensor = dequantize_fp8(tensor, scale)
                        except CheckpointError as e:  # which of the checkpoint's tensors, and where
                            raise CheckpointError(f"fp8 tensor {key} in {file.name}: {e}") from e
                    target.write(tensor)
                    filled.add(key)
                    filled.update(target.covers)
        except SafetensorError as e:
            raise CheckpointError(f"{file}: unreadable safetensors file (truncated or corrupt?): {e}") from e
    if unexpected:
        shown = ", ".join(sorted(unexpected)[:8])
        raise CheckpointError(f"{len(unexpected)} unexpected tensor(s) not in the model described by config.json: {shown}")
    missing = sorted(key for key, t in targets.items() if t.required and key not in filled)
    if missing:
        shown = ", ".join(missing[:8])
        raise CheckpointError(f"{len(missing)} tensor(s) missing from {path}: {shown}")


def _find_tensor(key: str, files: list[Path]) -> torch.Tensor | None:
    """`key` from whichever shard holds it, or None. An fp8 weight's block scale usually sits beside
    it, but a checkpoint re-sharded by size may put the pair in neighbouring shards (DeepSeek's own
    fp8_cast_bf16.py looks each scale up through the index for this reason)."""
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            if key in f.keys():
                return f.get_tensor(key)
    return None


def state_dict_hf(model: DeepSeekModel, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: per-expert keys, MTP modules at layer L + k with the shared copies."""
    cfg = model.config
    out: dict[str, torch.Tensor] = {}

    def put(key: str, tensor: torch.Tensor):
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point() and not key.endswith(("gate.weight", "e_score_correction_bias")):
            tensor = tensor.to(dtype)
        out[key] = tensor.contiguous().clone() if not tensor.is_contiguous() else tensor.clone()

    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        key = _hf_name(model, name)
        match = _EXPERTS_RE.match(key)
        if match is None:
            put(key, tensor)
            continue
        prefix, kind = match.groups()
        I = cfg.moe_intermediate_size
        for e in range(cfg.n_routed_experts):
            if kind == "gate_up_proj":
                put(f"{prefix}{e}.gate_proj.weight", tensor[e, :, :I].T)
                put(f"{prefix}{e}.up_proj.weight", tensor[e, :, I:].T)
            else:
                put(f"{prefix}{e}.down_proj.weight", tensor[e].T)
    for k in range(cfg.num_nextn_predict_layers):
        layer = f"model.layers.{cfg.num_hidden_layers + k}"
        put(f"{layer}.embed_tokens.weight", model.model.embed_tokens.weight)
        put(f"{layer}.shared_head.head.weight", model.lm_head.weight)
    return out


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", size.upper())
    if not match:
        raise ValueError(f"cannot read shard size {size!r}; use bytes or e.g. '2GB'")
    return int(float(match.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match.group(2)])


def save(
    model: DeepSeekModel,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "2GB",
    extra_files: dict[str, str | bytes] | None = None,
) -> Path:
    """Write `model` as a Hugging Face-layout folder at `path`, atomically (temp folder + rename).

    extra_files (name -> content) are written beside the weights (tokenizer files, training state).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = state_dict_hf(model, dtype)
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors, key=_natural_key):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    model.config.warn_transformers_mismatches()
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        config = model.config.to_dict()
        config["dtype"] = str(dtype or model.dtype).removeprefix("torch.")
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if len(shards) == 1:
            _save_shard(shards[0], tmp / SINGLE_FILE)
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                _save_shard(shard, tmp / name)
                for key, t in shard.items():
                    weight_map[key] = name
                    total += t.numel() * t.element_size()
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        for name, content in (extra_files or {}).items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content if isinstance(content, bytes) else content.encode())
        apply_umask(tmp)  # mkdtemp's 0700 would otherwise make the checkpoint owner-only
        _fsync_tree(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _save_shard(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """save_file, with a failed write raised as the OSError it is: safetensors reports a full disk
    (any I/O error) as its own SafetensorError, which the commands would show as a traceback
    instead of their one-line message naming the path."""
    try:
        save_file(tensors, str(file), metadata={"format": "pt"})
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise OSError(f"could not write {file}: {e}") from e
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(file)) from e


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder src to dst; an existing dst is swapped out, then removed."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)  # left by a killed process that had this pid
        os.rename(dst, old)
    try:
        os.rename(src, dst)
    except OSError:
        if old is not None:
            os.rename(old, dst)  # a failed replace keeps what was there
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(dst.parent)


def _fsync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _natural_key(key: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]
