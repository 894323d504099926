"""docs/REFERENCE.md and the citations of it: every numbered section has a unique number and a stable anchor,
every `docs/REFERENCE.md <section>` cited in src/, scripts/, config/, tests/ and README.md names a section heading
that exists, no citation is left in an older form (`REFERENCE <n>`, `REFERENCE.md section <n>`), README links
point at existing anchors, and every repository path the reference names exists."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import ROOT

DOC = ROOT / "docs" / "REFERENCE.md"
SECTION = "\u00a7"  # the section sign, spelled out so that this file cites nothing itself
SCANNED_DIRS = ("src", "scripts", "config", "tests")
SCANNED_FILES = ("README.md",)
TEXT_SUFFIXES = {".py", ".yaml", ".yml", ".md", ".sh", ".txt", ".cfg", ".ini", ".toml", ".csv"}

HEADING = re.compile(r"^(#{2,3}) " + SECTION + r"(\d+(?:\.\d+)?) \S")
ANCHOR = re.compile(r'^<a id="(s\d+(?:-\d+)?)"></a>$')
NUMBER = re.compile(SECTION + r"\s*(\d+(?:\.\d+)*)")
# a citation in an older form: REFERENCE without the docs/ path or the .md, or "REFERENCE.md section 3"
OLD_FORM = re.compile(r"(?<!docs/)REFERENCE\b|REFERENCE(?!\.md)|REFERENCE\.md\s+[Ss]ect")
LINK = re.compile(r"\[([^\]]*)\]\(docs/REFERENCE\.md(?:#([\w-]+))?\)")


def anchor_of(number: str) -> str:
    return "s" + number.replace(".", "-")


def sections(text: str):
    """{number: (level, anchor on the line above or None)} of the numbered headings of the reference."""
    lines = text.splitlines()
    out = {}
    for i, line in enumerate(lines):
        m = HEADING.match(line)
        if not m:
            continue
        number = m.group(2)
        assert number not in out, f"section {SECTION}{number} is numbered twice"
        above = ANCHOR.match(lines[i - 1]) if i else None
        out[number] = (len(m.group(1)), above.group(1) if above else None)
    return out


def problems(text: str, known) -> list:
    """What is wrong with the citations of one file's text: section numbers that name no heading, and citations
    in an older form."""
    bad = [f"{SECTION}{n} names no section" for n in NUMBER.findall(text) if n not in known]
    bad += [f"old-style citation '{text[max(0, m.start() - 10):m.end() + 12].strip()}'"
            for m in OLD_FORM.finditer(text)]
    return bad


def scanned_files():
    files = [ROOT / f for f in SCANNED_FILES]
    for d in SCANNED_DIRS:
        files += [p for p in sorted((ROOT / d).rglob("*"))
                  if p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts]
    return files


@pytest.fixture(scope="module")
def known():
    return sections(DOC.read_text(encoding="utf-8"))


def test_every_section_has_a_unique_number_a_stable_anchor_and_its_family(known):
    assert {"0", "1", "2", "3", "4", "5"} <= set(known)
    for number, (level, anchor) in known.items():
        assert anchor == anchor_of(number), f"{SECTION}{number} needs '<a id=\"{anchor_of(number)}\"></a>' above it"
        family, _, sub = number.partition(".")
        assert level == (3 if sub else 2), f"{SECTION}{number}: families are '##' headings, subsections '###'"
        if sub:
            assert family in known, f"{SECTION}{number} has no family section {SECTION}{family}"
    # subsections of a family are numbered 1, 2, 3, ... in the order they appear
    order = list(known)
    for family in {n.split(".")[0] for n in order}:
        subs = [int(n.split(".")[1]) for n in order if n.startswith(family + ".")]
        assert subs == list(range(1, len(subs) + 1)), f"{SECTION}{family}: subsections {subs}"


def test_the_checker_finds_bad_citations(known):
    ok = f"see docs/REFERENCE.md {SECTION}1.4 and {SECTION}5.1; [docs/REFERENCE.md](docs/REFERENCE.md)"
    assert problems(ok, known) == []
    assert problems(f"docs/REFERENCE.md {SECTION}1.99", known) == [f"{SECTION}1.99 names no section"]
    assert len(problems(f"(REFERENCE {SECTION}1)", known)) == 1
    assert len(problems("(REFERENCE.md section 3)", known)) == 1
    assert len(problems(f"(shared/REFERENCE.md {SECTION}2)", known)) == 1


def test_every_citation_in_the_repository_names_an_existing_section(known):
    bad, cited = [], set()
    for path in scanned_files():
        if path == Path(__file__):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        cited.update(NUMBER.findall(text))
        bad += [f"{path.relative_to(ROOT)}: {p}" for p in problems(text, known)]
    assert not bad, "\n".join(bad)
    # the citations this suite's modules carry (the test must not pass by finding none)
    assert {"1.1", "1.11", "1.15", "2", "3.2", "4.5", "5.1", "5.3"} <= cited, sorted(cited)


def test_readme_links_into_the_reference_hit_existing_anchors(known):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    links = LINK.findall(text)
    assert links, "README.md should point readers at docs/REFERENCE.md"
    anchors = {a for _, a in known.values()}
    for label, anchor in links:
        if anchor:
            assert anchor in anchors, f"README link #{anchor} ({label}) names no anchor of docs/REFERENCE.md"
            cited = NUMBER.findall(label)
            if cited:  # "[docs/REFERENCE.md <n>](docs/REFERENCE.md#s<n>)": text and target agree
                assert anchor == anchor_of(cited[0]), f"README link '{label}' points at #{anchor}"


def test_the_reference_refers_only_to_its_own_sections_and_to_files_that_exist(known):
    text = DOC.read_text(encoding="utf-8")
    assert problems(text, known) == []
    anchors = {a for _, a in known.values()}
    for anchor in re.findall(r"\]\(#([\w-]+)\)", text):
        assert anchor in anchors, f"link #{anchor} names no anchor"
    paths = set(re.findall(r"`((?:src|config|scripts|tests|results)/[\w./-]+?)`", text))
    paths |= set(re.findall(r"(?<![\w/`])((?:src|config|scripts|tests)/[\w/.-]+\.(?:py|yaml|csv))", text))
    assert paths, "the reference names the code that implements each section"
    missing = sorted(p for p in paths if not (ROOT / p.rstrip("/.")).exists())
    assert not missing, missing
