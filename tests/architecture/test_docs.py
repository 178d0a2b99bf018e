"""The documentation is self-contained: no citation of files outside the repository, one page per
registered objective, and every relative markdown link resolves."""

from __future__ import annotations

import os
import re

import pytest

from helpers import ROOT

OUTSIDE = ("methods.md", "STYLE.md", "DESIGN.md", "cpu-notes")   # notes that live outside the repository
# objectives documented on another method's page
SHARED_PAGES = {"sida": "sid"}
TEXT_EXT = (".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".json", ".cfg", ".sh")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _files(*roots, ext=TEXT_EXT):
    for root in roots:
        path = os.path.join(ROOT, root)
        if os.path.isfile(path):
            yield path
            continue
        for d, dirs, files in os.walk(path):
            dirs[:] = [x for x in dirs if x not in ("__pycache__", "weights")]
            for f in files:
                if f.endswith(ext):
                    yield os.path.join(d, f)


def _markdown():
    return list(_files("README.md", "docs", ext=(".md",)))


def test_no_citation_of_files_outside_the_repository():
    hits = []
    for path in _files("src", "docs", "README.md"):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                hits += [f"{os.path.relpath(path, ROOT)}:{i}: {w}" for w in OUTSIDE if w in line]
    assert not hits, "\n".join(hits)


def test_every_registered_objective_has_a_page():
    from scoredistill.objectives import OBJECTIVES

    missing = []
    for name in sorted(OBJECTIVES):
        page = SHARED_PAGES.get(name, name)
        if not any(os.path.exists(os.path.join(ROOT, "docs", d, f"{page}.md")) for d in ("objectives", "optimize")):
            missing.append(name)
    assert not missing, f"no docs/objectives/<name>.md or docs/optimize/<name>.md for {missing}"
    assert len(OBJECTIVES) >= 18


METHOD_PAGES = [("objectives", n) for n in ("dmd", "dmd2", "vsd", "sid", "sim", "fdistill", "swiftbrush", "sfd", "msd",
                                                        "scm", "rcm", "cd", "ict", "meanflow", "twinflow")]
METHOD_PAGES += [("optimize", n) for n in ("sds", "vsd_particles", "esd", "asd", "csd", "ism", "tsm", "cds", "bsd")]


@pytest.mark.parametrize("folder,name", METHOD_PAGES)
def test_method_pages_cite_their_paper_state_pitfalls_and_are_indexed(folder, name):
    text = open(os.path.join(ROOT, "docs", folder, f"{name}.md"), encoding="utf-8").read()
    assert re.search(r"arXiv\s+\[?\d{4}\.\d{5}", text), f"docs/{folder}/{name}.md cites no arXiv id"
    assert "\n## Pitfalls" in text, f"docs/{folder}/{name}.md has no Pitfalls section"
    index = open(os.path.join(ROOT, "docs", "objectives.md"), encoding="utf-8").read()
    assert f"({folder}/{name}.md)" in index, f"docs/objectives.md does not link {folder}/{name}.md"


def _links(path):
    text = open(path, encoding="utf-8").read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)          # code blocks hold no links
    for m in LINK.finditer(text):
        yield m.group(1) or m.group(2)


def test_relative_markdown_links_resolve():
    broken = []
    for path in _markdown():
        for target in _links(path):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue                                     # http(s):, mailto:, in-page anchors
            rel = target.split("#", 1)[0]
            if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(path), rel))):
                broken.append(f"{os.path.relpath(path, ROOT)} -> {target}")
    assert not broken, "\n".join(broken)


def test_readme_lists_every_docs_page():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    linked = {os.path.normpath(t.split("#", 1)[0]) for t in _links(os.path.join(ROOT, "README.md"))}
    pages = {os.path.relpath(p, ROOT) for p in _markdown() if p != os.path.join(ROOT, "README.md")}
    missing = sorted(p for p in pages if p not in linked)
    assert not missing, f"README.md does not link {missing}"
    assert "docs/objectives.md" in readme


def test_the_link_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) and [gone](missing.md) and ![img](pic.png) and [web](https://arxiv.org)\n"
                    "```\n[in code](nowhere.md)\n```\n")
    assert list(_links(str(page))) == ["page.md", "missing.md", "pic.png", "https://arxiv.org"]
