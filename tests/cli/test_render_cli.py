"""``scoredistill render RUN_DIR|SCENE.ply --views N --out DIR``: one PNG per view with fixed names and a
grid, the same default orbit cameras as a run, one-line errors (exit 2), and never a folder the library
did not create."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from scoredistill.cli.main import main
from scoredistill.splat import GaussianSplats, render, turntable

pytestmark = pytest.mark.usefixtures("one_thread")


def run(*args):
    try:
        return main(["render", *args])
    except SystemExit as e:
        return e.code


@pytest.fixture
def ply(tmp_path):
    path = str(tmp_path / "s.ply")
    GaussianSplats.sphere(60, 0.3, seed=1).save_ply(path)
    return path


def test_renders_views_and_grid_of_a_ply(tmp_path, ply):
    out = str(tmp_path / "views")
    assert run(ply, "--views", "3", "--size", "16", "--out", out) == 0
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == [
        "grid.png", "view_000.png", "view_001.png", "view_002.png"]
    # view 1 is the turntable's second azimuth on a white background (a bare PLY)
    want = render(GaussianSplats.from_ply(ply), turntable(3)[1], 16, 16, (1.0, 1.0, 1.0)).images[0]
    got = torch.from_numpy(np.array(Image.open(os.path.join(out, "view_001.png")))).permute(2, 0, 1) / 255
    assert (got - want).abs().max() <= 1 / 255 + 1e-6
    # again into its own folder with fewer views: the old views are replaced, not left behind
    assert run(ply, "--views", "2", "--size", "16", "--out", out) == 0
    assert not os.path.exists(os.path.join(out, "view_002.png"))


@pytest.mark.parametrize("args,field", [
    (["--views", "0"], "--views"),
    (["--size", "2"], "--size"),
    (["--elevation", "120"], "--elevation"),
])
def test_bad_options_are_one_line(tmp_path, capsys, ply, args, field):
    assert run(ply, *args, "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"scoredistill: error: {field}")
    assert not os.path.exists(tmp_path / "o")


def test_bad_sources_and_foreign_folders(tmp_path, capsys, ply):
    (tmp_path / "notes.txt").write_text("x")
    bad_ply = tmp_path / "bad.ply"
    bad_ply.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 1\nproperty float x\nend_header\n")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    cases = [(str(tmp_path / "nope.ply"), str(tmp_path / "o1"), "SOURCE"),
             (str(tmp_path / "notes.txt"), str(tmp_path / "o2"), "SOURCE"),
             (str(tmp_path), str(tmp_path / "o3"), "SOURCE"),              # a folder without scene.ply
             (str(bad_ply), str(tmp_path / "o4"), str(bad_ply)),
             (ply, str(foreign), "--out")]
    for src, out, field in cases:
        assert run(src, "--out", out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"scoredistill: error: {field}"), err
    assert sorted(os.listdir(foreign)) == ["keep.txt"]
