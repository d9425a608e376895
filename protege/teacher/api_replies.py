"""Reading an OpenAI-compatible generation reply (chat or legacy completions) into what protege stores.

    {"text", "finish_reason", "usage": {"prompt_tokens", "completion_tokens"},
     "token_ids", "logprobs", "top_ids", "top_logprobs"}   (the last four None when no logprobs were asked)

A malformed reply (not JSON, no choice, missing or mistyped fields, logprobs that are NaN or > 0, top-k
ids outside the vocabulary, top-k mass > 1) raises InvalidReply, which the HTTP client retries like a
5xx and then reports (protege.teacher.replies). An endpoint that answers well-formed replies without
the token ids a top-k loss needs ("token_id:<id>" strings: vLLM's return_tokens_as_token_ids) raises
a ValueError at once: asking again cannot help. Top-k lists are sorted by logprob (descending) and
cut to k (vLLM may add the sampled token as a (k+1)-th entry). JSON's floor (-9999) is kept as is.
"""

from __future__ import annotations

import orjson
import torch

from protege.teacher.replies import MASS_TOL, InvalidReply, check_values


def parse_generation_reply(body: bytes, *, chat: bool, topk: int, vocab_size: int | None, url: str) -> dict:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidReply("body", f"not JSON ({exc}); it starts {bytes(body[:60])!r}") from None
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        raise InvalidReply("choices", f"expected one choice, got {str(choices)[:80]!r}")
    choice = choices[0]
    text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise InvalidReply("choices[0].text", f"not a string: {str(text)[:60]!r}")
    finish = choice.get("finish_reason")
    if finish not in ("stop", "length"):
        raise InvalidReply("choices[0].finish_reason", f"{str(finish)[:40]!r}; expected 'stop' or 'length'")
    value = {"text": text, "finish_reason": finish, "token_ids": None, "logprobs": None, "top_ids": None,
             "top_logprobs": None}
    if topk:
        value.update(_chat_logprobs(choice, topk, url) if chat else _legacy_logprobs(choice, topk, url))
        _check(value, vocab_size)
    usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else {}
    counted = len(value["token_ids"]) if value["token_ids"] is not None else 0
    value["usage"] = {"prompt_tokens": _count(usage.get("prompt_tokens"), 0),
                      "completion_tokens": _count(usage.get("completion_tokens"), counted)}
    return value


def _count(value, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def token_id(token, url: str, where: str) -> int:
    """The id in a "token_id:<id>" string (vLLM's return_tokens_as_token_ids); ValueError for anything else."""
    if isinstance(token, str) and token.startswith("token_id:") and token[9:].lstrip("-").isdigit():
        return int(token[9:])
    raise ValueError(f"the teacher API {url} sent the token {str(token)[:40]!r} at {where}, not a token id: a top-k "
                     "loss needs the teacher's token ids (vLLM and protege serve-teacher send them with "
                     "return_tokens_as_token_ids). With an API that sends only text, use loss.name=sft "
                     "(supervised KD on its text, mix.lmbda=0, mix.seq_kd=true).")


def _top(pairs: list[tuple[int, float]], k: int, where: str) -> tuple[list[int], list[float]]:
    if len(pairs) < k:
        raise InvalidReply(where, f"holds {len(pairs)} top logprobs; asked for {k}")
    best = sorted(pairs, key=lambda p: -p[1])[:k]
    return [i for i, _ in best], [lp for _, lp in best]


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidReply(where, f"logprob {str(value)[:40]!r} is not a number")
    return float(value)


def _chat_logprobs(choice: dict, k: int, url: str) -> dict:
    content = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
    if not isinstance(content, list):
        raise InvalidReply("choices[0].logprobs.content", f"missing: {str(choice.get('logprobs'))[:80]!r}")
    ids, lps, top_ids, top_lps = [], [], [], []
    for j, entry in enumerate(content):
        where = f"choices[0].logprobs.content[{j}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("top_logprobs"), list):
            raise InvalidReply(where, f"not {{token, logprob, top_logprobs}}: {str(entry)[:80]}")
        ids.append(token_id(entry.get("token"), url, where))
        lps.append(_number(entry.get("logprob"), where))
        pairs = [(token_id(t.get("token") if isinstance(t, dict) else t, url, where),
                  _number(t.get("logprob"), where)) for t in entry["top_logprobs"]]
        t_ids, t_lps = _top(pairs, k, where + ".top_logprobs")
        top_ids.append(t_ids)
        top_lps.append(t_lps)
    return {"token_ids": ids, "logprobs": lps, "top_ids": top_ids, "top_logprobs": top_lps}


def _legacy_logprobs(choice: dict, k: int, url: str) -> dict:
    lp = choice.get("logprobs")
    fields = ("tokens", "token_logprobs", "top_logprobs")
    if not isinstance(lp, dict) or not all(isinstance(lp.get(f), list) for f in fields) \
            or not len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]):
        raise InvalidReply("choices[0].logprobs", f"not {{tokens, token_logprobs, top_logprobs}} of equal length: "
                                                  f"{str(lp)[:80]}")
    ids, lps, top_ids, top_lps = [], [], [], []
    for j, (tok, value, tops) in enumerate(zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])):
        where = f"choices[0].logprobs[{j}]"
        ids.append(token_id(tok, url, where))
        lps.append(_number(value, where))
        if not isinstance(tops, dict):
            raise InvalidReply(where + ".top_logprobs", f"not a {{token: logprob}} object: {str(tops)[:60]}")
        t_ids, t_lps = _top([(token_id(t, url, where), _number(v, where)) for t, v in tops.items()], k,
                            where + ".top_logprobs")
        top_ids.append(t_ids)
        top_lps.append(t_lps)
    return {"token_ids": ids, "logprobs": lps, "top_ids": top_ids, "top_logprobs": top_lps}


def _check(value: dict, vocab_size: int | None) -> None:
    """Logprobs <= 0 and not NaN, ids inside the vocabulary, top-k mass <= 1 (protege.teacher.replies)."""
    n = len(value["token_ids"])
    if n == 0:
        return
    arrays = {"token_logprobs": torch.tensor([value["logprobs"]], dtype=torch.float32),
              "topk_ids": torch.tensor([value["top_ids"]], dtype=torch.long),
              "topk_logprobs": torch.tensor([value["top_logprobs"]], dtype=torch.float32)}
    ids = torch.tensor(value["token_ids"])
    if vocab_size is not None and (ids.min() < 0 or ids.max() >= vocab_size):
        raise InvalidReply("token ids", f"a token id is outside the vocabulary [0, {vocab_size})")
    check_values(arrays, [n], vocab_size if vocab_size is not None else 1 << 62, MASS_TOL["float32"])
