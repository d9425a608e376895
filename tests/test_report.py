"""The demo report names the models it was given and states figures computed from the summary."""

from __future__ import annotations

from protege.report import write_report


def _summary(teacher: str, layers: int, kept: list[int]) -> dict:
    before = {"rkl": 2.0, "greedy_distinct_2": 0.5, "teacher_greedy_distinct_2": 0.7}
    after = {"rkl": 0.5, "greedy_distinct_2": 0.6, "teacher_greedy_distinct_2": 0.7}
    stage = {"loss": {"name": "reverse_kl", "support": "full"}, "mix": {"lmbda": 1.0, "seq_kd": False},
             "train": {"max_steps": 3, "prompts_per_step": 2, "precision": "fp32"}, "optim": {"lr": 1e-3}}
    return {"before": before, "after": after, "kept_layers": kept, "seconds": 12.4, "teacher": teacher,
            "teacher_layers": layers, "stages": {"on_policy": stage},
            "showcase": [{"prompt": "q?", "teacher": "a", "before": "b", "after": "c"}]}


def test_report_names_the_given_models(tmp_path):
    text = write_report(tmp_path, _summary("tiny-llama-7", 7, [0, 3, 6]), {}).read_text()
    assert "SmolLM2" not in text
    assert "Student: tiny-llama-7 keeping layers [0, 3, 6] (3 of 7); teacher: tiny-llama-7 (7 layers)" in text
    assert "Total time 12 s." in text
    assert "Reverse KL fell by 75%." in text  # 1 - 0.5 / 2.0


def test_bar_rows_check_each_metric_in_its_direction():
    """distinct_2 and eos_rate must reach factor x the teacher's; repetition_rate must stay under 1.5x it."""
    from protege.report import bar_rows

    teacher = {"teacher_greedy_distinct_2": 1.0, "teacher_greedy_repetition_rate": 0.1, "teacher_greedy_eos_rate": 1.0}
    cases = [({"distinct_2": 0.81, "repetition_rate": 0.149, "eos_rate": 0.51}, [True, True, True]),
             ({"distinct_2": 0.79, "repetition_rate": 0.151, "eos_rate": 0.49}, [False, False, False]),
             ({"distinct_2": 1.0, "repetition_rate": 0.02, "eos_rate": 1.0}, [True, True, True])]
    for student, want in cases:
        after = {**teacher, **{f"greedy_{k}": v for k, v in student.items()}}
        assert [ok for *_, ok in bar_rows(after)] == want, student
