"""leanseek: DeepSeek-V3/R1-style models, trained, studied and served cheaply, interchangeable with Hugging Face."""

import os

# Large CPU tensors on transparent huge pages (PyTorch's allocator madvises allocations of 2 MiB and more when this is
# set, before its first): decoding reads every weight of a big model per token, and fewer TLB misses made batch-1
# int8 decode of 8 layers of DeepSeek-V2-Lite's shape 17% faster (AMD EPYC); training speed unchanged.
# THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .infer import Engine  # noqa: E402
from .infer.engine import compile_cache  # noqa: E402
from .model import CheckpointError, ConfigError, ModelConfig, Transformer, load_hf, save_hf  # noqa: E402

# torch.compile's cache in leanseek's folder unless TORCHINDUCTOR_CACHE_DIR says otherwise; set now, because the
# first import of some torch modules (torch.distributed's, which training imports) writes torch's default (/tmp)
# into the environment
compile_cache()

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "Engine", "ModelConfig", "Transformer", "load_hf", "save_hf"]
