"""A damaged checkpoint loses no work that an older one holds: checkpoints record their files' checksums, resuming
falls back past a damaged checkpoint to the newest that verifies, and every loader names the damaged file."""

import json
import os
import shutil

import pytest
import torch
from conftest import randomise, small_config
from test_pretrain import command, data_dir, losses, run  # noqa: F401 (data_dir: a fixture)

import leanseek
from leanseek import CheckpointError
from leanseek.cli import main
from leanseek.train.checkpoint import latest_checkpoint
from leanseek.train.integrity import seal, verify

# how each kind of damage reads in the error
DAMAGE = {"truncated": "is truncated", "zeroed": "is corrupted", "missing": "is missing"}


def damage(file, how: str) -> None:
    if how == "truncated":
        os.truncate(file, file.stat().st_size // 2)
    elif how == "zeroed":  # same size: only the checksum tells
        file.write_bytes(bytes(file.stat().st_size))
    else:
        file.unlink()


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):  # noqa: F811
    """An undamaged 12-step run with checkpoints at steps 3, 6, 9 and 12."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run(command(data_dir, out, 12, "--keep", "4"))
    return out


def copy_run(straight, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight, out, symlinks=True)
    return out


def step_names(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))


def test_resume_falls_back_past_damaged_checkpoints(straight, data_dir, tmp_path):  # noqa: F811
    """The newest three checkpoints damaged, one way each: the same command resumes from the fourth, names each
    damaged file, and ends where the undamaged run did."""
    out = copy_run(straight, tmp_path)
    files = {how: out / "checkpoints" / f"step-{step:06d}" / "model.safetensors"
             for how, step in zip(DAMAGE, (12, 9, 6))}
    for how, file in files.items():
        damage(file, how)
    done = run(command(data_dir, out, 12, "--keep", "4"))
    for how, file in files.items():
        assert f"{file} {DAMAGE[how]}" in done.stderr
    assert done.stderr.count("resuming from step-000003") == 3
    assert losses(out) == losses(straight)  # steps 4-12 redone bit for bit: nothing lost
    assert step_names(out) == ["step-000003", "step-000006", "step-000009", "step-000012"]
    for name in step_names(out):
        verify(out / "checkpoints" / name)  # rewritten whole
    assert os.readlink(out / "latest") == "checkpoints/step-000012"


def test_every_loader_names_the_damaged_file(straight, tmp_path, capsys):
    out = copy_run(straight, tmp_path)
    newest = out / "checkpoints" / "step-000012"
    damage(newest / "model.safetensors", "zeroed")
    commands = [["check", str(newest)], ["serve", str(newest)], ["chat", str(newest)],
                ["eval", str(newest), "--task", "addition"],
                ["sft", "--init", str(newest), "--data", "builtin", "--out", str(tmp_path / "sft")],
                ["export", str(newest), "--gguf", str(tmp_path / "m.gguf")]]
    for argv in commands:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2, argv
        err = capsys.readouterr().err
        assert err == f"leanseek {argv[0]}: error: {newest / 'model.safetensors'} is corrupted: same size as " \
                      "written, but its SHA-256 differs from checksums.json's\n"
    with pytest.raises(CheckpointError, match="step-000012/model.safetensors is corrupted"):
        leanseek.load_hf(newest)
    # a run folder's newest intact checkpoint stands in, and the skipped one is named once
    assert latest_checkpoint(out) == latest_checkpoint(out) == out / "checkpoints" / "step-000009"
    err = capsys.readouterr().err
    assert err.count("step-000012/model.safetensors is corrupted") == 1 and "resuming from step-000009" in err


def test_pruning_keeps_intact_checkpoints_when_resuming_before_damage(straight, data_dir, tmp_path):  # noqa: F811
    """Resumed at 9 past a damaged 12, saving every 5 with --keep 2: the damaged 12 goes at the first save rather
    than count toward --keep (which would end with 12 and 13, one of them damaged)."""
    out = copy_run(straight, tmp_path)
    damage(out / "checkpoints" / "step-000012" / "optimizer.safetensors", "truncated")  # load_hf never reads it
    done = run(command(data_dir, out, 13, "--save-every", "5", "--keep", "2"))
    assert "step-000012/optimizer.safetensors is truncated" in done.stderr
    assert step_names(out) == ["step-000010", "step-000013"]
    for name in step_names(out):
        verify(out / "checkpoints" / name)


def test_no_intact_checkpoint_is_an_error_that_deletes_nothing(straight, tmp_path):
    out = copy_run(straight, tmp_path)
    for name in step_names(out):
        damage(out / "checkpoints" / name / "trainer_state.json", "missing")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*step-000012/trainer_state.json is missing; "
                                              r".*step-000003/trainer_state.json is missing"):
        latest_checkpoint(out)
    assert step_names(out) == ["step-000003", "step-000006", "step-000009", "step-000012"]


@pytest.fixture
def saved(tmp_path):
    model = randomise(leanseek.Transformer(small_config()), 3)
    return leanseek.save_hf(model, tmp_path / "ckpt")


@pytest.mark.parametrize("how", DAMAGE)
def test_verify_checks_every_file_recursively(how, saved):
    (saved / "shards").mkdir()
    (saved / "shards" / "rank-1.bin").write_bytes(os.urandom(1000))
    seal(saved)
    recorded = json.loads((saved / "checksums.json").read_text())["files"]
    assert set(recorded) == {"config.json", "model.safetensors", "shards/rank-1.bin"}
    verify(saved)
    (saved / "notes.txt").write_text("added later")  # files added after sealing are not damage
    verify(saved)
    damage(saved / "shards" / "rank-1.bin", how)
    with pytest.raises(CheckpointError, match=f"shards/rank-1.bin {DAMAGE[how]}"):
        verify(saved)


def test_verify_reports_sizes_and_a_damaged_checksum_list(saved):
    seal(saved)
    size = (saved / "model.safetensors").stat().st_size
    with open(saved / "model.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(CheckpointError, match=f"has {size + 1:,} bytes where {size:,} were written"):
        leanseek.load_hf(saved)
    os.truncate(saved / "model.safetensors", 100)
    with pytest.raises(CheckpointError, match=rf"model.safetensors is truncated \(100 of {size:,} bytes\)"):
        verify(saved)
    damage(saved / "checksums.json", "truncated")
    with pytest.raises(CheckpointError, match="checksums.json is damaged"):
        verify(saved)


def test_unsealed_folders_are_accepted_and_their_damage_named_by_load_hf(saved):
    """A folder without checksums.json (written before checkpoints were sealed, or by another tool) loads as
    before; a damaged safetensors or config file is still named rather than raised as a library's error."""
    want = leanseek.load_hf(saved).embed_tokens.weight
    verify(saved)
    file = saved / "model.safetensors"
    data = file.read_bytes()
    for how in ("truncated", "zeroed"):
        damage(file, how)
        with pytest.raises(CheckpointError, match=f"{file} is damaged .* not a complete safetensors file"):
            leanseek.load_hf(saved)
        file.write_bytes(data)
    assert torch.equal(leanseek.load_hf(saved).embed_tokens.weight, want)
    config = (saved / "config.json").read_text()
    for bad, message in ((b"\xff\x00garbage", "config.json is not valid JSON"),
                         (b"[1, 2]", "config.json holds a JSON list"),
                         (config.replace('"hidden_size": 32', '"hidden_size": "wide"').encode(), "config.json: ")):
        (saved / "config.json").write_bytes(bad)
        with pytest.raises(CheckpointError, match=message):
            leanseek.load_hf(saved)


def test_sharded_folder_names_a_missing_or_damaged_shard_and_index(tmp_path):
    model = randomise(leanseek.Transformer(small_config()), 4)
    path = leanseek.save_hf(model, tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted(path.glob("model-*.safetensors"))
    index = (path / "model.safetensors.index.json").read_text()
    damage(shards[1], "truncated")
    with pytest.raises(CheckpointError, match=f"{shards[1]} is damaged"):
        leanseek.load_hf(path)
    damage(shards[1], "missing")
    with pytest.raises(CheckpointError, match=f"{shards[1]} is listed in model.safetensors.index.json but missing"):
        leanseek.load_hf(path)
    (path / "model.safetensors.index.json").write_text(index[: len(index) // 2])
    with pytest.raises(CheckpointError, match="index.json is damaged"):
        leanseek.load_hf(path)
