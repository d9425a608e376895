"""Start-up and first-step guards against the field's most reported silent failures of distillation.

1. End of turn (`check_end_of_turn`): the token a chat template puts after an assistant turn must be one the
   student stops at. When the teacher's template ends a turn with a token the student does not stop at (or the
   other way round), the teacher gives the student's end token a low probability on every row: the student
   learns never to stop, and answers grow to the cap (the "length explosion" users report).
2. Chat templates (`check_templates`, a warning): with a shared tokenizer the teacher scores the prompt ids the student's
   template rendered. If the teacher's own template renders the same conversation to other ids (a base model's
   template, another system prompt by default, another turn separator), every score is taken on a prompt the
   teacher was not trained on. Both are rendered on one probe conversation and the first differing position is
   named, with the text around it on both sides.
3. The teacher's signal reaches the loss (`teacher_moves_loss`): at the first step the objective's per-token
   loss is computed twice on one micro-batch, with the teacher's signal as sent and with every float field of
   it (logprobs, hidden states, the output projection) replaced by other values. A loss that does not move is
   a loss that does not read the teacher: the run would train on nothing (or on SFT alone) and look healthy.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

log = logging.getLogger("protege")

PROBE = [{"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "Paris is the capital of France."}]


class GuardError(ValueError):
    """A start-up or first-step guard found a run that would train on a wrong or absent signal."""


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    """The chat template's ids of `messages` (a list, whatever apply_chat_template returns in this version)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def end_of_turn_token(tokenizer) -> str | None:
    """The special token a chat template renders right after the assistant's content in PROBE (its end of turn),
    or None when the tokenizer has no chat template, the content is not a token-aligned span of the rendering,
    or what follows it is plain text (a base-style "User: ...\nAssistant:" template ends turns with no marker)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    ids = _render(tokenizer, PROBE, False)
    content = tokenizer.encode(PROBE[1]["content"], add_special_tokens=False)
    for start in range(len(ids) - len(content), -1, -1):  # the last occurrence: the assistant turn
        if ids[start: start + len(content)] == content:
            end = start + len(content)
            token = tokenizer.convert_ids_to_tokens(ids[end]) if end < len(ids) else None
            return token if token in _special_tokens(tokenizer) else None  # plain text ("\n") ends no turn
    return None


def _special_tokens(tokenizer) -> set[str]:
    """The tokenizer's special and added tokens (where a chat template's end-of-turn marker lives)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_tokens) | {str(t) for t in added.values()}


def check_end_of_turn(student_tokenizer, student_eos_ids: list[int], teacher_tokenizer=None) -> None:
    """GuardError when the student's chat template ends an assistant turn with a token the student does not stop
    at, or the teacher's template ends turns with another token than the student's."""
    token = end_of_turn_token(student_tokenizer)
    stops = [student_tokenizer.convert_ids_to_tokens(i) for i in student_eos_ids]
    if token is not None and token not in stops:
        raise GuardError(f"the student's chat template ends an assistant turn with {token!r}, which is not one of "
                         f"the tokens it stops at {stops}: its answers would never end. Set the tokenizer's "
                         "eos_token to the template's end-of-turn token.")
    other = None if teacher_tokenizer is None else end_of_turn_token(teacher_tokenizer)
    if token is not None and other is not None and other != token:
        raise GuardError(f"student and teacher end a turn differently: the student's template with {token!r}, the "
                         f"teacher's with {other!r}. The teacher would score the student's end of turn as an "
                         "unlikely token on every row, and the student would learn not to stop. Use a teacher and "
                         "student whose chat templates end turns alike, or give the student the teacher's template.")


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two id lists differ (the shorter one's length when one is a prefix), else None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def check_templates(student_tokenizer, teacher_tokenizer) -> str | None:
    """A warning (logged, and returned) naming where two chat templates of one vocabulary render PROBE's prompt
    to other ids; None when they agree. A warning, not an error: a teacher may be meant to see another format."""
    if not (getattr(student_tokenizer, "chat_template", None) and getattr(teacher_tokenizer, "chat_template", None)):
        return None
    prompt = PROBE[:1]
    s, t = _render(student_tokenizer, prompt, True), _render(teacher_tokenizer, prompt, True)
    at = first_difference(s, t)
    if at is None:
        return None
    around = lambda ids: repr(student_tokenizer.decode(ids[max(0, at - 4): at + 4]))  # noqa: E731
    message = (f"student and teacher share a vocabulary but their chat templates render the same prompt to other "
               f"ids, first at position {at}: student ...{around(s)}... ({len(s)} ids), teacher ...{around(t)}... "
               f"({len(t)} ids). The teacher scores prompts rendered by the student's template, a format it may "
               "not have been trained on. Give both the same template (the teacher's), or set "
               "teacher.cross_tokenizer: on so the teacher renders its own prompts.")
    log.warning("guard: %s", message)
    return message


def _perturbed(x, generator: torch.Generator):
    """x with every float value replaced by another (a shuffle plus noise), recursing into dataclasses (a
    cross-tokenizer CrossSignal); ids, masks and None unchanged."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: _perturbed(getattr(x, f.name), generator)
                                         for f in dataclasses.fields(x) if f.init})
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
        return x
    flat = x.flatten()
    noise = torch.randn(flat.shape, generator=generator, dtype=torch.float32).to(x.dtype)
    return (flat[torch.randperm(flat.numel(), generator=generator)] + noise.to(flat.device)).view_as(x)


@torch.no_grad()
def teacher_moves_loss(per_token_loss, hidden: torch.Tensor, weight: torch.Tensor, mb, signal,
                       teacher_weight: torch.Tensor | None = None) -> bool:
    """Whether `per_token_loss(hidden, weight, mb, signal, teacher_weight)` changes when every float field of
    the teacher's signal (and its output projection) is replaced by other values. hidden (B, T, H) is detached."""
    gen = torch.Generator().manual_seed(0)
    h, w = hidden.detach(), weight.detach()
    base = per_token_loss(h, w, mb, signal, teacher_weight).float()
    moved = per_token_loss(h, w, mb, _perturbed(signal, gen), _perturbed(teacher_weight, gen)).float()
    return not torch.equal(base, moved)


def check_teacher_reaches_loss(objective, hidden, weight, mb, signal, teacher_weight=None) -> None:
    """At the first step: GuardError when the objective's loss does not move with the teacher's signal
    (loss.name=sft reads no teacher by design and is not checked)."""
    if not objective.name.reads_logprobs:
        return
    if not teacher_moves_loss(objective.per_token_loss, hidden, weight, mb, signal, teacher_weight):
        raise GuardError(f"the loss ({objective.name}, support {objective.support}) does not change when the "
                         "teacher's signal does: the run would train without its teacher. A teacher kind that fills "
                         "another field than the objective reads, or a loss wired to a constant, does this; check "
                         "the teacher's capabilities against the loss (docs/architecture.md).")


def check_start(student_tokenizer, student_eos_ids: list[int], teacher_tokenizer=None, cross: bool = False) -> None:
    """The start-up guards: end-of-turn agreement (error) and, for a shared vocabulary, the chat-template probe
    (warning). Across tokenizers the special tokens are paired explicitly, so only the student's own template
    is checked against its stop ids."""
    check_end_of_turn(student_tokenizer, student_eos_ids, None if cross else teacher_tokenizer)
    if teacher_tokenizer is not None and not cross:
        check_templates(student_tokenizer, teacher_tokenizer)
