"""What the benchmarks share: the machine a figure was measured on, best-of timing, and a model to time."""

import time
from pathlib import Path

import torch


def model_or_preset(model: str | None, preset: str):
    """The model of a run folder or checkpoint, else a random model of the preset (through a Hugging Face folder,
    as a trained one would be loaded)."""
    import tempfile

    import leanseek
    from leanseek.train.checkpoint import checkpoint_of

    if model:
        return leanseek.load_hf(checkpoint_of(Path(model)))
    with tempfile.TemporaryDirectory() as tmp:
        leanseek.save_hf(leanseek.Transformer(leanseek.ModelConfig.preset(preset)), tmp)
        return leanseek.load_hf(tmp)


def cpu_model() -> str:
    """The CPU's model name and the vector instructions PyTorch's kernels (and inductor's code) use on it: the
    same model name can be AVX-512 on one machine and AVX2-only on another (or AVX2 by ATEN_CPU_CAPABILITY)."""
    from leanseek.device import cpu_name

    return f"{cpu_name()} ({torch.backends.cpu.get_cpu_capability()})"


def best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
