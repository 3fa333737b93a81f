"""leanseek: DeepSeek-V3/R1-style models, trained, studied and served cheaply, interchangeable with Hugging Face."""

from .infer import Engine
from .model import CheckpointError, ConfigError, ModelConfig, Transformer, load_hf, save_hf

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "Engine", "ModelConfig", "Transformer", "load_hf", "save_hf"]
