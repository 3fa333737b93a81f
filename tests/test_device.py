"""The device policy (leanseek.device): what --device picks, the errors for devices that are not there, TF32 and
bf16 on GPUs, and a bf16 model generating through the engine (what serve, chat and eval run on a GPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomise, small_config

import leanseek
from leanseek.device import default_price, inference_dtype, pick_device


class FakeGPUs:
    """`count` CUDA devices of compute capability `capability`, as torch.cuda reports them; records what the
    policy sets torch's float32 matmul precision to."""

    def __init__(self, monkeypatch, count: int, capability=(9, 0)):
        self.precision = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch, "set_float32_matmul_precision", self.precision.append)
        monkeypatch.delenv("LOCAL_RANK", raising=False)


def test_auto_is_the_first_gpu_or_the_local_rank_one(monkeypatch):
    gpus = FakeGPUs(monkeypatch, 4)
    assert pick_device() == torch.device("cuda", 0)
    assert pick_device("auto", local_rank=2) == torch.device("cuda", 2)
    monkeypatch.setenv("LOCAL_RANK", "3")  # under torchrun
    assert pick_device("auto") == torch.device("cuda", 3)
    assert pick_device("cuda") == torch.device("cuda", 3)
    assert pick_device("cuda:1") == torch.device("cuda", 1)  # an explicit index wins
    assert pick_device("cpu") == torch.device("cpu")
    assert gpus.precision == ["high"] * 5  # TF32 for float32 matmuls, on each GPU pick (not for the CPU)


def test_auto_without_a_gpu_is_the_cpu(monkeypatch):
    gpus = FakeGPUs(monkeypatch, 0)
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun on a CPU machine: gloo processes, all on the CPU
    assert pick_device() == torch.device("cpu")
    assert gpus.precision == []


@pytest.mark.parametrize("spec, message", [
    ("gpu", "expected auto, cpu, cuda or cuda:N"), ("cuda:x", "expected auto, cpu, cuda or cuda:N"),
    ("mps", "expected auto, cpu, cuda or cuda:N"), ("cpu:1", "expected auto, cpu, cuda or cuda:N"),
    ("cuda:2", "GPU 2 is not there \\(2 visible\\)")])
def test_bad_specs_are_named(monkeypatch, spec, message):
    FakeGPUs(monkeypatch, 2)
    with pytest.raises(ValueError, match=f"--device '{spec}': {message}"):
        pick_device(spec)


def test_asking_for_a_gpu_without_one_is_a_clear_error(monkeypatch):
    FakeGPUs(monkeypatch, 0)
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=f"--device '{spec}': no CUDA GPU is available.*use --device cpu"):
            pick_device(spec)


def test_inference_dtype_and_default_price(monkeypatch):
    assert inference_dtype(torch.device("cpu")) == torch.float32
    FakeGPUs(monkeypatch, 1, capability=(8, 0))  # Ampere and later: bf16 tensor cores
    assert inference_dtype(torch.device("cuda", 0)) == torch.bfloat16
    FakeGPUs(monkeypatch, 1, capability=(7, 0))  # a V100 emulates bf16: float32 there
    assert inference_dtype(torch.device("cuda", 0)) == torch.float32
    assert default_price(torch.device("cpu")) == 0.05
    assert default_price(torch.device("cuda", 0)) == 2.0


def test_a_bf16_model_generates_through_the_engine(tmp_path):
    """A checkpoint loaded in bf16, as serve, chat and eval load it on a GPU: the routing bias stays float32, the
    cache is bf16, and each greedy token, plain or speculative, is the argmax of a full bf16 forward pass over the
    sequence up to rounding (near-ties may break either way: the cache splits the computation differently)."""
    torch.manual_seed(0)
    leanseek.save_hf(randomise(leanseek.Transformer(small_config(vocab_size=97, num_nextn_predict_layers=1)),
                               seed=4), tmp_path)
    model = leanseek.load_hf(tmp_path, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert {r.e_score_correction_bias.dtype for r in model.routers()} == {torch.float32}
    engine = leanseek.Engine(model, max_batch=2, max_len=64)
    assert engine.cache.kv.dtype == torch.bfloat16
    prompts = [[5, 17, 3], [1, 2, 3, 4, 5, 6, 7]]
    for speculative in (False, True):
        outs = engine.generate(prompts, max_new_tokens=12, temperature=0.0, speculative=speculative)
        for prompt, out in zip(prompts, outs):
            assert len(out) == 12
            with torch.no_grad():
                logits = model(torch.tensor([prompt + out]))[0, len(prompt) - 1:-1].float()
            shortfall = logits.max(-1).values - logits[torch.arange(len(out)), out]
            assert shortfall.max() < 0.05 * logits.std(), (speculative, shortfall)


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(not THP.exists() or "[madvise]" not in THP.read_text(),
                    reason="transparent huge pages are not in madvise mode here (always: on anyway; never: off)")
def test_large_cpu_tensors_get_huge_pages_unless_turned_off():
    """Importing leanseek asks PyTorch's CPU allocator for transparent huge pages (fewer TLB misses when decoding
    reads every weight); THP_MEM_ALLOC_ENABLE=0 keeps the kernel's default."""
    code = ("import leanseek, torch\nx = torch.ones(256 << 20, dtype=torch.uint8)\n"
            "print(open('/proc/self/smaps_rollup').read().split('AnonHugePages:')[1].split()[0])")
    huge = {}
    for setting in (None, "0"):
        env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        if setting is not None:
            env["THP_MEM_ALLOC_ENABLE"] = setting
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        huge[setting] = int(out.stdout.split()[-1])  # kB
    assert huge[None] >= 128 << 10 and huge["0"] < 128 << 10, huge
