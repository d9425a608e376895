"""The README's CPU quick start, timed: `protege train examples/quickstart.yaml` as a new user runs it.

    python bench/bench_quickstart.py            # writes bench/results/quickstart.md and quickstart.json

Runs the CLI in a subprocess from the repository root (a fresh output folder), measures the wall time of the
whole command (model loading, three held-out evaluations, 8 steps, the final save), and reads the held-out
metrics at step 0 and at the last step from its metrics.jsonl: the per-token reverse KL of the student's
samples against the teacher (SmolLM2 with the system prompt only it sees), answer length and EOS rate.
Run it alone on the machine: two processes slow each other several-fold on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(extra: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix="quickstart-"))
    cmd = [sys.executable, "-m", "protege.cli", "train", "examples/quickstart.yaml", "--output.dir", str(out), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the quick start failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    evals = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval/rkl" in m]
    steps = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    shutil.rmtree(out, ignore_errors=True)
    first, last = evals[0], evals[-1]
    return {"wall_s": round(wall, 1), "steps": len(steps),
            "train_s": round(sum(m["time_generate"] + m["time_teacher"] + m["time_train"] for m in steps), 1),
            "rkl_before": round(first["eval/rkl"], 4), "rkl_after": round(last["eval/rkl"], 4),
            "length_before": round(first["eval/length"], 1), "length_after": round(last["eval/length"], 1),
            "eos_before": round(first["eval/eos_rate"], 3), "eos_after": round(last["eval/eos_rate"], 3)}


def write(r: dict, out: Path) -> None:
    from protege.hardware import cpu_model

    r = {**r, "date": datetime.date.today().isoformat(), "cpu": cpu_model(),
         "command": "python bench/bench_quickstart.py"}
    out.with_suffix(".json").write_text(json.dumps(r, indent=1) + "\n")
    out.write_text(f"""# The CPU quick start (`protege train examples/quickstart.yaml`)

{r['date']}, {r['cpu']}, 2 cores (other processes may have shared them). Command: `{r['command']}`.

| measure | value |
|---|---:|
| wall time of the command | {r['wall_s']} s |
| optimizer steps | {r['steps']} |
| time in the steps (generate + teacher + train) | {r['train_s']} s |
| held-out reverse KL per token, step 0 | {r['rkl_before']} |
| held-out reverse KL per token, last step | {r['rkl_after']} |
| held-out answer length (tokens, cap 48), step 0 / last | {r['length_before']} / {r['length_after']} |
| held-out answers ending with EOS, step 0 / last | {r['eos_before']} / {r['eos_after']} |

The teacher is the student's own starting weights with a system prompt only it sees ("Answer in one or two
short sentences."); the reverse KL measures how far the student's answers are from the ones that prompt
gives. Eight steps of four prompts are a smoke run of the whole loop, not a trained student.
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quickstart.md"))
    args = ap.parse_args()
    r = run([])
    write(r, Path(args.out))
    print(json.dumps(r))


if __name__ == "__main__":
    main()
