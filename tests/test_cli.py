"""The command line: demo and info."""

from __future__ import annotations

from medcam3d.cli import main


def test_demo_finds_planted_lesion(capsys):
    assert main(["demo", "--synthetic", "--size", "48", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "7/7 methods" in out and "hirescam" in out


def test_info_lists_versions(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "hirescam" in out
