import pytest
import torch

from leanseek import ModelConfig
from leanseek.cli import main


def test_presets_and_info(capsys):
    main(["presets"])
    out = capsys.readouterr().out
    assert "deepseek-v3" in out and "671.03B" in out and "36.63B" in out
    v3, v4 = (next(line for line in out.splitlines() if line.startswith(name + " ")).split()
              for name in ("deepseek-v3.2", "deepseek-v4-pro"))
    assert v3[-1] == "83.88" and v4[-1] == "9.64"  # KV KiB per token at 1M
    main(["info", "deepseek-v2-lite"])
    assert "softmax / greedy" in capsys.readouterr().out
    main(["info", "deepseek-v4-flash"])
    out = capsys.readouterr().out
    assert "21 CSA (1 entry per 4)" in out and "2 sliding window only" in out and "3 hash-routed" in out


def test_init_then_check_against_transformers(tmp_path, capsys):
    main(["init", "--preset", "tiny", "--out", str(tmp_path / "m")])
    main(["check", str(tmp_path / "m"), "--seq-len", "16"])
    out = capsys.readouterr().out
    assert "finite: True" in out and "(OK)" in out
    main(["info", str(tmp_path / "m" / "config.json")])
    assert f"{ModelConfig.preset('tiny').param_counts().total:,}" in capsys.readouterr().out


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["check", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "config.json not found" in capsys.readouterr().err


def test_every_subcommand_lives_in_one_module(capsys):
    """cli.py only registers: each subcommand's module defines add_arguments and run, its --help reads as
    `leanseek NAME`, and every subcommand that runs a model takes --device."""
    import importlib

    from leanseek.cli import COMMANDS

    runs_a_model = {"check", "chat", "serve", "eval", "distill", "pretrain", "sft", "rl"}
    for name, (module, _, _) in COMMANDS.items():
        m = importlib.import_module(module)
        assert callable(m.add_arguments) and callable(m.run), module
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: leanseek {name} ")
        assert ("--device auto|cpu|cuda[:N]" in out) == (name in runs_a_model), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU that is not there")
def test_a_missing_gpu_is_a_clear_error(tmp_path, capsys):
    for argv in (["check", str(tmp_path)], ["eval", str(tmp_path), "--task", "sums"], ["serve", str(tmp_path)],
                 ["chat", str(tmp_path)]):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--device", "cuda"])
        assert exit_info.value.code == 2
        assert f"leanseek {argv[0]}: error: --device 'cuda': no CUDA GPU is available" in capsys.readouterr().err
