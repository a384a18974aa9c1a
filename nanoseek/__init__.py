"""nanoseek: the DeepSeek-V3 system in readable PyTorch.

    import nanoseek
    model = nanoseek.load("path/to/hf-folder")        # DeepSeek-V3/V2 layout, safetensors (fp8 too)
    logits = model(token_ids)                          # (B, T) -> (B, T, vocab_size)
    nanoseek.save(model, "out/")                       # loads in transformers' DeepseekV3ForCausalLM
    model = nanoseek.build_model(nanoseek.get_preset("tiny"))
    nanoseek.tune_allocator()                          # CPU scripts: reuse freed large blocks (the CLI does)
"""

from .checkpoint import CheckpointError, load, save
from .config import PRESETS, ConfigError, ModelConfig, get_preset
from .model.transformer import DeepSeekModel, build_model
from .inference import generate
from .runtime import tune_allocator

__all__ = [
    "CheckpointError", "ConfigError", "DeepSeekModel", "ModelConfig", "PRESETS",
    "build_model", "generate", "get_preset", "load", "save", "tune_allocator",
]
