"""RELIABILITY.md (and BENCHMARKS.md's transformers section) are written by several scripts, each
owning one section between HTML-comment markers."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELIABILITY = os.path.join(ROOT, "RELIABILITY.md")


def write_section(name, markdown, path=RELIABILITY):
    """Replace the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in ``path``, or
    append the section (creating the file) where it is missing; the other sections stay as they are."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = open(path).read() if os.path.exists(path) else "# Reliability\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def marked_sections(path):
    """Every ``<!-- NAME:begin -->`` ... ``<!-- NAME:end -->`` block in ``path`` (none if it is missing)."""
    if not os.path.exists(path):
        return []
    return [m.group(0) for m in re.finditer(r"<!-- (\S+):begin -->.*?<!-- \1:end -->", open(path).read(), re.S)]
