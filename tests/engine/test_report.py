"""report.md names the student's real number of steps (a K-step student is not "1-step, NFE 1")."""

from types import SimpleNamespace

from scoredistill.engine.report import student_steps
from scoredistill.models.mlp import MLPGenerator


def test_student_steps():
    assert student_steps(MLPGenerator(2, 8, 1)) == 1
    assert student_steps(SimpleNamespace(t_steps=[0.99, 0.75, 0.5, 0.25])) == 4
    assert student_steps(SimpleNamespace(num_steps=2, t_steps=[0.9])) == 2
