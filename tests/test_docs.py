"""Every ```python block of README.md, docs/*.md and integrations/README.md runs as written, and every command
of their ```bash blocks is valid as written (its script parses its flags; see "shell blocks" below).

A block preceded by ``<!-- not run: reason -->`` (a fragment of a larger script) is skipped; one preceded by
``<!-- slow -->`` runs in the slow job. Blocks of one page run in order in one namespace, in a temporary folder.
"""

import argparse
import os
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "integrations" / "README.md"]
BLOCK = re.compile(r"(?:<!--\s*(?P<marker>[^>]*?)\s*-->\s*\n)?```python\n(?P<code>.*?)```", re.S)


def blocks(page: Path):
    for match in BLOCK.finditer(page.read_text()):
        marker = match.group("marker") or ""
        yield marker, match.group("code")


CASES = []
for page in PAGES:
    found = list(blocks(page))
    if not found:
        continue
    slow = any(marker.startswith("slow") for marker, _ in found)
    marks = [pytest.mark.slow] if slow else []
    CASES.append(pytest.param(page, id=str(page.relative_to(REPO)), marks=marks))


def test_every_block_is_marked_or_runs():
    """Markers are deliberate: only the two kinds above exist."""
    for page in PAGES:
        for marker, _ in blocks(page):
            assert marker == "" or marker.startswith(("not run:", "slow")), (page, marker)


@pytest.mark.parametrize("page", CASES)
def test_page_blocks_run(page, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace = {"__name__": "__docs__"}
    for marker, code in blocks(page):
        if marker.startswith("not run:"):
            continue
        exec(compile(code, f"{page.name} block", "exec"), namespace)  # noqa: S102
    assert os.getcwd() == str(tmp_path)


# ---------------------------------------------------------------------------------------------- shell blocks
#
# Every command of a ```bash block is checked as written, without running the jobs (minutes to days, GPUs, data):
# ``python``/``accelerate launch`` commands of the project's scripts must parse (their argparse parser accepts
# every flag and value: the script runs up to ``parse_args`` and stops there), ``pip install`` extras must exist in
# pyproject.toml. The jobs themselves run elsewhere: the main job and ``--quick`` in tests/test_examples.py, the test
# command in CI. A block preceded by ``<!-- not run: reason -->`` is skipped; a line with ``...`` is a template.


SHELL = re.compile(r"(?:<!--\s*(?P<marker>[^>]*?)\s*-->\s*\n)?```(?:bash|sh)\n(?P<code>.*?)```", re.S)
#: Placeholders a reader replaces, given a value that parses.
PLACEHOLDERS = {"IMAGENET": "/data/imagenet"}


def shell_commands(page: Path):
    """``(line, argv)`` of every simple command in the page's shell blocks (comments, ``nohup``, redirections and
    ``&``/``&&``/``;`` separators removed; ``NAME=value`` lines define ``$NAME`` for the rest of the block)."""
    for match in SHELL.finditer(page.read_text()):
        if (match.group("marker") or "").startswith("not run:"):
            continue
        variables = dict(PLACEHOLDERS)
        for line in match.group("code").splitlines():
            line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
            if not line or "..." in line:
                continue
            assignment = re.fullmatch(r"([A-Z_]+)=(\S+)", line)
            if assignment:
                variables[assignment.group(1)] = assignment.group(2)
                continue
            expanded = re.sub(r"\$([A-Z_]+)", lambda m, values=variables: values[m.group(1)], line)
            for part in re.split(r"\s*(?:&&|;|(?<![>&])&(?!>))\s*", expanded):
                argv = [t for t in shlex.split(part) if t]
                argv = _without_redirections(argv[1:] if argv[:1] == ["nohup"] else argv)
                if argv:
                    yield line, argv


def _without_redirections(argv: list[str]) -> list[str]:
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in (">", ">>", "2>", "<"):
            skip = True
        elif not re.match(r"^\d?>>?|^2>&1$|^<", token):
            out.append(token)
    return out


class _Parsed(Exception):
    pass


def _parse_only(monkeypatch, target: list[str]) -> None:
    """Run a script or ``-m`` module up to its ``parse_args`` with ``target``'s arguments."""
    original = argparse.ArgumentParser.parse_known_args

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = original(self, args, namespace)  # a bad value: SystemExit(2) with argparse's message
        if extras:  # what parse_args does with them (no script here takes unknown arguments)
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        raise _Parsed(namespace)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_known_args)
    if target[0] == "-m":
        monkeypatch.setattr(sys, "argv", [target[1], *target[2:]])
        monkeypatch.delitem(sys.modules, target[1], raising=False)  # run as __main__, not the imported copy
        runner = lambda: runpy.run_module(target[1], run_name="__main__", alter_sys=True)  # noqa: E731
    else:
        script = REPO / target[0]
        assert script.is_file(), f"{target[0]} does not exist"
        monkeypatch.setattr(sys, "argv", [str(script), *target[1:]])
        runner = lambda: runpy.run_path(str(script), run_name="__main__")  # noqa: E731
    try:
        runner()
    except _Parsed:
        return
    except SystemExit as stop:  # --help prints and exits 0; a parse error exits 2
        assert stop.code in (0, None), f"exit {stop.code}"
        return
    raise AssertionError("the script ended without parsing its arguments")


def _python_target(argv: list[str]) -> list[str] | None:
    """The script (``[path, args...]`` or ``["-m", module, args...]``) a command runs, or None (venv, pip, pytest)."""
    if argv[0] in ("accelerate",) and argv[1:2] == ["launch"]:
        rest = argv[2:]
        while rest and rest[0].startswith("--"):  # accelerate's own flags, each with one value
            rest = rest[2:] if "=" not in rest[0] else rest[1:]
        return rest
    if Path(argv[0]).name not in ("python", "python3"):
        return None
    if argv[1:2] == ["-m"]:
        return None if argv[2] in ("venv", "pip", "pytest") else argv[1:]
    return argv[1:]


EXTRAS = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
SHELL_CASES = [
    pytest.param(line, argv, id=f"{page.relative_to(REPO)}: {line[:70]}")
    for page in PAGES
    for line, argv in shell_commands(page)
]


def test_shell_blocks_were_found():
    assert len(SHELL_CASES) > 20


@pytest.mark.parametrize(("line", "argv"), SHELL_CASES)
def test_shell_command_is_valid_as_written(line, argv, monkeypatch):
    if Path(argv[0]).name == "pip":
        assert argv[1] == "install", line
        for spec in argv[2:]:
            extras = re.fullmatch(r"\.\[([a-z,]+)\]", spec)
            if extras:
                unknown = set(extras.group(1).split(",")) - EXTRAS
                assert not unknown, f"{line}: pyproject.toml has no extra {sorted(unknown)}"
        return
    target = _python_target(argv)
    if target is None:
        return
    pytest.importorskip("accelerate")
    monkeypatch.chdir(REPO)
    monkeypatch.syspath_prepend(str(REPO))
    _parse_only(monkeypatch, target)


@pytest.mark.parametrize("flag", ["--no-such-flag", "--k not-a-number"])
def test_a_command_with_a_bad_flag_fails_the_check(flag, monkeypatch):
    pytest.importorskip("accelerate")
    monkeypatch.chdir(REPO)
    with pytest.raises(AssertionError, match="exit 2"):
        _parse_only(monkeypatch, ["examples/cifar.py", *flag.split()])
