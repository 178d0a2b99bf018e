"""``--steps-eval``: few-step students sampled with K' of their K steps, one bench row per K'."""

from __future__ import annotations

import csv
import os

import pytest
import torch

from scoredistill.bench.digits import _student_rows
from scoredistill.bench.steps_eval import RENOISE_SEED, parse_steps_eval, sample_steps, steps_for
from scoredistill.cli.main import main
from scoredistill.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--set", "generator.width=16", "--set", "generator.depth=1", "--set", "fake_score.width=16",
        "--set", "fake_score.depth=1", "--set", "train.batch_size=32", "--set", "train.real_pool=64"]


def test_parse_and_subset_rule():
    assert parse_steps_eval("4, 1,2,2") == [1, 2, 4] and parse_steps_eval(None) is None
    assert steps_for([1, 2, 4], 1) == [1] and steps_for([1, 2], 4) == [1, 2]
    for bad in ("0,1", "a", ","):
        with pytest.raises(ConfigError, match="--steps-eval"):
            parse_steps_eval(bad)
    with pytest.raises(ConfigError, match=r"--steps-eval.*8 exceeds the 4 steps of tdm"):
        steps_for([1, 8], 4, "tdm")


class _Ev:  # the suite only calls metrics(x, cond); the mean |x| tells the samples apart
    def metrics(self, x, cond):
        return {"fd": float(x.abs().mean())}


def test_image_rows_sample_the_strided_subset():
    from scoredistill.engine.build import build_teacher
    from scoredistill.models.fewstep import build_fewstep

    teacher, _ = build_teacher({"kind": "bundled", "name": "digits"})
    gen = build_fewstep(teacher, steps=4, t_first=0.5)
    z, cond = torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(20) % 10
    rows = _student_rows("tdm student", gen, z, cond, _Ev(), [1, 2, 4])
    assert [r["nfe"] for r in rows] == [1, 2, 4] and rows[1]["sampler"] == "tdm student, 2 of 4 steps"
    with torch.no_grad():  # K' = K is every step: the student's own eval-mode sample, same re-noising seed
        full = gen.eval().sample(z, cond, generator=torch.Generator().manual_seed(RENOISE_SEED))
    assert rows[2]["fd"] == pytest.approx(float(full.abs().mean()), abs=1e-4)  # rows round to 4 places
    assert len({r["fd"] for r in rows}) == 3
    assert torch.equal(sample_steps(gen, z, cond, 2), sample_steps(gen, z, cond, 2))  # seeded re-noising
    with pytest.raises(ConfigError, match="--steps-eval"):
        _student_rows("tdm student", gen, z, cond, _Ev(), [8])


def test_toy_bench_one_row_per_sampling_steps(tmp_path):
    out = str(tmp_path / "b")
    args = ["bench", "--methods", "dmd2_4step", "--teachers", "pair", "--steps", "2", "--n-eval", "32",
            "--steps-eval", "1,2,4", "--out", out, "--set", "generator.init_steps=0"]  # the recipe's init: 300
    assert main(args + TINY) == 0
    with open(os.path.join(out, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    got = [(r["method"], r["sampling_steps"], r["student_steps"]) for r in rows]
    assert got == [("exact samples (floor)", "", ""), ("dmd2_4step", "1", "4"), ("dmd2_4step", "2", "4"),
                   ("dmd2_4step", "4", "4")]
    assert all(r["status"] == "ok" and r["steps"] == "2" for r in rows[1:])
    assert len({r["sw2"] for r in rows[1:]}) == 3  # three samplers, three evaluations
    md = open(os.path.join(out, "results.md")).read().splitlines()
    assert md[md.index("### pair") + 2].startswith("| method | sampling steps | seed | steps | precision ↑ |")
    assert any(line.startswith("| dmd2_4step | 2 of 4 | 0 | 2 |") for line in md)
    assert any("--steps-eval 1,2,4" in line for line in md)


def test_toy_rows_expand_and_one_step_rows_keep_their_table():
    from scoredistill.bench.toy import COLUMNS, csv_columns, expand_steps, markdown

    base = {"method": "m", "teacher": "pair", "seed": 0, "steps": 5, "status": "ok", "precision": 0.5,
            "modes_covered": 2, "num_modes": 2, "wall_s": 1.0}
    one = expand_steps({**base, "student_steps": 1, "by_steps": {"1": {"precision": 0.25}}})
    assert one == [{**base, "student_steps": 1, "precision": 0.25, "sampling_steps": 1}]
    assert expand_steps(base) == [base] and csv_columns([base]) == COLUMNS  # no --steps-eval: as before
    assert csv_columns(one)[-2:] == ["sampling_steps", "student_steps"]
    assert "| m | 1 of 1 | 0 | 5 | 0.250 | 2/2 |" in "\n".join(markdown(one, []))
    assert "sampling steps" not in markdown([base], [])[3]


@pytest.mark.parametrize("suite,extra", [("toy", ["--methods", "dmd2_4step", "--steps-eval", "1,8"]),
                                         ("toy", ["--methods", "meanflow", "--steps-eval", "4"]),
                                         ("digits", ["--methods", "tdm", "--steps-eval", "5"]),
                                         ("sds", ["--steps-eval", "2"]),
                                         ("toy", ["--steps-eval", "0,2"])])
def test_bad_steps_eval_one_line_before_training(tmp_path, capsys, suite, extra):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--suite", suite, "--out", str(tmp_path / "b")] + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--steps-eval" in err[0], err
    assert not os.path.exists(tmp_path / "b" / "results.md")
