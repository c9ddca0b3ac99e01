"""The readme each distribution puts in its metadata (PyPI's project page) has only
absolute links: PyPI resolves a relative link against pypi.org, where it is a 404."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DISTRIBUTIONS = [
    REPO,
    REPO / "backends" / "maildir",
    REPO / "backends" / "imap",
    REPO / "backends" / "sql",
]

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1[`~]*[ \t]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_INDENTED = re.compile(r"(?:^(?: {4}|\t).*\n?)+", re.M)  # code block (after a blank line)
_INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(].*?)?\)", re.S)
_REFDEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
_AUTOLINK = re.compile(r"<([a-zA-Z][a-zA-Z0-9+.-]*:[^<>\s]*)>")
_HTML = re.compile(r"""\b(?:href|src)\s*=\s*["']?([^"'\s>]+)""", re.I)
ABSOLUTE = re.compile(r"^(?:https://|http://|mailto:)[^\s]+$")
OUR_FILES = re.compile(r"^https://github\.com/pypop3/pypop/(?:blob|tree)/main/([^#?]*)")


def links(markdown: str) -> list[str]:
    """Every link target in ``markdown``, outside code blocks and code spans."""
    text = _FENCE.sub("", markdown)
    text = re.sub(r"(\n[ \t]*\n)" + _INDENTED.pattern, r"\1", "\n" + text, flags=re.M)
    text = _CODE_SPAN.sub("", text)
    found: list[str] = []
    for pattern in (_INLINE, _REFDEF, _AUTOLINK, _HTML):
        found += pattern.findall(text)
    return found


def relative_links(markdown: str) -> list[str]:
    return [u for u in links(markdown) if not ABSOLUTE.match(u)]


def metadata_readme(project: Path) -> Path:
    """The file named by ``[project] readme`` in that distribution's pyproject.toml."""
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    readme = meta["readme"]
    name = readme if isinstance(readme, str) else readme["file"]
    return project / name


@pytest.mark.parametrize("project", DISTRIBUTIONS, ids=lambda p: p.name)
def test_metadata_readme_has_only_absolute_links(project: Path) -> None:
    text = metadata_readme(project).read_text(encoding="utf-8")
    assert links(text), "no link found: the parser is broken"
    assert relative_links(text) == []


@pytest.mark.parametrize("project", DISTRIBUTIONS, ids=lambda p: p.name)
def test_links_into_the_repository_name_files_that_exist(project: Path) -> None:
    text = metadata_readme(project).read_text(encoding="utf-8")
    ours = [m.group(1) for u in links(text) if (m := OUR_FILES.match(u))]
    assert [p for p in ours if not (REPO / p).exists()] == []


def test_parser_finds_every_kind_of_relative_link() -> None:
    sample = """# t

See [the docs](docs/wire.md), ![logo](img/logo.png "Logo") and [up](../../).
A [ref][r] and <https://example.org/ok>, <a href="LICENSE">x</a>, [top](#install).
Fine: [abs](https://github.com/pypop3/pypop/blob/main/README.md 'title').

[r]: docs/config.md

```toml
[not](a-link.md)
```

`[also](not-a-link.md)` and

    [indented](not-a-link-either.md)
"""
    assert relative_links(sample) == [
        "docs/wire.md",
        "img/logo.png",
        "../../",
        "#install",
        "docs/config.md",
        "LICENSE",
    ]
    assert "https://example.org/ok" in links(sample)
    assert "https://github.com/pypop3/pypop/blob/main/README.md" in links(sample)
