"""Hostile leaderboard entries: nothing in an entry's fields may become markup, a link or a table column.

An entry is contributed data; the generated ``leaderboard/README.md`` is rendered by GitHub and the
HTML page by a browser, so a title such as ``&lt;script&gt;`` or a ``javascript:`` paper link must
come out as inert text (issue 14, finding 10).
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest

from robustkit.cli import main
from robustkit.leaderboard import boards, load_entries, read_entry
from robustkit.leaderboard.entries import is_http_url
from robustkit.leaderboard.render import md_link, md_text, render_html, render_markdown

GOOD = {"link": "https://arxiv.org/abs/1905.13736", "name": "A paper", "authors": "A B, C D",
        "additional_data": False, "number_forward_passes": 1, "dataset": "cifar10", "venue": "N/A",
        "architecture": "WideResNet-28-10", "eps": "8/255", "clean_acc": "89.69", "reported": "59.53",
        "autoattack_acc": "59.53"}

HOSTILE_TEXT = [
    "<script>alert(1)</script>",
    "&lt;script&gt;alert(1)&lt;/script&gt;",
    '"><script>alert(1)</script>',
    "[x](javascript:alert(1))",
    "![img](https://evil.example/x.png)",
    "*bold* _em_ `code` ~~strike~~ **strong**",
    "pipe | in the middle\nand a newline\r\nand more",
    "trailing backslash \\",
    "back\\|slash pipe",
    "<https://evil.example> &amp; &#106;avascript:",
]

BAD_LINKS = ["javascript:alert(1)", '"><script>alert(1)</script>', 'https://a.example/"><script>alert(1)</script>',
             "data:text/html,<script>alert(1)</script>", "https://a.example/x y", "//evil.example/x", "",
             "JAVASCRIPT:alert(1)", "https://a.example/|x", "https:///nohost"]


def _decode(md: str) -> str:
    """What a CommonMark renderer shows for escaped text: backslash escapes removed, entities decoded."""
    return html.unescape(re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", md))


def _unescaped(md: str, chars: str) -> list[str]:
    """Characters of ``chars`` in ``md`` not preceded by a backslash escape."""
    out, i = [], 0
    while i < len(md):
        if md[i] == "\\" and i + 1 < len(md):
            i += 2
            continue
        if md[i] in chars:
            out.append(md[i])
        i += 1
    return out


def _cells(row: str) -> list[str]:
    """GFM's table-row split: a cell ends at a ``|`` that is not backslash-escaped."""
    cells, cur, i = [], "", 0
    while i < len(row):
        if row[i] == "\\" and i + 1 < len(row):
            cur += row[i:i + 2]
            i += 2
            continue
        if row[i] == "|":
            cells.append(cur)
            cur = ""
        else:
            cur += row[i]
        i += 1
    cells.append(cur)
    return [c.strip() for c in cells[1:-1]]


@pytest.mark.parametrize("text", HOSTILE_TEXT)
def test_md_text_is_inert_and_shows_the_text(text):
    md = md_text(text)
    assert "<" not in md and ">" not in md and "\n" not in md and "\r" not in md
    assert _unescaped(md, "\\`*_[]~|") == []
    assert not re.search(r"&(?!(amp|lt|gt);)", md)  # every & starts one of our entities
    assert _decode(md) == re.sub(r"\s+", " ", text)


@pytest.mark.parametrize("link", BAD_LINKS)
def test_non_http_links_are_rejected(link):
    assert not is_http_url(link)


def test_http_links_are_kept_and_cannot_end_early():
    for ok in ("https://arxiv.org/abs/2001.03994", "http://example.org/a_(b)?q=1&r=2#frag", "HTTPS://A.ORG/x"):
        assert is_http_url(ok)
    dest = md_link("https://en.example.org/wiki/A_(b))&quot;x")
    assert "(" not in dest and ")" not in dest
    assert dest == "https://en.example.org/wiki/A_%28b%29%29&amp;quot;x"


def _entries(tmp_path: Path, specs: dict[str, dict]) -> Path:
    root = tmp_path / "leaderboard" / "entries"
    for i, (model_id, changes) in enumerate(specs.items()):
        path = root / "cifar10" / "Linf" / f"{model_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        # distinct accuracies fix the ranking, so row i is entry i
        path.write_text(json.dumps({**GOOD, "autoattack_acc": f"{50 - i}.00", "reported": f"{50 - i}.00",
                                    **changes}))
    return root


def _rows(md: str) -> list[str]:
    return [line for line in md.splitlines() if re.match(r"^\| \d+ \|", line)]


HOSTILE_ENTRIES = {
    "Esc2026Script": {"name": "&lt;script&gt;alert(1)&lt;/script&gt;", "link": "https://a.example/p_(1)"},
    "Md2026Link": {"name": "[x](javascript:alert(1))", "footnote": "*b* _e_ `c` ~~s~~ ![i](https://e.example/i)"},
    "Pipe2026Title": {"name": "pipe | in\ntitle", "venue": "a | b", "architecture": "<b>WRN</b> | x"},
    "Quote2026Attr": {"name": '"><script>alert(1)</script>x', "footnote": "&lt;img src=x onerror=alert(1)&gt;"},
}


def test_hostile_but_valid_entries_build_to_inert_markdown(tmp_path, capsys):
    root = _entries(tmp_path, HOSTILE_ENTRIES)
    assert main(["leaderboard", "validate", str(root)]) == 0, capsys.readouterr().out
    assert main(["leaderboard", "build", "--entries", str(root)]) == 0
    assert main(["leaderboard", "build", "--entries", str(root), "--check"]) == 0
    md = (root.parent / "README.md").read_text()
    rows = _rows(md)
    assert len(rows) == len(HOSTILE_ENTRIES)
    for row in rows:
        assert len(_cells(row)) == 9, row  # a | in a field must not add a column
        assert "<" not in row and ">" not in row  # no raw HTML of any kind
        dests = re.findall(r"(?<!\\)\]\(([^)\s]*)\)", row)
        assert all(d.startswith("https://") for d in dests), dests
    esc, mdlink, pipe, quote = (_cells(r)[1] for r in rows)
    assert esc == "[&lt;script&gt;alert(1)&lt;/script&gt;](https://a.example/p_%281%29) `Esc2026Script`"
    assert mdlink.startswith("[\\[x\\](javascript:alert(1))](https://arxiv.org/abs/1905.13736) `Md2026Link` — ")
    assert _decode(mdlink.split(" — ", 1)[1]) == "*b* _e_ `c` ~~s~~ ![i](https://e.example/i)"
    assert _unescaped(mdlink.split(" — ", 1)[1], "`*_[]~") == []
    assert _decode(pipe.split("](")[0]) == "[pipe | in title"
    assert [_decode(c) for c in _cells(rows[2])[-2:]] == ["<b>WRN</b> | x", "a | b"]
    assert quote == '["&gt;alert(1)x](https://arxiv.org/abs/1905.13736) `Quote2026Attr` — &lt;img src=x onerror=alert(1)&gt;'

    page = (root.parent / "index.html").read_text()
    assert page.count("<script") == 1  # the page's own sorting script, nothing from an entry
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page


@pytest.mark.parametrize("link", ["javascript:alert(1)", '"><script>alert(1)</script>',
                                  'https://a.example/"><script>alert(1)</script>', "[x](javascript:alert(1))"])
def test_non_http_link_is_an_error_and_renders_unlinked(tmp_path, capsys, link):
    root = _entries(tmp_path, {"Bad2026Link": {"link": link, "name": "Title"}})
    path = root / "cifar10" / "Linf" / "Bad2026Link.json"
    errors = [p for p in read_entry(path).errors if p.field == "link"]
    assert len(errors) == 1 and "not an http(s) URL" in errors[0].message
    assert main(["leaderboard", "validate", str(root)]) == 1
    assert "Bad2026Link.json: error: link:" in capsys.readouterr().out
    assert main(["leaderboard", "build", "--entries", str(root)]) == 1  # build refuses invalid entries

    # rendering is safe on its own too, for entries that never went through validation
    grouped = boards(load_entries([root]))
    md = render_markdown(grouped, sources=["x"])
    (row,) = _rows(md)
    assert _cells(row)[1] == "Title `Bad2026Link`"
    assert "javascript" not in md and "<script" not in md
    page = render_html(grouped, sources=["x"])
    assert "<a href" not in page and page.count("<script") == 1
