"""Progress on stderr only for slow steps and only when enabled (the CLI enables it on a TTY);
colour only on a terminal."""
import time

import onnx
import pytest
from click.testing import CliRunner

from normopt import progress
from normopt.cli import cli
from test_fold import conv_bn_chain


@pytest.fixture
def enabled(monkeypatch):
    monkeypatch.setattr(progress, "_enabled", True)
    monkeypatch.setattr(progress, "DELAY", 0.05)


def test_slow_step_is_announced_with_its_time(enabled, capsys):
    progress.DELAY = 0.01
    with progress.step("loading big.onnx"):
        time.sleep(0.5)
    err = capsys.readouterr().err
    assert err.startswith("loading big.onnx ... done in ") and err.endswith(" s\n")


def test_fast_step_and_disabled_progress_print_nothing(enabled, capsys, monkeypatch):
    progress.DELAY = 0.2
    with progress.step("quick"):
        pass
    time.sleep(0.4)  # the timer was cancelled: nothing comes later either
    monkeypatch.setattr(progress, "_enabled", False)
    with progress.step("slow but off"):
        time.sleep(0.1)
    assert capsys.readouterr().err == ""


def test_cli_output_is_plain_off_a_terminal_and_coloured_on_one(tmp_path, rng):
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_chain(rng), path)
    plain = CliRunner().invoke(cli, ["fold", str(path), "--dry-run"])
    assert plain.exit_code == 0 and "\x1b[" not in plain.output
    coloured = CliRunner().invoke(cli, ["fold", str(path), "--dry-run"], color=True)
    assert coloured.exit_code == 0 and "\x1b[32mpassed\x1b[0m" in coloured.output
