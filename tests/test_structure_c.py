"""The C sources' structure (issue 20): floors, bottom up, with nothing calling up a floor.

Checked on src/ as text, without a compiler: comments, strings and character literals are
blanked, then
  - the file graph (an edge a.c -> b.c where a.c names a function or variable b.c defines without
    `static`, directly or in the body of an inline function of a header it includes; an edge
    x -> y.h for each `#include "y.h"`) has no cycle;
  - no .c file is over MAX_FILE_LINES lines;
  - no function is over MAX_FUNCTION_LINES lines (from the line of its name to its closing brace),
    but the VM's dispatch switch (vm_step: one line per opcode).
"""
from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
MAX_FILE_LINES = 900
MAX_FUNCTION_LINES = 120
LONG_FUNCTIONS_ALLOWED = {"vm_step"}

_TOKEN = re.compile(
    r"""//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'""", re.S
)
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)
_IDENT = re.compile(r"[A-Za-z_]\w*")
_KEYWORDS = {"if", "for", "while", "switch", "return", "sizeof", "do", "else", "case"}


def blank(text: str) -> str:
    """text with comments, string and character literals and preprocessor lines blanked (every
    newline kept, so line numbers stay)."""

    def keep_lines(m: re.Match) -> str:
        s = m.group(0)
        if s[0] == '"':
            return '""'
        if s[0] == "'":
            return "' '"
        return re.sub(r"[^\n]", " ", s)

    text = _TOKEN.sub(keep_lines, text)
    out, cont = [], False
    for line in text.split("\n"):
        pre = cont or line.lstrip().startswith("#")
        cont = pre and line.rstrip().endswith("\\")
        out.append("" if pre else line)
    return "\n".join(out)


class Top:
    """A top-level item of a C file: a function definition (with its body) or a declaration."""

    def __init__(self, head: str, body: str | None, first_line: int, last_line: int):
        self.head, self.body, self.first_line, self.last_line = head, body, first_line, last_line

    @property
    def is_static(self) -> bool:
        return re.match(r"\s*(static|extern|typedef)\b", self.head) is not None


def top_items(text: str) -> list[Top]:
    """The top-level items of blanked C text, by brace depth."""
    items, depth, start, body_start = [], 0, 0, None
    head = ""
    for i, c in enumerate(text):
        if c == "{":
            if depth == 0:
                head = text[start:i]
                body_start = i
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                rest = text[i + 1 :]
                m = re.match(r"[^;{}]*;", rest)
                is_func = "(" in head and "=" not in head and not re.search(r"\b(struct|union|enum)\b\s*\w*\s*$", head)
                if is_func or m is None:
                    end = i + 1
                else:
                    end = i + 1 + m.end()  # `struct {...} name;`, `x = {...};`
                first = head.lstrip()
                lead = len(head) - len(first)
                first_line = text.count("\n", 0, start + lead) + 1
                items.append(_item(head, text[body_start:end], first_line, text.count("\n", 0, i) + 1))
                start = end
        elif c == ";" and depth == 0:
            head = text[start : i + 1]
            first = head.lstrip()
            first_line = text.count("\n", 0, start + len(head) - len(first)) + 1
            items.append(_item(head, None, first_line, text.count("\n", 0, i) + 1))
            start = i + 1
    return items


def _item(head: str, body: str | None, first_line: int, last_line: int) -> Top:
    return Top(head.strip(), body, first_line, last_line)


def functions(text: str) -> list[tuple[str, bool, int, int, str]]:
    """(name, static, first line, last line, body) of each function defined in blanked text."""
    out = []
    for it in top_items(text):
        h = it.head
        if it.body is None or "(" not in h or "=" in h or re.search(r"\b(struct|union|enum|typedef)\b", h.split("(")[0]):
            continue
        m = re.search(r"([A-Za-z_]\w*)\s*$", h[: h.index("(")])
        if m is None or m.group(1) in _KEYWORDS:
            continue
        out.append((m.group(1), it.is_static, it.first_line, it.last_line, it.body))
    return out


def variables(text: str) -> list[str]:
    """Names of the file-scope variables defined without static in blanked text."""
    out = []
    for it in top_items(text):
        h = it.head
        if it.is_static or "=" not in h:
            continue
        m = re.search(r"([A-Za-z_]\w*)\s*(\[[^\]]*\]\s*)*=", h)
        if m and not ("(" in h.split("=")[0] and it.body is not None and "=" not in h.split("(")[0]):
            out.append(m.group(1))
    return out


def file_graph(src: Path = SRC) -> tuple[dict[str, dict[str, set[str]]], dict[str, str]]:
    """{file: {file it depends on: names (or {'#include'})}} over src/*.c and src/*.h, and the
    blanked text of each .c file."""
    raw = {p.name: p.read_text() for p in sorted(src.glob("*.[ch]"))}
    blanked = {n: blank(t) for n, t in raw.items()}
    includes = {n: {i for i in _INCLUDE.findall(t) if i in raw} for n, t in raw.items()}
    defined: dict[str, str] = {}
    for n, t in blanked.items():
        if not n.endswith(".c"):
            continue
        for name, static, *_ in functions(t):
            if not static:
                defined.setdefault(name, n)
        for name in variables(t):
            defined.setdefault(name, n)
    inline_bodies = {
        n: " ".join(body for _, _, _, _, body in functions(t)) for n, t in blanked.items() if n.endswith(".h")
    }

    def closure(n: str) -> set[str]:
        seen, todo = set(), list(includes[n])
        while todo:
            h = todo.pop()
            if h not in seen:
                seen.add(h)
                todo.extend(includes.get(h, ()))
        return seen

    graph: dict[str, dict[str, set[str]]] = {n: {} for n in raw}
    for n in raw:
        for h in includes[n]:
            graph[n].setdefault(h, set()).add("#include")
        if not n.endswith(".c"):
            continue
        text = blanked[n] + " " + " ".join(inline_bodies[h] for h in closure(n))
        used = set(_IDENT.findall(text))
        for name in used:
            g = defined.get(name)
            if g is not None and g != n:
                graph[n].setdefault(g, set()).add(name)
    return graph, {n: t for n, t in blanked.items() if n.endswith(".c")}


def cycles(graph: dict[str, dict[str, set[str]]]) -> list[list[str]]:
    """The strongly connected components of more than one file (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, {})))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def problems(src: Path = SRC) -> list[str]:
    """Every breach of the three rules in src, one line each."""
    graph, texts = file_graph(src)
    out = []
    for comp in cycles(graph):
        edges = [
            f"{a} -> {b} ({', '.join(sorted(graph[a][b])[:6])})" for a in comp for b in comp if b in graph[a]
        ]
        out.append(f"cycle among {', '.join(comp)}: " + "; ".join(edges))
    for n, t in texts.items():
        lines = t.count("\n") + (0 if t.endswith("\n") else 1)
        if lines > MAX_FILE_LINES:
            out.append(f"{n}: {lines} lines (at most {MAX_FILE_LINES})")
        for name, _, first, last, _ in functions(t):
            if last - first + 1 > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS_ALLOWED:
                out.append(f"{n}:{first}: {name} is {last - first + 1} lines (at most {MAX_FUNCTION_LINES})")
    return out


def test_c_floors_no_cycle_no_long_file_or_function():
    assert problems() == []


def test_the_checker_sees_the_code():
    """The parse finds what it must: the functions of a few files, their extents, the edges that
    the floors rely on (so that a silent parse failure cannot pass the test above)."""
    graph, texts = file_graph()
    fns = {name: (first, last) for name, _, first, last, _ in functions(texts["vm.c"])}
    assert "vm_step" in fns and "vm_run" in fns
    first, last = fns["vm_run"]
    lines = (SRC / "vm.c").read_text().split("\n")
    assert "vm_run(" in lines[first - 1] and lines[last - 1].startswith("}")
    assert "vm.c" in graph["archive.c"] and "state.c" in graph["vm.c"]  # calls down: a driver, the base
    assert "tf_raise" in graph["vm.c"]["state.c"]
    assert "state.h" in graph["loader.h"] or "objects.h" in graph["loader.h"]
    # a made-up upward call is seen as a cycle
    graph["state.c"]["vm.c"] = {"vm_run"}
    assert any("state.c" in c and "vm.c" in c for c in cycles(graph))


def test_the_checker_finds_long_functions(tmp_path):
    body = "\n".join(f"    x += {i};" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "a.c").write_text(
        '#include "a.h"\n/* { not a brace */\nstatic const char *s = "}";\n'
        f"int long_one(int x) {{\n    if (x) {{\n        x = '{{';\n    }}\n{body}\n    return x;\n}}\n"
        "int b_user(void) { return b_fn(); }\n"
    )
    (tmp_path / "a.h").write_text("int long_one(int x);\n")
    (tmp_path / "b.c").write_text("int b_fn(void) { return long_one(1); }\n")
    found = problems(tmp_path)
    assert any("long_one is" in p for p in found), found
    assert any(p.startswith("cycle among a.c, b.c") for p in found), found
