"""`python main_<family>.py --help` (issue 26.8): the family's own help, not Hydra's stock one."""
from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from conftest import ROOT, compose
from src.help import EXAMPLES, FAMILIES, family_help

OTHER = {"main_transfer.py": ("aft", "kdep", "zeroshot", "multi_kl_dp"), "main_aft.py": ("kl_dp", "kdep", "crd"),
         "main_kdep.py": ("aft", "kl_dp"), "main_multi_teacher.py": ("aft", "kdep")}


@pytest.mark.parametrize("script", sorted(FAMILIES))
def test_each_family_help_names_its_groups_methods_keys_and_examples(script):
    text = family_help(script)
    primary, prefixes = FAMILIES[script]
    assert text.startswith(f"{script}: ") and "_schema" not in text
    assert "dataset " in text and "digits*" in text and "trainer.amp=none" in text
    groups = text.split("Config groups", 1)[1].split("\n\n", 1)[0]
    method_line = [ln for ln in groups.splitlines() if ln.strip().startswith("method ")]
    if prefixes:
        assert method_line and all(o.rstrip("*").startswith(prefixes) for o in
                                   method_line[0].split(None, 1)[1].split(", "))
    else:
        assert not method_line
    for other in OTHER.get(script, ()):
        assert other not in groups.split(), f"{script} --help offers {other}"
    own = text.split("Keys of this family", 1)[1].split("\n\n", 1)[0]
    assert len(own.splitlines()) >= 4 and " # " not in own.replace("  # ", "")  # key=value  # comment


@pytest.mark.parametrize("script", sorted(FAMILIES))
def test_help_examples_compose(script):
    """Every example the help shows composes (a multirun example: its first value of each sweep)."""
    primary, _ = FAMILIES[script]
    for example in EXAMPLES[script]:
        args = [a for a in shlex.split(example)[2:] if a != "-m"]
        args = [a.split("=", 1)[0] + "=" + a.split("=", 1)[1].split(",")[0] if "[" not in a else a for a in args]
        compose(primary, args)


def test_help_flag_prints_the_family_help_and_exits_0():
    res = subprocess.run([sys.executable, "main_aft.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("main_aft.py: Adaptive Feature Transfer") and "aft_btune" in res.stdout
    assert "Powered by Hydra" not in res.stdout and "kl_dp" not in res.stdout.split("Keys of this family")[0]
