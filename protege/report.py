"""Writes <out>/report.md with PNG plots: losses, held-out KL and health signals against steps,
before/after metrics and side-by-side showcase answers."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

METRIC_NAMES = {
    "rkl": "reverse KL on student samples (per token)",
    "fkl": "forward KL on teacher samples (per token)",
    "greedy_teacher_nll": "teacher NLL of the student's greedy answers",
    "greedy_distinct_2": "distinct-2 of greedy answers",
    "greedy_length": "greedy answer length (tokens)",
    "greedy_eos_rate": "greedy answers that end with EOS",
    "greedy_repetition_rate": "greedy repetition rate (repeated 4-grams)",
    "teacher_greedy_distinct_2": "teacher's distinct-2 (reference)",
    "teacher_greedy_length": "teacher's greedy length (reference)",
    "teacher_greedy_eos_rate": "teacher's answers that end with EOS (reference)",
    "teacher_greedy_repetition_rate": "teacher's repetition rate (reference)",
}
# issue 16's bar for the student's greedy answers, as (metric, comparison, factor of the teacher's value)
BAR = (("distinct_2", ">=", 0.8), ("repetition_rate", "<=", 1.5), ("eos_rate", ">=", 0.5))


def bar_rows(after: dict) -> list[tuple[str, float, float, float, bool]]:
    """(metric, student, teacher, student / teacher, passes) of the greedy answers against BAR."""
    rows = []
    for key, op, factor in BAR:
        s, t = after[f"greedy_{key}"], after[f"teacher_greedy_{key}"]
        ok = s >= factor * t if op == ">=" else s <= factor * t
        rows.append((f"{key} {op} {factor:g}x teacher", s, t, s / t if t else float("nan"), ok))
    return rows


def _metrics_table(before: dict, after: dict) -> list[str]:
    lines = ["| metric | before | after |", "|---|---|---|"]
    lines += [f"| {label} | {before[key]:.4g} | {after[key]:.4g} |" for key, label in METRIC_NAMES.items()
              if key in before]
    if all(f"greedy_{k}" in after and f"teacher_greedy_{k}" in after for k, _, _ in BAR):
        lines += ["", "| greedy answers (after) | student | teacher | ratio | bar |", "|---|---:|---:|---:|---|"]
        lines += [f"| {name} | {s:.3f} | {t:.3f} | {'-' if r != r else f'{r:.2f}'} | {'met' if ok else 'missed'} |"
                  for name, s, t, r, ok in bar_rows(after)]  # r != r: NaN, the teacher's value is 0
    return lines


def write_report(out_dir: Path, summary: dict, histories: dict[str, list[dict]]) -> Path:
    out_dir = Path(out_dir)
    plots = _plots(out_dir, histories)
    before, after = summary["before"], summary["after"]
    lines = ["# protege distillation report", "",
             f"Student: {summary['teacher']} keeping layers {summary['kept_layers']} "
             f"({len(summary['kept_layers'])} of {summary['teacher_layers']}); teacher: {summary['teacher']} "
             f"({summary['teacher_layers']} layers). Total time {summary['seconds']:.0f} s.", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M')} on {_machine()}.", "",
             "## Held-out metrics", ""] + _metrics_table(before, after)
    drop = 1 - after["rkl"] / before["rkl"] if before["rkl"] else 0.0
    lines += ["", f"Reverse KL fell by {100 * drop:.0f}%. Greedy distinct-2 of the student is "
              f"{after['greedy_distinct_2']:.2f} against the teacher's {after['teacher_greedy_distinct_2']:.2f}.", ""]
    warnings = [w for h in histories.values() for m in h for w in m.get("warnings", [])]
    lines += ["## Health warnings", ""] + ([f"- {w}" for w in warnings] or ["none"]) + [""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    lines += ["## Showcase answers (greedy)", ""] + _answers(summary["showcase"])
    lines += _own_prompts(summary.get("prompts"))
    lines += ["## Stages", ""]
    for name, cfg in summary["stages"].items():
        lines.append(f"- {name}: loss {cfg['loss']['name']} ({cfg['loss']['support']}), lmbda {cfg['mix']['lmbda']}, "
                     f"seq_kd {cfg['mix']['seq_kd']}, {cfg['train']['max_steps']} steps x "
                     f"{cfg['train']['prompts_per_step']} prompts, lr {cfg['optim']['lr']}, {cfg['train']['precision']}")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


def _plots(out_dir: Path, histories: dict[str, list[dict]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, offset = [], 0  # one step axis across stages
    for name, hist in histories.items():
        steps = [m for m in hist if "loss" in m]
        for m in hist:
            rows.append({**m, "stage": name, "global_step": m["step"] + offset})
        offset += max([m["step"] for m in steps] + [0])
    panels = [("loss", "training loss"), ("sampled_rkl", "sampled reverse KL (student rows)"),
              ("teacher_nll", "teacher NLL of rows"), ("completion_len_mean", "completion length"),
              ("overlap_ratio", "top-k overlap ratio"), ("entropy_gap", "entropy gap H(q) - H(p)"),
              ("repetition_rate", "repetition rate"), ("eval/rkl", "held-out reverse KL")]
    panels = [(k, t) for k, t in panels if any(k in r for r in rows)]
    if not panels:
        return []
    cols = 2
    fig, axes = plt.subplots((len(panels) + 1) // cols, cols, figsize=(11, 3 * ((len(panels) + 1) // cols)),
                             squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for i, stage in enumerate(histories):  # one colour per stage in every panel
            pts = [(r["global_step"], r[key]) for r in rows if r["stage"] == stage and r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), color=f"C{i}", marker="o" if key.startswith("eval/") else None, ms=4,
                        label=stage)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    path = out_dir / "training.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def _own_prompts(own: dict | None) -> list[str]:
    """The section on the prompts of `protege demo --prompts` (default: the built-in unseen set)."""
    if not own:
        return []
    lines = [f"## Prompts the recipe never saw ({own['source']}, {len(own['answers'])} prompts)", "",
             "Greedy answers up to twice the training cap; sampled reverse KL at the cap.", ""]
    return lines + _metrics_table(own["before"], own["after"]) + [""] + _answers(own["answers"])


def _answers(rows: list[dict]) -> list[str]:
    """Each prompt with the teacher's and the student's greedy answers (before / after) under it."""
    lines = []
    for row in rows:
        lines += [f"### {row['prompt']}", ""]
        for who, label in (("teacher", "Teacher"), ("before", "Student before"), ("after", "Student after")):
            text = row[who].replace("\n", "\n> ")
            lines += [f"**{label}:**", "", f"> {text}", ""]
    return lines
