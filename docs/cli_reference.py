"""Write docs/reference/cli.md, the command-line reference, from the argparse parser itself.

    python docs/cli_reference.py

tests/test_docs.py checks that the committed page is what this writes, so the page cannot fall
behind a changed flag.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE = os.path.join(HERE, "reference", "cli.md")
COLUMNS = "100"  # argparse wraps help to the terminal's width; a fixed width keeps the page stable


def python_version():
    return f"Python {sys.version_info.major}.{sys.version_info.minor}"


def reference():
    """The page's markdown: the top-level help, then each command's."""
    os.environ["COLUMNS"] = COLUMNS
    from lrp_onnx.cli import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if a.dest == "command"]  # argparse keeps subparsers here
    parts = [
        "# Command line",
        "",
        f"Generated from the parser by `docs/cli_reference.py` on {python_version()} (argparse's layout "
        "changes between Python versions). What each command does and guarantees: "
        "[commands in detail](commands.md); exit codes: [common errors](../common-errors.md).",
        "",
        "```text",
        parser.format_help().rstrip(),
        "```",
    ]
    for name, sub in commands.choices.items():
        parts += ["", f"## {name}", "", "```text", sub.format_help().rstrip(), "```"]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    with open(PAGE, "w") as f:
        f.write(reference())
    print(f"wrote {PAGE}")
