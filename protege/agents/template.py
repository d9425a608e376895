"""Chat-template arithmetic of multi-turn rollouts: an observation's token ids as the template's difference.

    before = render(history + [assistant turn])                        (no generation prompt)
    after  = render(history + [assistant turn] + observation, add_generation_prompt=True)
    cut    = just past the last end-of-turn (EOS) id of `before`: where the student's sampled turn ended
    observation ids = after[cut:]       (template glue after the turn, the observation, the next header)

The history itself is never decoded and re-encoded into the trajectory: its ids are the ones the student
sampled and the ones appended before. This needs a template that keeps earlier turns as a prefix
(render(k turns) is a prefix of render(k + 1 turns)); `check_prefix_template` checks that once per
tokenizer and stops with a clear error otherwise (e.g. templates that strip <think> from earlier turns;
splitting such trajectories into several records, as Tinker does, is future work).
"""

from __future__ import annotations

_CHECKED: dict[tuple[int, str], bool] = {}


def render(tok, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> list[int]:
    """The chat template's token ids of `messages` (and the tools' schemas, when the template shows them)."""
    ids = tok.apply_chat_template(messages, tools=tools or None, add_generation_prompt=add_generation_prompt,
                                  tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def end_of_turn_cut(ids: list[int], eos_ids: tuple[int, ...]) -> int:
    """The index just past the last end-of-turn id in `ids` (where the last assistant turn ends)."""
    eos = set(eos_ids)
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] in eos:
            return i + 1
    raise ValueError("the chat template ends an assistant turn with none of the end-of-turn ids "
                     f"{sorted(eos)}: multi-turn rollouts need the token that closes a turn to be one of the "
                     "tokenizer's EOS ids (set its eos_token, or generation_config.json's eos_token_id)")


def observation_ids(tok, history: list[dict], observation: list[dict], tools: list[dict] | None,
                    eos_ids: tuple[int, ...], sampled_end: int | None = None) -> list[int]:
    """Token ids that follow the student's last turn (ending at its end-of-turn id): the template's glue, the
    observation messages and the next assistant header. `history` ends with that assistant turn. When the student
    stopped with another EOS id (`sampled_end`, e.g. <|endoftext|>) than the one the template closes turns with,
    the template's end-of-turn id comes first, so the history is the one the template shows."""
    before = render(tok, history, tools, add_generation_prompt=False)
    after = render(tok, history + observation, tools, add_generation_prompt=True)
    cut = end_of_turn_cut(before, eos_ids)
    if after[:cut] != before[:cut]:
        raise ValueError(_not_prefix(tok))
    return after[cut:] if sampled_end in (None, before[cut - 1]) else after[cut - 1:]


def check_prefix_template(tok, eos_ids: tuple[int, ...], tools: list[dict] | None = None) -> None:
    """Stop with a clear error unless the chat template keeps earlier turns as a prefix: 2 turns vs 3 turns
    (a user follow-up and a tool answer; an assistant turn with a <think> block). Checked once per tokenizer."""
    key = (id(tok), str(getattr(tok, "chat_template", "")))
    if _CHECKED.get(key):
        return
    if not getattr(tok, "chat_template", None):
        raise ValueError("multi-turn rollouts (env:) need a tokenizer with a chat template; this one has none")
    two = [{"role": "user", "content": "What is 2+3?"},
           {"role": "assistant", "content": "<think>2+3 is 5</think>It is 5."}]
    for follow_up in ({"role": "user", "content": "And 3+4?"}, {"role": "tool", "name": "add", "content": "7"}):
        try:
            observation_ids(tok, two, [follow_up], tools, eos_ids)
        except ValueError:
            raise
        except Exception as e:  # the template refuses a role (e.g. no tool role): checked with the user turn only
            if follow_up["role"] == "user":
                raise ValueError(f"the chat template cannot render a conversation ({type(e).__name__}: {e})") from None
    _CHECKED[key] = True


def _not_prefix(tok) -> str:
    return (f"the chat template of {getattr(tok, 'name_or_path', 'this tokenizer')!r} does not keep earlier turns as "
            "a prefix (rendering k+1 turns changes the ids of the first k, e.g. it strips <think> blocks from earlier "
            "assistant turns): multi-turn rollouts append observations by token ids and would train on a history "
            "the template never shows. Use a chat template that keeps every turn as written (a training template); "
            "splitting such trajectories into several records, as Tinker does, is not supported yet")
