"""The documentation runs as written: every command and code block in the README, CONTRIBUTING.md and
docs/ is executed (a `console` block's output compared line by line), the site builds strictly,
the generated command-line reference is current, and the README keeps its size budget.

A block that cannot run here (it installs packages, needs a GPU or a server) is followed by an
HTML comment `<!-- not run: why -->`; a `py` block is an excerpt of the code and must appear in it
verbatim."""

import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "docs"))
import cli_reference  # noqa: E402  (docs/ is not a package)

PAGES = sorted(["README.md", "CONTRIBUTING.md"] + [os.path.relpath(p, ROOT) for p in
                                                  glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)])
RUNNABLE = ("bash", "console", "python")
NOT_RUN = re.compile(r"^<!-- not run: (.+) -->$")
# explain's default folder is named after the model and a hash of the settings, which the docs write as XXXXXXXX
RUN_FOLDER_HASH = re.compile(r"(lrp-out/[\w.-]+-)[0-9a-f]{8}")


@dataclass
class Block:
    page: str
    line: int
    language: str
    code: str
    not_run: str | None  # why, where the block is shown but not run


def blocks(page):
    lines = open(os.path.join(ROOT, page)).read().split("\n")
    found, i = [], 0
    while i < len(lines):
        start = re.match(r"^\s*```(\w*)\s*$", lines[i])
        if not start:
            i += 1
            continue
        indent = len(lines[i]) - len(lines[i].lstrip())
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        code = "\n".join(line[indent:] for line in lines[i + 1:end])
        after = next((line.strip() for line in lines[end + 1:] if line.strip()), "")
        reason = NOT_RUN.match(after)
        found.append(Block(page, i + 1, start.group(1), code + "\n", reason.group(1) if reason else None))
        i = end + 1
    return found


def console_steps(code):
    """A console block as (command, expected output lines): a line starting with `$ ` is a command."""
    steps: list[tuple[str, list[str]]] = []
    for line in code.rstrip("\n").split("\n"):
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    return steps


def test_readme_is_at_most_10_kb():
    assert os.path.getsize(os.path.join(ROOT, "README.md")) <= 10 * 1024


def test_every_block_is_run_or_says_why_and_excerpts_are_in_the_code():
    files = glob.glob(os.path.join(ROOT, "lrp_onnx", "**", "*.py"), recursive=True) + glob.glob(
        os.path.join(ROOT, "tests", "*.py"))
    # compared line by line without indentation: an excerpt may be dedented from where it sits
    sources = "\n".join(line.strip() for p in files for line in open(p).read().split("\n"))
    runnable = 0
    for block in (b for page in PAGES for b in blocks(page)):
        where = f"{block.page}:{block.line}"
        assert block.language, f"{where}: a code block without a language (text, bash, console, python, py, ...)"
        if block.language == "py":
            excerpt = "\n".join(line.strip() for line in block.code.strip().split("\n"))
            assert excerpt in sources, f"{where}: this excerpt is not in lrp_onnx/ or tests/ verbatim"
        runnable += block.language in RUNNABLE and block.not_run is None
    assert runnable >= 40


def test_the_command_line_reference_is_current():
    page = open(cli_reference.PAGE).read()
    if f"on {cli_reference.python_version()} " not in page:
        pytest.skip(f"docs/reference/cli.md was generated on another Python than {cli_reference.python_version()}")
    assert page == cli_reference.reference(), "docs/reference/cli.md is stale: run python docs/cli_reference.py"


def test_the_site_builds_strictly(tmp_path):
    # NO_MKDOCS_2_WARNING: Material's banner about its successor, printed on every build
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "reference" / "python-api" / "index.html").exists()
    assert (tmp_path / "site" / "results" / "BENCHMARKS" / "index.html").exists()


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.language in RUNNABLE and b.not_run is None
                                                          for b in blocks(p))])
def test_the_page_runs_as_written(page, tmp_path, monkeypatch):
    """The page's blocks, in order, in a fresh folder holding a copy of models/ (commands write beside
    the model), the way a reader would run them from a checkout."""
    shutil.copytree(os.path.join(ROOT, "models"), tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "LRP_ONNX_NODE_ROOT": ROOT, "COLUMNS": "120"}
    namespace = {}
    for block in blocks(page):
        if block.language not in RUNNABLE or block.not_run:
            continue
        where = f"{page}:{block.line}"
        if block.language == "python":
            exec(compile(block.code.replace("/tmp/", f"{tmp_path}/"), where, "exec"), namespace)
        elif block.language == "bash":
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], env=env, capture_output=True,
                                    text=True)
            assert result.returncode == 0, f"{where}: {result.stdout}{result.stderr}"
        else:
            for command, expected in console_steps(block.code):
                result = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True)
                printed = RUN_FOLDER_HASH.sub(r"\1XXXXXXXX", result.stdout + result.stderr)
                assert [line.rstrip() for line in printed.rstrip("\n").split("\n")] == expected, f"{where}: {command}"
