"""`protege cache-teacher`: score a dataset of completions once, into the teacher-score cache (offline OPD).

    protege cache-teacher run.yaml --teacher.cache_dir cache/ --data.path completions.jsonl

The config is a training config: its teacher, loss and data settings decide what is asked (exactly
what `protege train` would ask the teacher for these rows: Objective.teacher_request of a buffer of
reference rows), its student.path gives the tokenizer. Each row of data.path with a completion
(a `completion` column or a final assistant turn) becomes one row, tokenized as the trainer tokenizes
reference rows (PromptTokenizer: chat template, data.max_prompt_tokens, rollout.max_new_tokens);
rows are scored train.prompts_per_step at a time through the cache, so rows already cached are not
scored again (an interrupted precompute continues where it stopped). A run with the same settings,
mix.lmbda < 1 and this data then trains on these rows without calling the teacher.

The condition (Lightning OPD's): this is on-policy distillation only if the completions were sampled
from the policy being trained (e.g. the student's own samples, saved before the run). Otherwise
the rows are off-policy (supervised KD on fixed text), and the run that trains on them says so:
it logs cache/off_policy_rows (rows answered from the cache that it did not sample) and warns once.
"""

from __future__ import annotations

import time

import torch

from protege.config import Config

EPILOG = """examples:
  protege cache-teacher run.yaml --teacher.cache_dir cache/ --data.path completions.jsonl
  protege train run.yaml --teacher.cache_dir cache/ --data.path completions.jsonl --mix.lmbda 0

Condition (offline OPD, as in Lightning OPD): the completions must come from the policy being
trained (the student's own samples), or the rows are off-policy; a run that trains on cached rows
it did not sample reports them (metric cache/off_policy_rows and a warning).
Overrides are --section.key VALUE or section.key=VALUE, as for `protege train`."""


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("cache-teacher", help="precompute the teacher-score cache for a dataset of completions",
                       description="Score every completion of data.path with the config's teacher, for its loss, "
                       "into teacher.cache_dir (see docs/remote_teachers.md, 'A teacher-score cache').",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML training config (optional if every required field is overridden)")
    p.set_defaults(func=_cli)


def _cli(args, rest) -> int:
    from protege.config import load_config

    cfg = load_config(args.config, rest)
    out = precompute(cfg)
    print(f"cached {out['rows']} rows ({out['tokens']} completion tokens) in {out['folder']}: {out['hits']} were "
          f"there, {out['misses']} scored in {out['teacher_calls']} teacher calls ({out['seconds']:.1f} s), "
          f"{out['bytes_written']} bytes written ({out['bytes_per_token']:.0f} bytes per token)")
    print("note: training on these rows is on-policy distillation only if the completions were sampled from the "
          "policy being trained; otherwise they are off-policy rows (reported as cache/off_policy_rows)")
    return 0


def precompute(cfg: Config, *, tokenizer=None, teacher_model=None) -> dict:
    """Fill teacher.cache_dir for every completion of cfg.data.path; returns counts (rows, tokens, hits, misses,
    teacher_calls, bytes_written, bytes_per_token, seconds, folder)."""
    from protege import build
    from protege.data import PromptTokenizer, load_prompt_sets
    from protege.modeling import load_tokenizer
    from protege.records import Rollouts
    from protege.teacher.cache import caches_in

    if cfg.teacher.cache_dir is None:
        raise ValueError("protege cache-teacher needs teacher.cache_dir: the folder to fill (and later train from)")
    tok = tokenizer or load_tokenizer(cfg.student.path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher, _ = build.build_teacher(cfg, teacher_model, pad_id=tok.pad_token_id, device=device,
                                     objective=build.build_objective(cfg))
    objective = build.build_objective(cfg, teacher=teacher)  # where the teacher runs: its capabilities
    if objective.student_topk:
        raise ValueError(f"loss.support={cfg.loss.support} with a teacher server asks the teacher at the student's "
                         "current top-k ids, which change as it trains: they cannot be precomputed. Use "
                         "loss.support=teacher|sampled (or an in-process teacher with teacher.cache_hidden=true)")
    train_set, _ = load_prompt_sets(cfg.data, seed=cfg.train.seed)
    examples = [e for e in train_set.examples if e.reference]
    if not examples:
        raise ValueError(f"no row of {cfg.data.path} has a completion (column {cfg.data.completion_column!r} or a "
                         f"final assistant turn in {cfg.data.messages_column!r}): nothing to cache")
    (cache,) = caches_in(teacher)
    cache.warn_off_policy = False  # nothing is trained here
    prompts = PromptTokenizer(tok, cfg.data.max_prompt_tokens)
    step, tokens, t0 = cfg.train.prompts_per_step, 0, time.perf_counter()
    for s in range(0, len(examples), step):
        batch = examples[s: s + step]
        buffer = Rollouts.from_references([prompts.prompt_ids(e) for e in batch],
                                          [prompts.reference_ids(e, cfg.rollout.max_new_tokens) for e in batch])
        buffer.examples = batch
        teacher.score(buffer, objective.teacher_request(buffer))
        tokens += buffer.num_tokens
    counts = cache.take_counts()
    return {"rows": len(examples), "tokens": tokens, **{k: counts[k] for k in ("hits", "misses", "teacher_calls",
                                                                                 "bytes_written")},
            "bytes_per_token": counts["bytes_written"] / max(1, counts["tokens_written"]),
            "seconds": time.perf_counter() - t0,
            "folder": str(cache.store.folder)}
