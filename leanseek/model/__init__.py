"""The DeepSeek-V3 model: config, modules, and Hugging Face checkpoint interchange."""

from .config import ConfigError, ModelConfig, ParamCounts
from .hf import CheckpointError, load_hf, save_hf
from .moe import Routing
from .transformer import TrainOutput, Transformer

__all__ = ["CheckpointError", "ConfigError", "ModelConfig", "ParamCounts", "Routing", "TrainOutput", "Transformer",
           "load_hf", "save_hf"]
