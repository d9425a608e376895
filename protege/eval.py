"""Held-out evaluation and `protege eval`: does the student's own behaviour move toward the teacher's?

    protege eval --student outputs/demo/student --teacher smollm2 --n 16

`evaluate` (the trainer's, every output.eval_every steps) samples one answer per held-out prompt
from the student (rollout settings, a fixed seed, the training RNG untouched) and reports
  rkl          per-token reverse KL(q||p) on those samples: exact over the vocabulary with an
               in-process teacher, the sample estimate log q(y) - log p(y) with a remote one (across
               tokenizers: log q of the student's canonical path of the text, as the span estimator)
  teacher_nll  -log p(y_t) of the student's tokens under the teacher
  length, truncation_rate, eos_rate, distinct_2, repetition_rate
`evaluate_models` (protege eval, protege demo) adds forward KL on teacher samples and greedy-answer
metrics, for a student and an in-process teacher given as models; `evaluate_paths` loads them by name.
`exact_match` scores text answers (GSM8K "#### 72" style numbers, else normalised text).
Text diversity and repetition come from protege.diagnostics (distinct_n, repetition_rate).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Sequence

import torch

from protege import modeling
from protege.data import PromptTokenizer, load_rows, to_examples
from protege.cross_objective import canonical_student_logprobs
from protege.diagnostics import distinct_n, repetition_rate, sampled_rkl
from protege.forward import HiddenStates, forward_completion_hidden, output_weight
from protege.loss_names import LossName
from protege.losses import chunked_dense_divergence
from protege.records import Rollouts
from protege.rollout import hf as hf_rollout
from protege.teacher.base import ScoreRequest
from protege.fsdp import gathered_output_weight
from protege.teacher.local import score_rows


@torch.no_grad()
def evaluate(student, teacher, prompts: list[torch.Tensor], *, teacher_local: bool, pad_id: int,
             eos_ids: list[int], max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             batch_tokens: int = 16384, micro_batch_size: int = 8, bf16: bool = False, seed: int = 1234,
             examples: list | None = None) -> dict:
    """Held-out metrics of `student` against `teacher` (a protege Teacher: local or remote) on `prompts`
    (token ids). Sampling: the rollout settings given; teacher_local: the teacher sends hidden states, so
    rkl is exact (computed `micro_batch_size` rows at a time). examples: the data row of each prompt, for
    a teacher with its own view of a row (privileged context, routing by a column). A flat dict of floats;
    {} without prompts."""
    if not prompts:
        return {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rollouts = hf_rollout.generate(student, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                       top_p=top_p, top_k=top_k, eos_ids=eos_ids, pad_id=pad_id,
                                       batch_tokens=batch_tokens, autocast_bf16=bf16)
    rollouts.examples = list(examples) if examples is not None else None
    signal = teacher.score(rollouts, ScoreRequest(hidden=teacher_local, temperature=1.0, canonical=True))
    mask = rollouts.completion_mask
    out = {"teacher_nll": float(-signal.token_logprobs[mask].mean())}
    if teacher_local:
        out["rkl"] = exact_divergence(student, rollouts, signal.hidden_states, teacher.output_weight, LossName.REVERSE_KL,
                                      pad_id=pad_id, batch=micro_batch_size)
    elif signal.cross is not None:  # another tokenizer: log q of the text by the student's canonical path
        own = canonical_student_logprobs(student, signal.cross, rollouts, pad_id=pad_id, temperature=temperature or 1.0,
                                         rows=micro_batch_size, weight_fn=lambda: gathered_output_weight(student))
        out["rkl"] = sampled_rkl(own, signal.token_logprobs, mask)
    else:
        out["rkl"] = sampled_rkl(rollouts.sampling_logprobs, signal.token_logprobs, mask)
    return {**out, **text_metrics(rollouts)}


@torch.no_grad()
def evaluate_models(student, teacher, tok, prompts: list[torch.Tensor], *, max_new_tokens: int, eos_ids: list[int],
                    temperature: float = 1.0, batch_tokens: int = 16384, bf16: bool = False, seed: int = 1234,
                    teacher_cache: dict | None = None, greedy_max_new_tokens: int | None = None,
                    groups: dict[str, list[int]] | None = None, answers: bool = False) -> dict:
    """Student vs an in-process teacher on held-out prompts (token ids):
    rkl on student samples, fkl on teacher samples (max_new_tokens each), and for greedy answers
    (greedy_max_new_tokens each, default max_new_tokens) of the student: teacher_nll, distinct_2, length,
    eos_rate, truncation_rate, repetition_rate; the teacher's own greedy values as teacher_greedy_*.
    Pass the same `teacher_cache` dict to several calls to generate and score the teacher's side once.
    groups: {name: indices into prompts} -> {name: those metrics over its rows}; every prompt set is then
    generated in the same batches (on a CPU a decode step's fixed cost is paid once for all sets).
    answers: also the decoded greedy answers, as lists greedy_answers and teacher_greedy_answers."""
    cache = teacher_cache if teacher_cache is not None else {}
    kw = dict(max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=tok.pad_token_id, batch_tokens=batch_tokens,
              autocast_bf16=bf16)
    greedy_kw = {**kw, "max_new_tokens": greedy_max_new_tokens or max_new_tokens}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        s_samples = hf_rollout.generate(student, prompts, temperature=temperature, **kw)
    if "samples" not in cache:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            cache["samples"] = hf_rollout.generate(teacher, prompts, temperature=temperature, **kw)
        cache["greedy"] = hf_rollout.generate(teacher, prompts, temperature=0, **greedy_kw)
        cache["signal"] = _score(teacher, cache["samples"], tok)
    s_greedy = hf_rollout.generate(student, prompts, temperature=0, **greedy_kw)
    s_signal = _score(teacher, s_samples, tok)
    greedy_lp = score_rows(teacher, s_greedy.prompt_ids, s_greedy.completion_ids, s_greedy.completion_mask,
                           ScoreRequest(), pad_id=tok.pad_token_id).token_logprobs  # (N, T)

    def metrics(rows: list[int]) -> dict:
        idx = torch.as_tensor(rows, dtype=torch.long)
        out = {}
        for name, rollouts, sig, key in ((LossName.REVERSE_KL, s_samples, s_signal, "rkl"),
                                         (LossName.FORWARD_KL, cache["samples"], cache["signal"], "fkl")):
            out[key] = exact_divergence(student, rollouts.select(rows), sig.hidden_states[idx],
                                        output_weight(teacher), name, pad_id=tok.pad_token_id)
        out["greedy_teacher_nll"] = float(-greedy_lp[idx][s_greedy.completion_mask[idx]].mean())
        out.update({f"greedy_{k}": v for k, v in text_metrics(s_greedy.select(rows)).items()})
        out.update({f"teacher_greedy_{k}": v for k, v in text_metrics(cache["greedy"].select(rows)).items()})
        if answers:
            out["greedy_answers"] = [decode(tok, s_greedy, i) for i in rows]
            out["teacher_greedy_answers"] = [decode(tok, cache["greedy"], i) for i in rows]
        return out

    if groups is None:
        return metrics(list(range(len(prompts))))
    return {name: metrics(list(rows)) for name, rows in groups.items()}


def decode(tok, rollouts: Rollouts, i: int) -> str:
    """Row i's completion as text, special tokens (EOS) left out."""
    return tok.decode(rollouts.completion_ids[i][rollouts.completion_mask[i]], skip_special_tokens=True).strip()


def _score(teacher, rollouts: Rollouts, tok):
    return score_rows(teacher, rollouts.prompt_ids, rollouts.completion_ids, rollouts.completion_mask,
                      ScoreRequest(hidden=True), pad_id=tok.pad_token_id)


@torch.no_grad()
def exact_divergence(student, rollouts: Rollouts, teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                     name: str, *, pad_id: int, batch: int = 8) -> float:
    """Mean per-token divergence over every completion position, exact over the vocabulary."""
    device = output_weight(student).device
    model = HiddenStates(student)
    was = student.training
    student.eval()
    total, count = 0.0, 0
    for s in range(0, len(rollouts), batch):
        rows = list(range(s, min(s + batch, len(rollouts))))
        mb = rollouts.select(rows)
        t = mb.completion_ids.shape[1]
        h = forward_completion_hidden(model, mb.prompt_ids, mb.completion_ids.to(device), mb.completion_mask,
                                      pad_id)  # (b, t, H)
        weight = gathered_output_weight(student)  # after the forward: an FSDP2 student has gathered it
        m = mb.completion_mask.to(h.device)
        th = teacher_hidden[rows, :t].to(h.device)[m]  # (n, Ht)
        values = chunked_dense_divergence(h[m].float(), weight.float(), teacher_hidden=th.float(),
                                          teacher_weight=teacher_weight.to(h.device).float(), name=name)
        total, count = total + float(values.sum()), count + int(m.sum())
    student.train(was)
    return total / max(1, count)


def text_metrics(rollouts: Rollouts) -> dict:
    mask = rollouts.completion_mask
    lengths = mask.sum(1)
    seqs = [rollouts.completion_ids[i, : int(lengths[i])].tolist() for i in range(len(rollouts))]
    return {"length": float(lengths.float().mean()),
            "truncation_rate": sum(f == "length" for f in rollouts.finish_reasons) / len(rollouts),
            "eos_rate": sum(f == "stop" for f in rollouts.finish_reasons) / len(rollouts),
            "distinct_2": distinct_n(seqs, 2), "repetition_rate": repetition_rate(seqs, n=4)}


def evaluate_paths(student: str, teacher: str, *, prompts: str = "builtin:everyday", n: int = 16,
                   max_new_tokens: int = 64, bf16: bool = False) -> dict:
    """`protege eval`: evaluate_models for a student and a teacher named as model paths (HF folder, hub id,
    .gguf or "smollm2"), on the first `n` prompts of `prompts` (a file, or builtin:everyday's held-out split)."""
    tok = modeling.load_tokenizer(student)
    student_model = modeling.load_model(student)
    teacher_model = modeling.load_model(teacher)
    split = "heldout" if prompts.startswith("builtin:") else "train"
    examples = to_examples(load_rows(prompts, split)).examples[:n]
    pt = PromptTokenizer(tok, 512)
    return evaluate_models(student_model, teacher_model, tok, [pt.prompt_ids(e) for e in examples],
                           max_new_tokens=max_new_tokens, eos_ids=modeling.eos_ids(tok), bf16=bf16)


# ------------------------------------------------------------------------- text answers
# exact_match compares the last number of the prediction with the last number of the answer when the
# answer has one (GSM8K "#### 72" style; "1,234", "1234.0" and "$1234" are equal); otherwise it compares
# the texts, lowercased, with surrounding punctuation and repeated spaces removed.

# a number with optional sign, thousands separators in groups of three, and decimals
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


def last_number(text: str) -> str | None:
    """The last number in `text` in a canonical form ("1,234.50" -> "1234.5"), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        value = Decimal(found[-1].replace(",", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def normalize_text(text: str) -> str:
    """Lowercased, whitespace collapsed, surrounding punctuation and quotes stripped."""
    return " ".join(text.lower().split()).strip(" .,;:!?\"'`()[]{}")


def extract_answer(text: str) -> str:
    """How an answer reads once normalised: its last number when it has one, else its normalised text."""
    number = last_number(text)
    return number if number is not None else normalize_text(text)


def exact_match_scores(predictions: Sequence[str], answers: Sequence[str], normalize: bool = True) -> list[bool]:
    """Per-example exact match (rules: the comment above last_number); normalize=False compares stripped strings."""
    if len(predictions) != len(answers):
        raise ValueError(
            f"exact_match got {len(predictions)} predictions and {len(answers)} answers; pass one answer per prediction"
        )
    scores = []
    for prediction, answer in zip(predictions, answers):
        if not normalize:
            scores.append(prediction.strip() == answer.strip())
            continue
        expected = last_number(answer)
        if expected is not None:
            scores.append(last_number(prediction) == expected)
        else:
            scores.append(normalize_text(prediction) == normalize_text(answer))
    return scores


def exact_match(predictions: Sequence[str], answers: Sequence[str], normalize: bool = True) -> float:
    """Fraction of predictions that match their answer (0.0 for empty input).

    >>> exact_match(["The answer is 1,234.", "Paris"], ["#### 1234", "paris"])
    1.0
    """
    scores = exact_match_scores(predictions, answers, normalize)
    return sum(scores) / len(scores) if scores else 0.0
