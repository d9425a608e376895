"""docs/architecture.md stays true of the code: every file path it cites exists, and every function, method,
class or attribute it names (`name`, `a.b`, name(...) in its diagrams) is defined in the code."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
FOLDERS = ("protege", "protege/teacher", "protege/rollout", "protege/server", "protege/losses", "tests", "bench")
PATH = re.compile(r"(?<![\w/.])((?:[\w]+/)*[\w]+\.(?:py|json|md)|(?:[\w]+/)+)(?![\w/])")
CALL = re.compile(r"\b([A-Za-z_][\w.]*)\(")
TICKED = re.compile(r"`([^`]+)`")
IDENT = re.compile(r"[A-Za-z_]\w*")
CAMEL = re.compile(r"\b(?=\w*[a-z])(?=(?:\w*[A-Z]){2})[A-Za-z]\w*\b")  # class names: RolloutEngine, HFEngine
WORDS = {"for", "if", "and", "or", "not", "in", "with", "each", "to", "of", "the", "a", "as", "OpenAI", "vLLM",
         "JSON", "LoRA"}


def cited_paths(text: str) -> set[str]:
    return {m for m in PATH.findall(text) if not m.startswith(("http", "www"))}


def resolves(path: str) -> bool:
    """A cited path exists from the repository root or from one of the folders the doc writes relative to."""
    return any((ROOT / base / path).exists() for base in ("", *FOLDERS))


def cited_names(text: str) -> set[str]:
    """Identifiers the doc names as code: callees in its diagrams and every part of a backticked name."""
    names = set()
    for m in CALL.finditer(text):
        names.update(IDENT.findall(m.group(1)))
    names.update(CAMEL.findall(text))
    for span in TICKED.findall(text):
        head = re.split(r"[\s(:=<>-]", span.strip(), maxsplit=1)[0]
        if re.fullmatch(r"[A-Za-z_][\w.]*", head) and not head.endswith((".py", ".md")):
            names.update(IDENT.findall(head))
    return {n for n in names if n not in WORDS and not n.isupper() and len(n) > 1}


def defined(source: str, name: str) -> bool:
    pattern = rf"(?:def|class)\s+{name}\b|\b{name}\s*(?::[^=\n]*)?=|\.{name}\b\s*=|\b{name}\s*:|^\s*{name}\s*[,)]"
    return re.search(pattern, source, re.M) is not None


def test_every_cited_path_exists():
    missing = sorted(p for p in cited_paths(DOC.read_text()) if not resolves(p))
    assert missing == []


def test_every_cited_name_is_defined_in_the_code():
    source = "\n".join(p.read_text() for base in ("protege", "tests", "bench") for p in (ROOT / base).rglob("*.py"))
    import torch  # torch's and accelerate's own names the doc cites (optimizer.step, zero_grad, acc.reduce)
    from accelerate import Accelerator

    torch_names = set(dir(torch.optim.Optimizer)) | set(dir(torch.Tensor)) | set(dir(torch.nn.Module)) | \
        set(dir(Accelerator))
    missing = sorted(n for n in cited_names(DOC.read_text()) if n not in torch_names and not defined(source, n))
    assert missing == []


def test_the_checks_catch_a_stale_name_and_path():
    stale = "`build.build_teacher_from_shapes` in protege/teacher/no_such.py; `Distiller.collect`"
    source = "\n".join(p.read_text() for p in (ROOT / "protege").rglob("*.py"))
    assert [n for n in cited_names(stale) if not defined(source, n)] == ["build_teacher_from_shapes"]
    assert [p for p in cited_paths(stale) if not resolves(p)] == ["protege/teacher/no_such.py"]
