"""The documentation runs as written: README.md and every page under docs/.

Python blocks (```python fences) run here, on the CPU, unless the last non-blank line before
the fence is ``<!-- not run: REASON -->`` with a reason. A page's blocks run in order, in one
fresh namespace (a later block may use an earlier one's names; a block marked not run
defines nothing), with a temporary working directory; each page is one test, and a block
that raises fails it, named by page and line. Under ``TRITON_INTERPRET=1`` the blocks run
on the ops' PyTorch path (``reference_path()``), as the CLI and model tests do: the
interpreter needs minutes for a model's 256-channel poolers, and the kernels are the op
tests' job. Without it they run the CPU path a user runs.

Shell blocks (```bash fences): every ``python -m MODULE [SUBCOMMAND]`` line (also after
``torchrun`` or environment assignments) runs with ``--help``, all of them in one
subprocess of ``sys.executable``, and must exit 0 with a usage text; ``make TARGET`` names a
target of the Makefile, ``pip install '.[EXTRA]'`` an extra of pyproject.toml. Relative links point at files that exist (and, into a Markdown file,
at a heading it has). The README stays a front page: at most 200 lines.
"""
from __future__ import annotations

import contextlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

try:
    import tomllib
except ImportError:        # Python 3.10: the extras are not checked
    tomllib = None

from kernels._utils import INTERPRET, reference_path

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NOT_RUN = re.compile(r"<!--\s*not run:(.*?)-->", re.S)
FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
README_MAX_LINES = 200


def rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def blocks(page: Path) -> list[dict]:
    """Every fenced block of a page: language, first line number, code, and the reason of
    a not-run marker on the last non-blank line before its fence (None: no marker)."""
    lines = page.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m.group(1), m.group(2).lower(), i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = NOT_RUN.search(before)
        found.append({"lang": lang, "line": start + 2, "code": "\n".join(body),
                      "reason": marker.group(1).strip() if marker else None})
        i += 1
    return found


def python_pages() -> list[Path]:
    return [p for p in PAGES if any(b["lang"] == "python" for b in blocks(p))]


def test_the_docs_are_there():
    names = {rel(p) for p in PAGES}
    for page in ("ops.md", "model.md", "training.md", "export.md", "cpu.md", "benchmarks.md",
                 "gpu.md", "testing.md"):
        assert f"docs/{page}" in names
    assert any(n.startswith("docs/design/") for n in names)
    assert len(python_pages()) >= 5


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_not_run_markers_give_a_reason_and_mark_a_python_block(page):
    text = page.read_text()
    for m in NOT_RUN.finditer(text):
        line = text[:m.start()].count("\n") + 1
        assert m.group(1).strip(), f"{rel(page)}:{line}: a not-run marker without a reason"
    marked = sum(1 for b in blocks(page) if b["reason"] is not None)
    assert marked == len(NOT_RUN.findall(text)), \
        f"{rel(page)}: a not-run marker that does not stand right before a code block"


def run_python_blocks(page: Path, name: str) -> int:
    """Run a page's python blocks in order in one namespace; fail naming the block that
    raised. Returns how many ran."""
    torch.manual_seed(0)
    namespace = {"__name__": f"docs:{name}"}
    ran = 0
    with reference_path() if INTERPRET else contextlib.nullcontext():
        for block in blocks(page):
            if block["lang"] != "python" or block["reason"] is not None:
                continue
            code = compile(block["code"], f"{name}:{block['line']}", "exec")
            try:
                exec(code, namespace)
            except Exception as e:
                pytest.fail(f"{name}, the block at line {block['line']} raised "
                            f"{type(e).__name__}: {e}")
            ran += 1
    return ran


@pytest.mark.parametrize("page", python_pages(), ids=rel)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_python_blocks(page, rel(page)), \
        f"{rel(page)}: every python block is marked not run"


def test_a_raising_block_fails_and_a_marked_one_is_skipped(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Text.\n\n<!-- not run: needs a GPU -->\n```python\nraise SystemError\n```\n\n"
                    "```python\nx = 1\n```\n\n```python\nassert x == 2, 'x is 1'\n```\n")
    assert [b["reason"] for b in blocks(page)] == ["needs a GPU", None, None]
    with pytest.raises(pytest.fail.Exception, match="line 13 raised AssertionError: x is 1"):
        run_python_blocks(page, "page.md")


def shell_commands(page: Path) -> list[str]:
    """The command lines of a page's shell blocks (continuation lines joined, comments cut)."""
    commands = []
    for block in blocks(page):
        if block["lang"] not in ("bash", "sh", "shell", "console"):
            continue
        for line in block["code"].replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def python_module(command: str) -> tuple[str, ...] | None:
    """(module, subcommand?) of a ``python -m`` (or ``torchrun ... -m``) command line."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
        words = words[1:]          # environment assignments
    if not words or not (re.fullmatch(r"(\S*/)?python3?", words[0]) or words[0] == "torchrun"):
        return None
    if "-m" not in words:
        return None
    rest = words[words.index("-m") + 1:]
    if not rest:
        return None
    module, args = rest[0], rest[1:]
    if args and re.fullmatch(r"[a-z][a-z_-]*", args[0]):
        return module, args[0]
    return (module,)


HELP_DRIVER = """
import contextlib, io, json, runpy, sys
results = {}
for key in json.loads(sys.argv[1]):
    module, sub = key[0], key[1:]
    out = io.StringIO()
    sys.argv = [module, *sub, "--help"]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:
        code = f"{type(e).__name__}: {e}"
    results[" ".join(key)] = {"code": code, "usage": "usage" in out.getvalue().lower(),
                              "tail": out.getvalue()[-400:]}
print(json.dumps(results))
"""


def all_commands() -> list[tuple[str, str]]:
    return [(rel(page), c) for page in PAGES for c in shell_commands(page)]


@pytest.fixture(scope="module")
def helps():
    keys = sorted({m for _, c in all_commands() if (m := python_module(c))})
    out = subprocess.run([sys.executable, "-c", HELP_DRIVER, json.dumps(keys)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_quick_start_commands_are_there():
    readme = [c for page, c in all_commands() if page == "README.md"]
    modules = {python_module(c) for c in readme}
    for sub in ("train", "evaluate", "predict"):
        assert ("maskrcnn", sub) in modules
    assert any(c.startswith("make run") for c in readme)
    assert any(c.startswith("make test") for c in readme)


@pytest.mark.parametrize("page, command", all_commands(), ids=lambda v: str(v)[:60])
def test_shell_commands_run_with_help(page, command, helps):
    module = python_module(command)
    if module is not None:
        result = helps[" ".join(module)]
        assert result["code"] == 0 and result["usage"], \
            f"{page}: `{' '.join(module)} --help` failed ({result['code']}): {result['tail']}"
        return
    words = command.split()
    while words and "=" in words[0]:
        words = words[1:]
    if words[:2] == ["pip", "install"]:
        extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                     ["optional-dependencies"]) if tomllib else set()
        for extra in re.findall(r"\[(\w+)\]", command) if tomllib else []:
            assert extra in extras, f"{page}: `{command}`: pyproject.toml has no extra {extra}"
    if words and words[0] == "make":
        targets = set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", (ROOT / "Makefile").read_text(),
                                 re.M))
        for target in (w for w in words[1:] if "=" not in w and not w.startswith("-")):
            assert target in targets, f"{page}: `{command}`: no Makefile target {target}"


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*$",
                                                  page.read_text(), re.M)}


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_links_point_at_files_that_exist(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for m in LINK.finditer(text):
        target = m.group(1) or m.group(2)
        if re.match(r"[a-z]+:", target):
            continue               # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{rel(page)}: link to {target}: no such file"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{rel(page)}: link to {target}: no such heading"
