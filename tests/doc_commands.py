"""The shell commands the documentation gives users: fenced ``bash`` blocks and the command cells of Markdown tables.

A command is one logical line of a block (backslash continuations joined, exactly as bash reads them; comment lines
and blank lines skipped), or one code span in a table cell under a ``command`` header that starts with a program.
A file the documentation asks the reader to write is a fenced block (of any language but bash) right after a line
that ends with its path in backticks and a colon, e.g. "use a sites file, e.g. `out/sites.json`:".

A block right after the HTML comment ``<!-- docs-test: arguments only: REASON -->`` (invisible on the rendered page)
holds commands that are not run, only their arguments checked, for the reason given (a GPU, data outside the
repository, a measurement that takes minutes): ``DocCommand.arguments_only`` is that reason.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

#: what a code span in a table's command column must start with to be a command (not a path or an option)
PROGRAMS = ("python ", "monailabel ", "torchrun ", "bash ", "pytest ", ".venv/bin/python ", "tensorboard ", "nvflare ")

_FENCE = re.compile(r"^\s*```\s*([\w+-]*)\s*$")
_CODE_SPAN = re.compile(r"`([^`]+)`")
_FILE_INTRO = re.compile(r"`([\w./-]+\.\w+)`:\s*$")
_ARGUMENTS_ONLY = re.compile(r"^\s*<!--\s*docs-test:\s*arguments only:\s*(.+?)\s*-->\s*$")


@dataclass(frozen=True)
class DocFile:
    """A file the documentation gives in full for the reader to write (before the commands that follow it)."""

    path: str
    line: int
    name: str  # the file's path, relative to the repository root
    content: str

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class DocCommand:
    """One documented shell command and where it is written."""

    path: str  # relative to the repository root
    line: int  # 1-based line of its first line
    text: str  # as written (continuation lines included)
    arguments_only: str | None = None  # why the command is not run (its arguments are checked), if it is not

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def normalized(self) -> str:
        """The command's words as bash reads them, comments dropped (identical commands compare equal)."""
        return " ".join(shlex.split(self.text.replace("\\\n", " "), comments=True))


def _block_commands(path: str, first_line: int, lines: list[str], arguments_only: str | None) -> list[DocCommand]:
    commands, current, start = [], [], 0
    for offset, line in enumerate(lines):
        if not current:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            start = first_line + offset
        current.append(line.rstrip())
        if not line.rstrip().endswith("\\"):
            commands.append(DocCommand(path, start, "\n".join(current), arguments_only))
            current = []
    if current:
        raise ValueError(f"{path}:{start}: the command ends with a line continuation")
    return commands


def _split_row(line: str) -> list[str]:
    """Cells of a Markdown table row (``\\|`` is a literal bar, as GitHub reads it)."""
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [c.strip().replace("\\|", "|") for c in cells]


def extract(path: Path, root: Path) -> list[DocCommand | DocFile]:
    """Every command and file of one Markdown file, in the order written."""
    rel = path.relative_to(root).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    commands: list[DocCommand | DocFile] = []
    block: list[str] | None = None
    language, block_start, file_name, reason = "", 0, None, None
    column: int | None = None  # index of the "command" column of the table being read
    previous = ""  # the last non-blank line outside code blocks
    for number, line in enumerate(lines, start=1):
        fence = _FENCE.match(line)
        if block is not None:
            if fence and not fence.group(1):
                if language in ("bash", "sh", "shell"):
                    commands += _block_commands(rel, block_start, block, reason)
                elif file_name:
                    commands.append(DocFile(rel, block_start - 1, file_name, "\n".join(block) + "\n"))
                block = None
            else:
                block.append(line)
            continue
        if fence:
            block, language, block_start = [], fence.group(1).lower(), number + 1
            intro, marker = _FILE_INTRO.search(previous), _ARGUMENTS_ONLY.match(previous)
            file_name = intro.group(1) if intro else None
            reason = marker.group(1) if marker else None
            continue
        if line.strip():
            previous = line
        if not line.lstrip().startswith("|"):
            column = None
            continue
        cells = _split_row(line)
        if column is None:
            lowered = [c.lower() for c in cells]
            column = lowered.index("command") if "command" in lowered else -1
            continue
        if column < 0 or column >= len(cells) or set(cells[0]) <= set("-: "):
            continue
        for span in _CODE_SPAN.findall(cells[column]):
            if span.startswith(PROGRAMS):
                commands.append(DocCommand(rel, number, span))
    if block is not None:
        raise ValueError(f"{rel}:{block_start}: unclosed code block")
    return commands


def documented_commands(root: Path, files: list[str]) -> list[DocCommand | DocFile]:
    """The commands and files of ``files`` (relative to ``root``), in file order."""
    return [item for name in files for item in extract(root / name, root)]
