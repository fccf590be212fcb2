"""A small English corpus every machine has: the docstrings of Python's standard library.

Read from the source files with ``ast`` (nothing is imported or executed), one document
per module, in a fixed order, so the default pretraining run needs no download.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

MIN_WORDS = 8  # docstrings shorter than this are signatures or one-liners, not prose


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef,
                                                                     ast.AsyncFunctionDef))]
    docs = (_prose(ast.get_docstring(n, clean=True) or "") for n in nodes)
    return [d for d in docs if len(d.split()) >= MIN_WORDS]


def _prose(docstring: str) -> str:
    """Keep the prose paragraphs of a docstring; drop indented code and doctest examples."""
    paragraphs = (p for p in docstring.split("\n\n") if p.strip())
    return "\n\n".join(p for p in paragraphs if not p[0].isspace() and not p.lstrip().startswith((">>>", "...")))


def write_stdlib_corpus(path: str | Path, max_bytes: int = 4_000_000) -> Path:
    """Write the stdlib's docstrings to ``path`` (blank lines between paragraphs, two between
    modules) and return it. Stops at about ``max_bytes``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    written = 0
    with path.open("w", encoding="utf-8") as out:
        for file in sorted(stdlib.rglob("*.py")):
            if any(part in {"test", "tests", "idle_test", "site-packages", "lib2to3"} for part in file.parts):
                continue
            docs = _docstrings(file.read_text(encoding="utf-8", errors="replace"))
            if not docs:
                continue
            text = "\n\n".join(docs) + "\n\n\n"
            out.write(text)
            written += len(text.encode())
            if written >= max_bytes:
                break
    return path
