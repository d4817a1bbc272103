"""The example blocks of README.md and docs/*.md, for the tests that run them (tests/test_readme_examples.py says
the convention and checks that every block is run by some test)."""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLE_LANGUAGES = {"bash", "python"}
# A fence may be indented (inside a list item); its body is then indented as much.
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str  # the first word of the info string; "" for a bare fence
    tags: tuple[str, ...]  # the other words: "not-run", "run-by=tests/test_x.py::name"
    body: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def claim(self) -> str | None:
        """The test named by a ``run-by=`` tag: it runs this block, and no other test does."""
        claims = [tag.removeprefix("run-by=") for tag in self.tags if tag.startswith("run-by=")]
        return claims[0] if claims else None

    def commands(self) -> list[str]:
        """The shell lines of the block: continuations joined, blank lines and comments left out."""
        lines = self.body.replace("\\\n", " ").splitlines()
        return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for match in _FENCE.finditer(text):
        words = match["info"].split()
        indent = match["indent"]
        body = "".join(line.removeprefix(indent) for line in match["body"].splitlines(keepends=True))
        line = text.count("\n", 0, match.start()) + 1
        found.append(Block(page, line, words[0] if words else "", tuple(words[1:]), body))
    return found


def all_blocks() -> list[Block]:
    return [block for page in PAGES for block in blocks(page)]


def venv_words(command: str) -> str:
    """``.venv/bin/X`` as the docs write it, for the virtualenv the tests run in."""
    return re.sub(r"(?<![\w/.])\.venv/bin/", f"{Path(sys.executable).parent}/", command)


def claimed_blocks(claim: str) -> list[Block]:
    """Every block tagged ``run-by=<claim>``, in page order: for a test that runs whole scripts (several commands
    a block, several blocks) in an environment of its own, such as the container test's docker."""
    claimed = [block for block in all_blocks() if block.claim == claim]
    assert claimed, f"no block is tagged run-by={claim}"
    return claimed


def claimed_command(claim: str, replace: Mapping[str, str], extra: Sequence[str] = ()) -> list[str]:
    """The one command of the block tagged ``run-by=<claim>``, as the claiming test runs it: the words of `replace`
    (each must be in the command: the test runs what the docs say) stand for the test's own paths, and `extra`, the
    test's own options (a free port, a Ray address, a tiny model), are appended."""
    claimed = [block for block in all_blocks() if block.claim == claim]
    assert len(claimed) == 1, f"expected one block tagged run-by={claim}, found {[b.where for b in claimed]}"
    (command,) = claimed[0].commands()
    words = shlex.split(venv_words(command), comments=True)
    missing = set(replace) - set(words)
    assert not missing, f"{claimed[0].where}: the command no longer has {sorted(missing)}: {command}"
    return [replace.get(word, word) for word in words] + list(extra)
