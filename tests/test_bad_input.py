"""Each row of tests/bad_input_cases.py as a test: bad input -> exit code != 0 and one clear line naming the bad
value and the fix, before any long work (nothing is trained into the empty zoo), and an earlier run's outputs in
the same run dir are left untouched. Rows run in-process through `entry()` (the same code path as the scripts,
minus ~8 s of imports); rows marked `subprocess` also run as a real `python main_*.py`."""
from __future__ import annotations

import importlib
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bad_input_cases import CASES, SCRIPTS, Case
from conftest import ROOT, compose, deny_os_open

SENTINEL_SUMMARY = {"status": "ok", "student_acc_after": 12.5, "note": "an earlier run's result"}
SENTINEL_METRICS = '{"step": 3, "eval/student_acc": 12.5}\n'


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """The files the table's `{art}` placeholders point at (see the docstring of bad_input_cases.py)."""
    from src.io_utils import save_safetensors
    from src.models import ImageInputs, create_model, save_checkpoint

    art = tmp_path_factory.mktemp("bad_input_art")

    def model(arch, classes, **kw):
        torch.manual_seed(0)
        return create_model(arch, ImageInputs(classes, 1, [0.3], [0.38], 8), kwargs=kw)

    digits = {"name": "digits", "image_size": 8, "channels": 1}
    save_checkpoint(model("mlp", 10, hidden=[8]), art / "teacher10",
                    {"name": "teacher10", "kwargs": {"hidden": [8]}, "dataset": digits})
    save_checkpoint(model("mlp", 5, hidden=[8]), art / "teacher5",
                    {"name": "teacher5", "kwargs": {"hidden": [8]}, "dataset": digits})
    for name in ("corrupt", "badmeta"):
        save_checkpoint(model("mlp", 10, hidden=[8]), art / name, {"name": name, "kwargs": {"hidden": [8]},
                                                                  "dataset": digits})
    f = art / "corrupt" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    (art / "badmeta" / "meta.json").write_text('{"name": "badmeta", "arch": ')
    save_safetensors(model("mlp", 5).state_dict(), art / "mlp5.safetensors")
    save_safetensors(model("resnet8", 10).state_dict(), art / "resnet8.safetensors")
    save_safetensors(model("resnet8", 10).state_dict(), art / "trunc.safetensors")
    t = art / "trunc.safetensors"
    t.write_bytes(t.read_bytes()[:-500])
    (art / "evil.pt").write_bytes(pickle.dumps({"state_dict": {"w": torch.zeros(2)}, "x": _Evil(art / "PWNED")}))
    for split in ("train", "val"):
        for c in ("a", "b"):
            (art / "emptyfolder" / split / c).mkdir(parents=True)
        (art / "emptyfolder" / split / "a" / "notes.txt").write_text("not an image")
    (art / "afile").write_text("a file, not a folder")
    _disk_artifacts(art, model, digits)
    from src.models.gan import CondGenerator, save_generator

    save_generator(CondGenerator(img_size=32, channels=3, width=8), art / "gan3x32", {"name": "gan3x32"})
    return art


def _disk_artifacts(art: Path, model, digits: dict) -> None:
    """Files on disk that lie or are damaged (issue 17): meta.json variants, swapped weights, basis files, CSVs."""
    import shutil

    from src.io_utils import save_safetensors
    from src.models import save_checkpoint

    def variant(name, edit):
        shutil.copytree(art / "teacher10", art / name)
        meta = json.loads((art / name / "meta.json").read_text())
        (art / name / "meta.json").write_text(edit(meta))

    variant("metalist", lambda m: json.dumps([m]))
    variant("metanoarch", lambda m: json.dumps({k: v for k, v in m.items() if k != "arch"}))
    five = json.loads((art / "teacher5" / "meta.json").read_text())
    variant("hashlie", lambda m: json.dumps(dict(m, hash=five["hash"])))  # claims another model's hash
    shutil.copytree(art / "teacher10", art / "metadir")
    (art / "metadir" / "meta.json").unlink()
    (art / "metadir" / "meta.json").mkdir()
    shutil.copytree(art / "teacher10", art / "swapped")  # weights replaced by hand, the old meta.json left
    other = model("mlp", 10, hidden=[8])
    with torch.no_grad():
        other.classifier.weight.add_(1.0)  # the same architecture, other weights
    save_checkpoint(other, art / "other10", {"name": "other10", "kwargs": {"hidden": [8]},
                                                                   "dataset": digits})
    shutil.copy(art / "other10" / "model.safetensors", art / "swapped" / "model.safetensors")
    save_safetensors({"mu": torch.zeros(64), "V": torch.zeros(64)}, art / "basis_rank.safetensors")
    save_safetensors({"mu": torch.zeros(64), "V": torch.zeros(5, 3)}, art / "basis_shape.safetensors")
    save_safetensors({"mu": torch.full((64,), float("nan")), "V": torch.zeros(64, 8)}, art / "basis_nan.safetensors")
    (art / "basis_garbage.safetensors").write_bytes(os.urandom(256))
    (art / "nan.csv").write_text("model,top1\nmlp_small,nan\nlenet,98.1\n")
    (art / "bom.csv").write_text("\ufeffmodel,top1\nlenett,\nmlp_small,\n", encoding="utf-8")


@pytest.fixture(scope="session")
def ffcv_artifacts(artifacts):
    """The FFCV files of the table (see bad_input_cases.py): a real digits beton, emptied and cut."""
    import numpy as np
    from conftest import compose
    from ffcv.types import ALLOC_TABLE_TYPE, HeaderType

    from src.data import build_dataset
    from src.data.ffcv_loader import write_beton

    cfg = compose("pretrain/pretrain", [f"paths.data={artifacts / 'data'}"])
    real = write_beton(build_dataset(cfg.dataset, cfg.paths).split("test"),
                       artifacts / "ffcv_real" / "digits_test.beton", num_workers=1, page_size_mib=2)
    data = real.read_bytes()
    table = int(np.frombuffer(data[:HeaderType.itemsize], dtype=HeaderType)[0]["alloc_table_ptr"])
    cut = data[:table + 100 * ALLOC_TABLE_TYPE.itemsize]  # 100 whole entries of 359: FFCV's Reader accepts it
    for folder, content in (("ffcv_empty", b""), ("ffcv_trunc", cut)):
        (artifacts / folder).mkdir()
        for split in ("train", "val", "test"):
            (artifacts / folder / f"digits_{split}.beton").write_bytes(content)
    return artifacts


def _prepare_locked(case: Case, art: Path, tmp: Path):
    """Copy the row's files and return the path its `locked` names (None for rows without one)."""
    if not case.locked:
        return None
    src, dst = (c.format(art=art, tmp=tmp) for c in case.copy)
    if not src:
        Path(dst).mkdir(parents=True)
    elif Path(src).is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)
    return Path(case.locked.format(art=art, tmp=tmp))


def _overrides(case: Case, art: Path, tmp: Path):
    paths = [f"paths.checkpoints={tmp / 'empty_zoo'}", f"paths.cache={tmp / 'cache'}", f"paths.data={tmp / 'data'}"]
    own = [o.format(art=art, tmp=tmp) for o in case.overrides]
    given = {o.split("=", 1)[0] for o in own}
    return own + [p for p in paths if p.split("=", 1)[0] not in given]  # a row may point a path elsewhere


def _earlier_run(run: Path) -> dict:
    """An earlier run's outputs in the run dir the bad command points at; returns their bytes."""
    (run / "checkpoints" / "train" / "step_00000003").mkdir(parents=True)
    (run / "checkpoints" / "train" / "latest").write_text("step_00000003")
    (run / "summary.json").write_text(json.dumps(SENTINEL_SUMMARY))
    (run / "metrics.jsonl").write_text(SENTINEL_METRICS)
    (run / "model").mkdir()
    (run / "model" / "model.safetensors").write_bytes(b"earlier weights")
    return _snapshot(run)


def _snapshot(run: Path) -> dict:
    keep = ("summary.json", "metrics.jsonl", "checkpoints/train/latest", "model/model.safetensors")
    return {k: (run / k).read_bytes() if (run / k).exists() else None for k in keep}


def _check_message(case: Case, line: str):
    for s in case.expect:
        assert s in line, f"{case.id}: {s!r} not in the message {line!r}"


def _assert_nothing_trained(tmp: Path, case: Case):
    zoo = tmp / "empty_zoo"
    trained = sorted(str(p.parent.relative_to(zoo)) for p in zoo.rglob("meta.json")) if zoo.exists() else []
    assert not trained, f"{case.id}: zoo models were trained before the error: {trained}"


@pytest.mark.parametrize("case", [c for c in CASES if c.inprocess], ids=lambda c: c.id)
def test_bad_input_in_process(case: Case, artifacts, tmp_path, capsys, monkeypatch, request):
    for module in case.requires:
        pytest.importorskip(module)
    if "ffcv" in case.requires:
        request.getfixturevalue("ffcv_artifacts")
    locked = _prepare_locked(case, artifacts, tmp_path)
    if locked is not None:
        deny_os_open(monkeypatch, locked)
    _check_in_process(case, artifacts, tmp_path, capsys)


def _check_in_process(case: Case, artifacts, tmp_path, capsys):
    from src.entry import entry

    script = SCRIPTS[case.script]
    overrides = _overrides(case, artifacts, tmp_path)
    if case.kind == "hydra":  # composition fails inside Hydra, before our code: it must name key and value
        with pytest.raises(Exception) as ei:
            compose(script.config, overrides)
        _check_message(case, str(ei.value))
        return
    cfg = compose(script.config, overrides)
    run_dir = tmp_path / "run"
    before = _earlier_run(run_dir)
    family = importlib.import_module(script.module)
    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        entry(lambda c: family.run(c, run_dir=run_dir), cfg)
    assert ei.value.code == 2, f"{case.id}: exit code {ei.value.code}"
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), f"{case.id}: stderr is not one line: {err}"
    _check_message(case, err[0])
    after = _snapshot(run_dir)
    if case.trains:  # this run logged before it diverged: after the earlier lines, which are kept
        m0, m1 = before.pop("metrics.jsonl"), after.pop("metrics.jsonl")
        assert m1.startswith(m0), f"{case.id}: the earlier run's metrics lines were modified"
    assert after == before, f"{case.id}: an earlier run's outputs were modified"
    _assert_nothing_trained(tmp_path, case)
    assert not (artifacts / "PWNED").exists(), "a checkpoint's pickle was executed"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes through any file mode, so a chmod 000 stops "
                    "nothing; the patched-os.open variant of these rows runs in test_bad_input_in_process")
@pytest.mark.parametrize("case", [c for c in CASES if c.locked], ids=lambda c: c.id)
def test_locked_rows_with_real_permissions(case: Case, artifacts, tmp_path, capsys):
    locked = _prepare_locked(case, artifacts, tmp_path)
    mode = stat.S_IMODE(locked.stat().st_mode)
    locked.chmod(0)
    try:
        _check_in_process(case, artifacts, tmp_path, capsys)
    finally:
        locked.chmod(mode)  # tmp_path's cleanup needs it


def test_root_bypasses_permissions_but_the_probes_do_not_trust_access(tmp_path, monkeypatch):
    """The probes make a real open / create: as root the locked folder is truly writable (no false error);
    with os.open refusing, both name the path; os.access is never the judge."""
    from src.errors import UserError
    from src.io_utils import check_readable, ensure_dir, write_probe

    d = tmp_path / "d"
    d.mkdir()
    f = tmp_path / "w.bin"
    f.write_bytes(b"x")
    assert write_probe(d) is None and check_readable(f) == f
    assert os.listdir(d) == []  # the probe file is removed again
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # an access() that says no is not believed
    assert ensure_dir(d, "paths.cache") == d and check_readable(f) == f
    deny_os_open(monkeypatch, d)
    with pytest.raises(UserError, match=r"paths.cache=.*/d is not writable by you \(Permission denied\)"):
        ensure_dir(d, "paths.cache")
    deny_os_open(monkeypatch, f)
    with pytest.raises(UserError, match=r"w.bin is not readable \(Permission denied\)"):
        check_readable(f, "weights file")


def _run_script(script: str, args, timeout=300, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("KT_DATA", "KT_CHECKPOINTS", "KT_CACHE", "KT_DEBUG", "HYDRA_FULL_ERROR"):
        env.pop(k, None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c.subprocess], ids=lambda c: c.id)
def test_bad_input_subprocess(case: Case, artifacts, tmp_path):
    script = SCRIPTS[case.script]
    overrides = _overrides(case, artifacts, tmp_path)
    run_dir = tmp_path / "run"
    before = _earlier_run(run_dir)
    if not any(o.startswith("hydra.run.dir=") for o in overrides):
        overrides.append(f"hydra.run.dir={run_dir}")
    res = _run_script(script.main, overrides)
    assert res.returncode != 0, f"{case.id}: exit code 0\n{res.stdout[-2000:]}"
    if case.kind == "hydra":
        _check_message(case, res.stderr)
    else:
        assert res.returncode == 2, f"{case.id}: exit {res.returncode}\n{res.stderr[-3000:]}"
        err = [line for line in res.stderr.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("error: "), f"{case.id}: stderr is not one line: {err}"
        assert "Traceback" not in res.stderr
        _check_message(case, err[0])
    assert _snapshot(run_dir) == before, f"{case.id}: an earlier run's outputs were modified"
    _assert_nothing_trained(tmp_path, case)
    assert not (artifacts / "PWNED").exists(), "a checkpoint's pickle was executed"


def test_debug_flag_shows_the_traceback(artifacts, tmp_path, capsys, monkeypatch):
    """KT_DEBUG=1: the same exit code and line, plus the full traceback."""
    from src.experiments import pretrain
    from src.entry import entry

    cfg = compose("pretrain/pretrain", ["name=null", "model=mlp", "optimizer.lr=-0.1",
                                        f"paths.checkpoints={tmp_path / 'ck'}", f"paths.cache={tmp_path / 'c'}"])
    monkeypatch.setenv("KT_DEBUG", "1")
    with pytest.raises(SystemExit) as ei:
        entry(lambda c: pretrain.run(c, run_dir=tmp_path / "run"), cfg)
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "UserError" in err
    assert err.strip().splitlines()[-1] == "error: optimizer.lr=-0.1 must be > 0: use e.g. optimizer.lr=0.1"


def test_every_script_has_rows():
    """A new entry script registers itself in SCRIPTS and brings rows (at least an unknown name and a range)."""
    for name, script in SCRIPTS.items():
        assert (ROOT / script.main).is_file(), f"{script.main} does not exist"
        assert sum(c.script == name for c in CASES) >= 2, f"no bad-input rows for {name}"
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"


# ---------------------------------------------------------------------- scripts/ (issue 17): one line, no traceback


def test_save_features_refuses_use_cache_false(tmp_path, capsys):
    from conftest import load_script

    from src.entry import entry

    sf = load_script("save_features")
    cfg = compose("aft/aft", ["use_cache=false", f"paths.checkpoints={tmp_path / 'ck'}",
                              f"paths.cache={tmp_path / 'cache'}"])
    with pytest.raises(SystemExit) as ei:
        entry(lambda c: sf.save(c, run_dir=tmp_path / "run"), cfg)
    assert ei.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: use_cache=false") and "drop use_cache=false" in err[0]
    assert not (tmp_path / "ck").exists() or not list((tmp_path / "ck").rglob("meta.json"))


def test_write_ffcv_out_dir_below_a_file_is_one_line(artifacts, tmp_path):
    res = _run_script("scripts/write_ffcv.py", ["--out-dir", str(artifacts / "afile" / "betons"),
                                                f"paths.data={tmp_path / 'data'}"])
    assert res.returncode == 2, res.stderr[-2000:]
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "--out-dir=" in err[0] and "afile is a regular file" in err[0], err
    assert "Traceback" not in res.stderr


def test_aggregate_lists_a_torn_or_incomplete_summary(tmp_path, capsys):
    from conftest import load_script

    agg = load_script("aggregate")
    ok = {"status": "ok", "family": "transfer", "method": "KL", "teacher": "a", "student": "b", "teacher_acc": 90.0,
          "student_acc_before": 95.0, "student_acc_after": 96.0, "transfer_delta": 1.0, "knowledge_gain": 2.0,
          "knowledge_loss": 1.0}
    for name, text in (("a", json.dumps(ok)), ("torn", json.dumps(ok)[:30]),
                       ("incomplete", json.dumps({"status": "ok", "family": "transfer", "transfer_delta": 3.0}))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(text)
    tables, problems = agg.main([str(tmp_path), "--out", str(tmp_path / "out")])
    t = tables["transfer_methods"]
    assert [(r["method"], r["runs"], r["mean_delta"]["mean"]) for r in t] == [("KL", 1, 1.0)]
    why = {p["dir"].rsplit("/", 1)[1]: p["reason"] for p in problems}
    assert set(why) == {"torn", "incomplete"} and "unreadable" in why["torn"] and "lacks" in why["incomplete"]
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "torn" in (tmp_path / "out" / "results.md").read_text()
