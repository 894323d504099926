"""`python main_<family>.py --help`: what the family does, the config groups and methods that apply to it, its own
keys with a line each (the primary config's comments), its presets and two example commands. Hydra's stock help
lists every family's groups (`main_transfer.py --help` offered `aft`, `kdep` and `method: aft`, which then fails),
`_schema` in every group and a 200-line config dump; Hydra's own help stays available as `--hydra-help`."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config"

# script -> (primary config, the method configs it takes: name prefixes; () = it takes no method group)
FAMILIES: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "main_transfer.py": ("transfer/transfer", ("kl", "xekl", "mcl", "cd", "crd")),
    "main_multi_teacher.py": ("multi_teacher/multi_teacher", ("multi_", "kl", "xekl", "mcl", "cd", "crd")),
    "main_aft.py": ("aft/aft", ("aft",)),
    "main_kdep.py": ("kdep/kdep", ("kdep",)),
    "main_flips.py": ("prediction_flips/flips", ()),
    "main_pretrain.py": ("pretrain/pretrain", ()),
    "main_zeroshot.py": ("zeroshot/zeroshot", ()),
}
EXAMPLES: Dict[str, Tuple[str, str]] = {
    "main_transfer.py": ("python main_transfer.py teacher=mlp_small student=resnet8 method=kl_dp",
                         "python main_transfer.py -m method=kl,kl_dp trainer.seed=0,1,2"),
    "main_multi_teacher.py": ("python main_multi_teacher.py mode=sequential",
                              "python main_multi_teacher.py -m mode=parallel,soup"),
    "main_aft.py": ("python main_aft.py method=aft", "python main_aft.py -m method=aft,aft_kd,aft_btune,aft_init"),
    "main_kdep.py": ("python main_kdep.py", "python main_kdep.py student.arch=resnet8 finetune.trainer.epochs=5"),
    "main_flips.py": ("python main_flips.py", "python main_flips.py models=[lenet,resnet8,resnet20] cka=true"),
    "main_pretrain.py": ("python main_pretrain.py", "python main_pretrain.py name=lenet skip_existing=false"),
    "main_zeroshot.py": ("python main_zeroshot.py", "python main_zeroshot.py -m trainer.seed=0,1,2"),
}
_KEY = re.compile(r"^([A-Za-z_][\w]*):\s*(.*?)\s*(?:#\s*(.*))?$")


def _defaults(text: str) -> List[Tuple[str, str]]:
    """(group, default option) of a primary config's `defaults:` list (`- /dataset: digits`)."""
    out = []
    for line in re.split(r"(?m)^defaults:", text, maxsplit=1)[-1].splitlines()[1:]:
        m = re.match(r"^\s+-\s+/?([\w/]+):\s*(\S+)", line)
        if m:
            out.append((m.group(1), m.group(2)))
        elif line.strip() and not line.lstrip().startswith(("-", "#")):
            break
    return out


def _own_keys(text: str) -> List[Tuple[str, str, str]]:
    """(key, value, comment) of the primary config's top-level scalar keys, with the comment on their line."""
    out = []
    for line in text.splitlines():
        m = _KEY.match(line)
        if m and m.group(1) != "defaults" and m.group(2):
            out.append((m.group(1), m.group(2), m.group(3) or ""))
    return out


SCHEMA_GROUPS = {"TrainerConfig": "trainer", "OptimizerConfig": "optimizer", "SchedulerConfig": "scheduler",
                 "LoaderConfig": "loader"}


def _schema_keys() -> List[str]:
    """`trainer.amp=none  # none | bf16 | fp16 ...`: the commented fields of the shared groups' schemas
    (src/schema.py), the keys every family takes."""
    out, group = [], None
    for line in (ROOT / "src" / "schema.py").read_text().splitlines():
        m = re.match(r"^class (\w+)", line)
        if m:
            group = SCHEMA_GROUPS.get(m.group(1))
            continue
        m = re.match(r"^    (\w+): [^=]+= (.+?)\s+#\s*(.*)$", line)
        if group and m:
            value = {"None": "null", "True": "true", "False": "false"}.get(m.group(2), m.group(2).strip('"'))
            out.append(f"  {group}.{m.group(1)}={value}  # {m.group(3)}")
    return out


def _options(group: str) -> List[str]:
    return sorted(p.stem for p in (CONFIG / group).glob("*.yaml") if not p.stem.startswith("_"))


def _description(script: str) -> str:
    path = ROOT / script
    try:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    except (OSError, SyntaxError):
        doc = ""
    return " ".join(doc.split())


def family_help(script: str) -> str:
    primary, prefixes = FAMILIES[script]
    text = (CONFIG / f"{primary}.yaml").read_text()
    lines = [f"{script}: {_description(script)}", "", "Config groups (choose with <group>=<option>; * = default):"]
    for group, default in _defaults(text):
        if group in ("hydra", "paths"):
            continue
        opts = _options(group)
        if group == "method":
            opts = script_methods(script)
        lines.append(f"  {group:<10} " + ", ".join(f"{o}*" if o == default else o for o in opts))
    lines.append(f"  {'hydra/launcher':<10} " + ", ".join(_options("hydra/launcher")) + " (SLURM / local sweeps)")
    lines += ["", f"Keys of this family (config/{primary}.yaml):"]
    lines += [f"  {k}={v}" + (f"  # {c}" if c else "") for k, v, c in _own_keys(text)]
    lines += ["", "Shared keys (their schema defaults, src/schema.py; this family's config may set others: "
                  "--cfg job shows the composed values):"] + _schema_keys()
    family_dir = CONFIG / primary.split("/")[0]
    presets = sorted(p.name for p in family_dir.glob("*.yaml") if p.stem != primary.split("/")[1])
    if presets:
        lines += ["", "Presets: " + ", ".join(f"--config-name {family_dir.name}/{p}" for p in presets)]
    lines += ["", "Examples:"] + [f"  {e}" for e in EXAMPLES[script]]
    lines += ["", "Every group's keys: python " + script + " --cfg job (the composed config); Hydra's own help: "
              "--hydra-help; more: README.md"]
    return "\n".join(lines)


def script_methods(script: str = "") -> List[str]:
    """The method configs the running family script takes (`main_transfer.py`: kl, kl_dp, ...); [] elsewhere."""
    script = script or (Path(sys.argv[0]).name if sys.argv else "")
    if script not in FAMILIES:
        return []
    return [o for o in _options("method") if FAMILIES[script][1] and o.startswith(FAMILIES[script][1])]


def maybe_print_help(argv=None) -> None:
    """`--help` / `-h` on a family's script: print its help and exit 0 (before Hydra prints its stock help)."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]).name if argv else ""
    if script in FAMILIES and any(a in ("--help", "-h") for a in argv[1:]):
        print(family_help(script))
        sys.exit(0)
