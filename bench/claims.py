r"""Binds each measured number in README.md and docs/*.md to one value of one results file, and checks or
re-renders it.

Syntax (chosen over a separate bindings file: the binding sits next to its number, so it survives edits
of the sentence around it, and an HTML comment is invisible in the rendered page). Right after a number
and its unit, an HTML comment holds an expression over references in braces:

    1.61x<!-- {vs_trl_threads1.md | protege, 8 prompts/step, micro-batch 8 | tokens/s vs TRL} -->
    111.2 s<!-- {quickstart.json | wall_s} -->
    -69%<!-- 100 * ({report.md | reverse KL on student | after} / {report.md | reverse KL on student | before} - 1) -->
    492 s<!-- {docs/demo/report.md | after "Total time"} -->

A reference is `{FILE | KEY}`. FILE is a name under bench/results/ or a path from the repository root
(docs/demo/report.md; `report.md` alone means that file). KEY addresses exactly one value:
- .json: a dotted path, `a.b.0.c` (integers index lists);
- .md, a table cell: `ROW | COLUMN`: the row whose first cell starts with ROW and the column whose
  header is exactly COLUMN (a first cell equal to ROW wins over those it begins), in the one table of the file that has both (more than one match is an
  error). `ROW & CELL2` also asks the row's second cell to be CELL2; `| table N` picks the N-th table of
  the file (from 1); `| number N` takes the cell's N-th number (default the first: "2.80 -> 0.95 (-66%)"
  holds 2.80, 0.95 and -66);
- .md, a labelled number outside tables: `after "LABEL"`: the first number after LABEL on its line
  (`| number N`: the N-th), LABEL occurring exactly once in the file.
The expression may use numbers, + - * / and parentheses (a ratio of two keys, a unit change `/ 1000`).
In a table row each `|` of a binding is written `\|` (GitHub splits table cells on a bare `|`, even
inside a comment): `| lean | 9.50<!-- {generate.md \| fixed & lean \| CPU s} --> |`.

A number that looks measured but is a setting, a target or plain arithmetic is marked
`<!-- given: why -->` (for example `8 MB pieces<!-- given: the chunk size -->`).

`--check` fails when a bound number differs from its rendering (the expression's value at the number of
decimals written in the page, with the page's sign), when a file or key is missing or ambiguous, and when
a measured-looking number (x, %, s, ms, min, GB, MB, GiB, MiB, GB/s, tokens/s) has no binding.
`--write` re-renders each bound number from its results. Code blocks and inline code are not read.

    python bench/claims.py --check            # README.md and docs/*.md
    python bench/claims.py --write docs/scale.md
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMENT = re.compile(r"<!--(.*?)-->", re.S)
# the number (and its unit) right before a binding comment
BOUND = re.compile(r"(?:(?<=[\s(\[])(?P<sign>[-+]))?(?<![\w.])(?P<num>\d+(?:\.\d+)?)(?P<unit>[^\d<>|]{0,16})$")
MEASURED = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:x\b|%| ?s\b| ?ms\b| ?min\b| minutes?\b| GB/s\b| GB\b| MB\b"
                      r"| GiB\b| MiB\b| tokens/s\b| tok/s\b)")
REF = re.compile(r"\{([^{}|]+)\|([^{}]+)\}")
NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class ClaimError(ValueError):
    """A binding names a file or key that does not exist, or one that is ambiguous."""


@dataclass
class Claim:
    page: str
    line: int
    start: int          # offset of the number (its sign included) in the page
    end: int            # offset just after the number's digits
    written: str        # the number as the page writes it, e.g. "-69" or "1.61"
    expr: str           # the comment's expression


def results_path(name: str) -> Path:
    name = name.strip()
    if name == "report.md":
        return REPO / "docs" / "demo" / "report.md"
    return REPO / name if "/" in name else REPO / "bench" / "results" / name


def _tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Markdown tables of a file: (header cells, body rows of cells)."""
    out, rows = [], []
    for line in text.splitlines() + [""]:
        if line.lstrip().startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if len(rows) >= 2:
            out.append((rows[0], [r for r in rows[2:]]))
        rows = []
    return out


def _nth_number(cell: str, index: int, where: str) -> float:
    numbers = NUMBER.findall(cell)
    if len(numbers) < index:
        raise ClaimError(f"{where}: '{cell}' holds {len(numbers)} numbers, not {index}")
    return float(numbers[index - 1])


def _md_value(path: Path, key: str) -> float:
    text = path.read_text()
    label = re.fullmatch(r'\s*after\s+"(.+)"\s*(?:\|\s*number (\d+)\s*)?', key)
    if label:
        hits = [m.end() for m in re.finditer(re.escape(label.group(1)), text)]
        if len(hits) != 1:
            raise ClaimError(f'{path.name}: "{label.group(1)}" occurs {len(hits)} times, not once')
        rest = text[hits[0]:].split("\n", 1)[0]
        return _nth_number(rest, int(label.group(2) or 1), f'{path.name} after "{label.group(1)}"')
    parts = [p.strip() for p in key.split("|")]
    options = dict(p.split() for p in parts[2:] if re.fullmatch(r"(table|number) \d+", p))
    if len(parts) < 2 or len(options) != len(parts) - 2:
        raise ClaimError(f"{path.name}: key '{key}' is neither 'ROW | COLUMN [| table N] [| number N]' "
                         f"nor 'after \"LABEL\"'")
    (row_key, col), table_no = parts[:2], options.get("table")
    lead = [c.strip() for c in row_key.split(" & ")]  # the first cell's start, then further cells exactly
    hits = []
    for n, (header, body) in enumerate(_tables(text), 1):
        if table_no not in (None, str(n)) or col not in header:
            continue
        rows = [r for r in body if len(r) >= len(lead) and r[0].startswith(lead[0]) and r[1:len(lead)] == lead[1:]]
        rows = [r for r in rows if r[0] == lead[0]] or rows  # an exact first cell wins over a prefix
        hits += [(n, r[header.index(col)]) for r in rows if header.index(col) < len(r)]
    if len(hits) != 1:
        raise ClaimError(f"{path.name}: row '{row_key}' / column '{col}' matches {len(hits)} cells, not one "
                         f"(tables {[h[0] for h in hits]}; add '| table N' or '& NEXT CELL')")
    return _nth_number(hits[0][1], int(options.get("number", 1)), f"{path.name} row '{row_key}' / column '{col}'")


def _json_value(path: Path, key: str) -> float:
    node = json.loads(path.read_text())
    for part in key.strip().split("."):
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise ClaimError(f"{path.name}: no key '{part}' in path '{key.strip()}'") from None
    if not isinstance(node, (int, float)) or isinstance(node, bool):
        raise ClaimError(f"{path.name}: '{key.strip()}' is {node!r}, not a number")
    return float(node)


def lookup(name: str, key: str) -> float:
    """The one value a reference {name | key} addresses."""
    path = results_path(name)
    if not path.exists():
        raise ClaimError(f"no results file {path.relative_to(REPO)}")
    return _json_value(path, key) if path.suffix == ".json" else _md_value(path, key)


def evaluate(expr: str) -> float:
    """Value of a binding expression: references replaced by their values, then + - * / only."""
    values: list[float] = []

    def ref(m: re.Match) -> str:
        values.append(lookup(m.group(1), m.group(2)))
        return f"__v{len(values) - 1}"

    source = REF.sub(ref, expr.strip())
    if not values:
        raise ClaimError(f"binding '{expr.strip()}' names no {{FILE | KEY}}")

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.Name) and node.id.startswith("__v"):
            return values[int(node.id[3:])]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        raise ClaimError(f"binding '{expr.strip()}': only numbers, references, + - * / and ( ) are allowed")

    try:
        return walk(ast.parse(source, mode="eval"))
    except SyntaxError:
        raise ClaimError(f"binding '{expr.strip()}' is not an expression") from None


def render(value: float, written: str) -> str:
    """`value` at the decimals and with the sign convention of `written` ("+5", "-69", "1.61")."""
    decimals = len(written.split(".")[1]) if "." in written else 0
    text = f"{abs(value):.{decimals}f}"
    if value < 0 and float(text) != 0:
        return "-" + text
    return ("+" + text) if written.startswith("+") else text


def _masked(text: str) -> str:
    """The page with code blocks and inline code blanked (same length, so offsets hold)."""
    blank = lambda m: re.sub(r"[^\n]", " ", m.group())  # noqa: E731
    text = re.sub(r"```.*?```", blank, text, flags=re.S)
    return re.sub(r"`[^`\n]*`", blank, text)


def claims(page: str, text: str) -> tuple[list[Claim], list[str]]:
    """The page's bound numbers, and its measured-looking numbers that have no binding or `given`."""
    masked = _masked(text)
    found, covered, misplaced = [], set(), []
    for m in COMMENT.finditer(masked):
        body = m.group(1).strip()
        num = BOUND.search(masked[max(0, m.start() - 40):m.start()])
        base = max(0, m.start() - 40)
        if "{" in body and not num:
            misplaced.append(f"{page}:{masked.count(chr(10), 0, m.start()) + 1}: a binding with no number (and "
                             f"unit) right before it: {body}")
        if num and (body.startswith("given") or "{" in body):
            covered.add(base + num.start("num"))
        if num and "{" in body:
            start = base + (num.start("sign") if num.group("sign") else num.start("num"))
            written = (num.group("sign") or "") + num.group("num")
            line_start = masked.rfind("\n", 0, start) + 1
            in_table = masked[line_start:start].lstrip().startswith("|")
            if in_table and re.search(r"(?<!\\)\|", body):
                misplaced.append(f"{page}:{masked.count(chr(10), 0, start) + 1}: a binding in a table row must write "
                                 f"its | as \\| (else the table splits there): {body}")
            found.append(Claim(page, masked.count("\n", 0, start) + 1, start, base + num.end("num"), written,
                               body.replace("\\|", "|")))
    unbound = [f"{page}:{masked.count(chr(10), 0, m.start()) + 1}: '{m.group()}' looks measured but has no binding"
               for m in MEASURED.finditer(COMMENT.sub(lambda c: " " * len(c.group()), masked))
               if m.start() not in covered]
    return found, unbound + misplaced


def check_text(page: str, text: str) -> list[str]:
    """Every problem of one page's text: drifted numbers, broken bindings, unbound measurements."""
    found, problems = claims(page, text)
    for c in found:
        try:
            want = render(evaluate(c.expr), c.written)
        except ClaimError as e:
            problems.append(f"{page}:{c.line}: {e}")
            continue
        if want != c.written:
            problems.append(f"{page}:{c.line}: the page says {c.written}, its results give {want} ({c.expr})")
    return problems


def write_text(page: str, text: str) -> str:
    """The page with every bound number re-rendered from its results."""
    found, _ = claims(page, text)
    for c in sorted(found, key=lambda c: -c.start):
        try:
            text = text[:c.start] + render(evaluate(c.expr), c.written) + text[c.end:]
        except ClaimError:
            pass  # left as written; --check names it
    return text


def pages() -> list[Path]:
    return [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="fail on any drifted, broken or unbound number")
    mode.add_argument("--write", action="store_true", help="re-render bound numbers from their results")
    ap.add_argument("pages", nargs="*", help="pages to read (default: README.md and docs/*.md)")
    args = ap.parse_args(argv)
    paths = [Path(p).resolve() for p in args.pages] or pages()
    problems, count = [], 0
    for path in paths:
        rel, text = str(path.relative_to(REPO)), path.read_text()
        if args.write:
            path.write_text(write_text(rel, text))
        count += len(claims(rel, path.read_text())[0])
        problems += check_text(rel, path.read_text())
    print("\n".join(problems) if problems else f"{count} bound numbers in {len(paths)} pages agree with their results")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
