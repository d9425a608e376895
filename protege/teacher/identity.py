"""A teacher's identity across a resume: what changed between the checkpoint's teacher and this run's.

Every checkpoint keeps `teacher.capabilities.identity` (protege.teacher.base.Capabilities: kind, source, and
the view settings that change the signal: system prompt, privileged keys, EMA rate, tokenizer, the routed
list in order). `identity_changes(old, new)` names each difference as `field: old -> new`, nested fields
dotted (teachers[0].name); protege.run_state refuses a resume with any unless resume_new_teacher=true.
"""

from __future__ import annotations


def flatten(value, prefix: str = "") -> dict[str, object]:
    """{dotted field: leaf value} of nested dicts and lists (lists indexed: teachers[0].source)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, (list, tuple)):
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out or {prefix: []}
    return {prefix: value}


def identity_changes(old: dict, new: dict) -> list[str]:
    """Each field that differs, as 'field: old -> new' ('(none)' where one side lacks it), in a stable order."""
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k, '(none)')!r} -> {b.get(k, '(none)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "(none)") != b.get(k, "(none)")]
