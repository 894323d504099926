"""Every result the README states as mean ± std is quoted from a results file of the repository (results/*/REPORT.md
and results/*/tables/, written by scripts/reproduce.py and scripts/aggregate.py), so a change that moves a number
cannot leave the README stale: regenerate the file, then quote it."""
from __future__ import annotations

import re

from conftest import ROOT

PM = re.compile(r"(?<![\d.])([-+\u2212]?\d+\.\d+) ± (\d+\.\d+)")
GENERATED = ("runs", "work", "logs")  # what reproduce.py makes under results/<suite>/ and git ignores


def _key(value: str, std: str) -> str:
    return f"{float(value.replace(chr(0x2212), '-')):.2f} ± {std}"


def results_text() -> str:
    files = [p for p in (ROOT / "results").rglob("*") if p.suffix in (".md", ".csv") and p.is_file()
             and not set(p.relative_to(ROOT / "results").parts[1:2]) & set(GENERATED)]
    return "\n".join(p.read_text() for p in files)


def quoted(text: str):
    """(line number, 'mean ± std') of every mean ± std in `text`, the sign normalised (+1.04 and 1.04 are one)."""
    return [(i, _key(*m.groups())) for i, line in enumerate(text.splitlines(), 1) for m in PM.finditer(line)]


def test_the_scanner_normalises_signs_and_skips_nothing():
    text = "KL -3.19 ± 0.97, KL+DP +1.41 ± 0.61 | 98.33 ± 0.00 [±0.00] | \u22120.46 ± 1.39 | 3 ± 1"
    assert quoted(text) == [(1, "-3.19 ± 0.97"), (1, "1.41 ± 0.61"), (1, "98.33 ± 0.00"), (1, "-0.46 ± 1.39")]
    have = {k for _, k in quoted("| KL+DP | 1.41 ± 0.61 [±1.52] |")}
    assert "1.41 ± 0.61" in have and "-1.41 ± 0.61" not in have


def test_every_mean_and_std_in_the_readme_is_quoted_from_a_results_file():
    have = {k for _, k in quoted(results_text())}
    readme = quoted((ROOT / "README.md").read_text())
    assert len(readme) >= 40  # the families' result tables are there
    stale = [f"README.md:{i}: {k}" for i, k in readme if k not in have]
    assert not stale, ("numbers the README states that no file under results/ holds (rerun the command that wrote "
                       "the file, e.g. scripts/reproduce.py, and quote it):\n" + "\n".join(stale))
