"""What a run shows and writes as it goes: the output folder check, the progress bar (with the phase of a
long step), the metrics file, the step's log line, and the held-out evaluation and probe of a Distiller.

`make_output_dir`    output.dir created and checked writable (an error naming output.dir otherwise)
`check_output_dir`   a fresh run (resume=false) into an output.dir that holds checkpoints or metrics stops
                     (pointing to --resume true, a new dir, or output.overwrite=true) instead of overwriting it
`warn_idle_settings` output.eval_every / probe_every with no held-out prompts: one warning at start-up
`Progress`           the tqdm bar: its description names the phase (generating, teacher, training) inside a step
`heldout(d)` / `probe(d)` / `log_result(d, ...)`   the trainer's held-out metrics, logged to metrics.jsonl
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("protege")


def check_output_dir(cfg, out: Path) -> None:
    """Refuse to start a fresh run over an earlier run's checkpoints or metrics (ValueError naming the folder)."""
    if cfg.resume or cfg.output.overwrite:
        return
    ckpts = out / "checkpoints"
    earlier = [p.name for p in (ckpts, out / "metrics.jsonl", out / "student")
               if p.exists() and (p.is_file() and p.stat().st_size or p.is_dir() and any(p.iterdir()))]
    if earlier:
        raise ValueError(f"output.dir={out} already holds an earlier run ({', '.join(earlier)}): a fresh run would "
                         "overwrite it. Continue it with --resume true, pick a new output.dir, or set "
                         "output.overwrite=true to start over in it")


def make_output_dir(path) -> Path:
    """Create output.dir (and its parents) and check that it takes files; ValueError naming output.dir,
    the path and the OS's reason otherwise (a file in the way, no permission, a read-only disk)."""
    out = Path(path)
    probe = out / f".protege-write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"output.dir={str(path)!r} cannot be used: {e.strerror or e} ({e.filename or out}); set "
                         "output.dir to a folder this user can create and write") from None
    return out


def warn_idle_settings(cfg, has_heldout: bool) -> None:
    """Interval settings that would do nothing silently: warned once, at start-up."""
    if has_heldout:
        return
    for key in ("eval_every", "probe_every"):
        if getattr(cfg.output, key):
            log.warning("output.%s=%d does nothing: the run has no held-out prompts (set data.eval_fraction or "
                        "data.eval_path)", key, getattr(cfg.output, key))


class Progress:
    """The run's tqdm bar (None-safe: without output.progress, or off the main process, it shows nothing)."""

    def __init__(self, cfg, acc, start: int, total: int):
        self.bar = None
        if cfg.output.progress and acc.is_main_process:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="distill", unit="step", dynamic_ncols=True)

    def phase(self, name: str) -> None:
        """Show the phase of the step under way (a step of minutes no longer sits saying nothing)."""
        if self.bar is not None:
            self.bar.set_description(f"distill [{name}]")
        log.debug("phase: %s", name)

    def step(self, m: dict, cfg) -> None:
        """One step done: the bar moves on with loss, length and speed; without a bar, the log line."""
        if self.bar is not None:
            self.bar.set_description("distill")
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", len=f"{m['completion_len_mean']:.0f}",
                                 tok_s=f"{m['tokens_per_s']:.0f}")
        elif m["step"] % cfg.output.log_every == 0:
            log.info(step_line(m))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def step_line(m: dict) -> str:
    return (f"step {m['step']}: loss {m['loss']:.4f} grad_norm {m['grad_norm'] or 0:.3f} lr {m['lr']:.2e} "
            f"len {m['completion_len_mean']:.1f} trunc {m['truncation_rate']:.2f} "
            f"gen {m['time_generate']:.2f}s teacher {m['time_teacher']:.2f}s train {m['time_train']:.2f}s "
            f"({m['tokens_per_s']:.0f} tok/s)")


def config_yaml(cfg) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ------------------------------------------------------------------------------------ held-out
def heldout(d) -> dict:
    """Held-out metrics of Distiller `d`'s current student (protege.eval.evaluate); {} without held-out prompts."""
    from protege.eval import evaluate

    cfg, r = d.cfg, d.cfg.rollout
    examples = d.eval_set.examples[: cfg.data.eval_prompts] if d.eval_set else []
    examples = examples if d.teacher.capabilities.scores_student_rows else []  # API: own samples only
    return evaluate(d.student, d.teacher, [d.prompts.prompt_ids(e) for e in examples],
                    teacher_local=d.objective.teacher_local, examples=examples,
                    pad_id=d.tok.pad_token_id, eos_ids=d.eos_ids,
                    max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                    batch_tokens=r.batch_tokens, micro_batch_size=cfg.train.micro_batch_size, bf16=d.bf16)


def probe(d) -> dict:
    """The greedy probe (protege.probe) of `d`'s current student as probe/* metrics; warnings go to the log."""
    from protege.probe import GreedyProbe, probe_step

    examples = d.eval_set.examples[: d.cfg.output.probe_prompts]
    greedy = GreedyProbe([d.prompts.prompt_ids(e) for e in examples], 2 * d.cfg.rollout.max_new_tokens,
                         d.eos_ids, d.tok.pad_token_id, bf16=d.bf16)
    values, warnings = probe_step(d.monitor, greedy, d.student, d.teacher_model, d.state.step)
    for w in warnings:
        log.warning("health: %s", w)
    return {**values, "warnings": warnings} if warnings else values


def log_result(d, result: dict, path: Path, prefix: str = "eval") -> None:
    """An evaluation's metrics as <prefix>/<name> at the current step: in the history, metrics.jsonl and the log."""
    if not result:
        return
    result = {"step": d.state.step, **{k if k == "warnings" else f"{prefix}/{k}": v for k, v in result.items()}}
    d.state.history.append(result)
    if d.acc.is_main_process:
        with path.open("a") as f:
            f.write(json.dumps(result) + "\n")
        log.info("%s @ step %d: %s", prefix, d.state.step,
                 ", ".join(f"{k[len(prefix) + 1:]}={v:.4g}" for k, v in result.items()
                           if k.startswith(prefix + "/") and isinstance(v, float)))


def record_step(d, m: dict, path: Path) -> None:
    """A step's metrics: in the history, metrics.jsonl, the trackers and the bar (the main process writes)."""
    d.state.history.append(m)
    if d.acc.is_main_process:
        with path.open("a") as f:
            f.write(json.dumps(m) + "\n")
        if d.cfg.output.report_to != "none":
            d.acc.log({k: v for k, v in m.items() if isinstance(v, (int, float))}, step=m["step"])
        d.progress.step(m, d.cfg)


def evaluations(d, path: Path, *, every: bool) -> None:
    """The held-out evaluation and the greedy probe of `d` now: every=False at the start and the end of a run
    (both when configured), every=True after a step (each when its output.*_every divides the step, not at
    the last step, which the end evaluates)."""
    cfg, s = d.cfg, d.state.step
    due = lambda n: not every or (n and s % n == 0 and s < d.max_steps)  # noqa: E731
    if d.eval_set and due(cfg.output.eval_every):
        log_result(d, heldout(d), path)
    if d.eval_set and cfg.output.probe_every and due(cfg.output.probe_every):
        log_result(d, probe(d), path, "probe")
