"""Prompt datasets: load rows, turn them into tokenized chat prompts (+ optional reference answers).

Accepted rows (TRL's conventions):
  {"prompt": "text"}                                   plain user question
  {"prompt": [{"role": "user", "content": ...}, ...]}  chat prompt
  {"messages": [..., {"role": "assistant", ...}]}      chat; a final assistant turn is the reference
  {"prompt": ..., "completion": "text"}                explicit reference completion
Empty or malformed rows are skipped and counted (with a warning); a missing column is an error
listing the columns found; message roles other than system/user/assistant/tool/developer are kept
and counted (with a warning). Prompts longer than max_prompt_tokens keep their last tokens (counted).
A JSONL file is read as UTF-8 (a byte-order mark is dropped) and split on "\n" only; a line that
does not parse (including one nested too deeply for the parser) is one counted bad row.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("protege")
_BAD = "__protege_bad_row__"
KNOWN_ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass
class Example:
    messages: list[dict]  # chat prompt (no final assistant turn)
    reference: str | None = None  # reference completion text, if the row has one
    columns: dict = field(default_factory=dict)  # the row's other columns (privileged context, teacher key, ...)


@dataclass
class PromptSet:
    examples: list[Example]
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    unknown_roles: dict[str, int] = field(default_factory=dict)  # kept rows' messages with an unusual role

    def __len__(self) -> int:
        return len(self.examples)


def load_rows(path: str, split: str = "train") -> list[dict]:
    """Rows of a builtin set, a local file (.jsonl/.json/.parquet/.csv) or a hub dataset."""
    if path.startswith("builtin:"):
        from protege.prompts import load_builtin_prompts

        name = path.split(":", 1)[1]
        if name != "everyday":
            raise ValueError(f"data.path={path!r}: the only builtin set is builtin:everyday")
        return [{"prompt": p} for p in load_builtin_prompts("heldout" if split in ("heldout", "test") else "train")]
    import datasets

    p = Path(path)
    if p.suffix == ".jsonl" and p.exists():  # line by line: one broken line is skipped, not fatal
        return _jsonl_rows(p)
    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    if p.suffix in kinds:
        if not p.exists():
            raise FileNotFoundError(f"data file {p} does not exist: set data.path (or data.eval_path) to an existing "
                                    ".jsonl/.json/.parquet/.csv file, a hub dataset id or builtin:everyday")
        try:
            ds = datasets.load_dataset(kinds[p.suffix], data_files=str(p), split="train")
        except Exception as e:  # corrupt parquet, ragged csv, bad json: say which file
            cause = e.__cause__ or e.__context__ or e
            raise ValueError(f"could not read the data file {p} as {p.suffix[1:]} ({type(cause).__name__}: "
                             f"{str(cause).strip()[:300]}); fix or replace the file") from e
    elif p.exists():
        raise ValueError(f"data path {p}: unsupported file type {p.suffix!r}; use .jsonl, .json, .parquet or .csv")
    else:
        try:
            ds = datasets.load_dataset(path, split=split)
        except Exception as e:  # offline, unknown id, bad split: say which
            raise ValueError(f"could not load dataset {path!r} split {split!r}: {e}") from e
    return list(ds)


def _warn_invalid_utf8(p: Path, raw: bytes, text: str) -> int:
    """Count the invalid UTF-8 sequences that decoding replaced by U+FFFD (genuine U+FFFD characters,
    EF BF BD in the file, excluded) and warn, naming the file and the first lines; the count."""
    replaced = text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")
    if replaced > 0:
        lines = [n for n, line in enumerate(raw.split(b"\n"), 1)
                 if line.decode("utf-8", errors="replace").count("\ufffd") > line.count(b"\xef\xbf\xbd")]
        log.warning("data file %s: %d invalid UTF-8 byte sequence(s) on %d line(s) (lines %s%s) were read as U+FFFD "
                    "(replacement character): the prompts there differ from the file; re-save it as UTF-8", p,
                    replaced, len(lines), ", ".join(map(str, lines[:5])), ", ..." if len(lines) > 5 else "")
    return max(replaced, 0)


def _jsonl_rows(p: Path) -> list[dict]:
    """One row per line of a JSONL file. Lines are split on "\\n" only (U+2028, U+0085 and the like are
    valid inside JSON strings), a UTF-8 byte-order mark is dropped, and a line that is not a JSON object
    (invalid, nested too deeply for the parser, or another JSON value) becomes a counted bad row. Bytes
    that are not UTF-8 are read as U+FFFD, counted and warned about with the lines they are on."""
    rows = []
    raw = p.read_bytes()
    text = raw.decode("utf-8-sig", errors="replace")
    _warn_invalid_utf8(p, raw, text)
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            row = {_BAD: f"invalid JSON ({e.msg})", "line": n}
        except RecursionError:  # e.g. '[' * 100000: the parser's stack, not the file, gives out
            row = {_BAD: "a line nested too deeply", "line": n}
        rows.append(row if isinstance(row, dict) else {_BAD: "a line that is not a JSON object", "line": n})
    return rows


def to_examples(rows: list[dict], *, prompt_column: str = "prompt", messages_column: str = "messages",
                completion_column: str = "completion", system_prompt: str | None = None) -> PromptSet:
    """Normalise rows into chat Examples; malformed rows are skipped and counted by reason."""
    good = [r for r in rows if _BAD not in r]
    if good and not any(prompt_column in r or messages_column in r for r in good[:100]):
        raise ValueError(f"dataset has neither a {prompt_column!r} nor a {messages_column!r} column; columns found: "
                         f"{sorted(good[0])}. Set data.prompt_column or data.messages_column.")
    out = PromptSet(examples=[])
    for row in rows:
        try:
            ex = _row_to_example(row, prompt_column, messages_column, completion_column)
        except _BadRow as e:
            out.skipped += 1
            out.reasons[str(e)] = out.reasons.get(str(e), 0) + 1
            continue
        if system_prompt and ex.messages[0].get("role") != "system":
            ex.messages.insert(0, {"role": "system", "content": system_prompt})
        for m in ex.messages:
            if m["role"] not in KNOWN_ROLES:
                out.unknown_roles[m["role"]] = out.unknown_roles.get(m["role"], 0) + 1
        out.examples.append(ex)
    if out.skipped:
        log.warning("skipped %d malformed row(s): %s", out.skipped, out.reasons)
    if out.unknown_roles:
        log.warning("messages with roles other than %s (count by role): %s; the chat template may refuse or "
                    "mangle them: rename them (e.g. human -> user, gpt -> assistant)", "/".join(KNOWN_ROLES),
                    out.unknown_roles)
    return out


class _BadRow(Exception):
    pass


def _row_to_example(row: dict, pcol: str, mcol: str, ccol: str) -> Example:
    """One row as an Example; the columns other than the prompt, messages and completion are kept as they are
    in `Example.columns` (teachers read theirs from there: privileged context, a routing key, ...)."""
    ex = _row_messages(row, pcol, mcol, ccol)
    ex.columns = {k: v for k, v in row.items() if k not in (pcol, mcol, ccol)}
    return ex


def _row_messages(row: dict, pcol: str, mcol: str, ccol: str) -> Example:
    if _BAD in row:
        raise _BadRow(row[_BAD])
    prompt = row.get(pcol)
    if prompt is None and row.get(mcol) is not None:
        msgs = _check_messages(row[mcol])
        if msgs[-1]["role"] == "assistant":
            if len(msgs) < 2:
                raise _BadRow("messages hold only an assistant turn")
            return Example(messages=msgs[:-1], reference=msgs[-1]["content"])
        return Example(messages=msgs)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise _BadRow("empty prompt")
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        messages = _check_messages(prompt)
    else:
        raise _BadRow(f"prompt is {type(prompt).__name__}, expected str or list of messages")
    ref = row.get(ccol)
    if isinstance(ref, list):  # conversational completion
        ref = "".join(m.get("content", "") for m in ref if isinstance(m, dict))
    if isinstance(ref, (int, float)) and not isinstance(ref, bool) and ref == ref:  # CSV/parquet numbers
        ref = str(ref)
    if isinstance(ref, float):  # NaN: an empty CSV cell
        ref = None
    if ref is not None and not isinstance(ref, str):
        raise _BadRow(f"completion is {type(ref).__name__}, expected str")
    return Example(messages=messages, reference=ref or None)


def _check_messages(msgs) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise _BadRow("messages is not a non-empty list")
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _BadRow("a message lacks a string role or content")
    if not any(m["content"].strip() for m in msgs):
        raise _BadRow("all messages are empty")
    return [dict(role=m["role"], content=m["content"]) for m in msgs]


def load_prompt_sets(data, *, seed: int) -> tuple[PromptSet, PromptSet | None]:
    """The training prompts and the held-out ones of a DataConfig (protege.config.DataConfig).

    Held out: data.eval_path when set, else the builtin set's held-out split, else a seeded
    data.eval_fraction of the training rows (removed from training), else none."""
    rows = load_rows(data.path, data.split)
    eval_rows = None
    if data.eval_path:
        eval_rows = load_rows(data.eval_path, data.split)
    elif data.path.startswith("builtin:"):
        eval_rows = load_rows(data.path, "heldout")
    elif data.eval_fraction > 0:
        cut = max(1, int(len(rows) * data.eval_fraction))
        shuffled = random.Random(seed).sample(rows, len(rows))
        eval_rows, rows = shuffled[:cut], shuffled[cut:]
    kw = dict(prompt_column=data.prompt_column, messages_column=data.messages_column,
              completion_column=data.completion_column, system_prompt=data.system_prompt)
    return to_examples(rows, **kw), (to_examples(eval_rows, **kw) if eval_rows else None)


class PromptTokenizer:
    """Chat-templates prompts and tokenizes references; truncates long prompts from the left."""

    def __init__(self, tokenizer, max_prompt_tokens: int):
        self.tok = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.truncated = 0

    def prompt_ids(self, ex: Example) -> torch.Tensor:
        if getattr(self.tok, "chat_template", None):
            ids = self.tok.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:  # plain LM: join the turns
            ids = self.tok("\n".join(m["content"] for m in ex.messages) + "\n", add_special_tokens=True)["input_ids"]
        if len(ids) > self.max_prompt_tokens:
            self.truncated += 1
            ids = ids[-self.max_prompt_tokens:]
        return torch.tensor(ids, dtype=torch.long)

    def reference_ids(self, ex: Example, max_tokens: int) -> torch.Tensor:
        ids = self.tok(ex.reference, add_special_tokens=False)["input_ids"][: max_tokens - 1]
        return torch.tensor(ids + [self.tok.eos_token_id], dtype=torch.long)


class PromptStream:
    """Endless shuffled stream of examples with a resumable position (epoch, index)."""

    def __init__(self, n: int, seed: int):
        if n == 0:
            raise ValueError("the training dataset has no usable rows")
        self.n, self.seed = n, seed
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.index == self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self._order[self.index])
            self.index += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise ValueError(f"resume: the dataset now has {self.n} usable rows, the checkpoint saw {state['n']}")
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._permutation()
