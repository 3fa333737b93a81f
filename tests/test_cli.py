import pytest

from leanseek import ModelConfig
from leanseek.cli import main


def test_presets_and_info(capsys):
    main(["presets"])
    out = capsys.readouterr().out
    assert "deepseek-v3" in out and "671.03B" in out and "37.55B" in out
    main(["info", "deepseek-v2-lite"])
    assert "softmax / greedy" in capsys.readouterr().out


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
