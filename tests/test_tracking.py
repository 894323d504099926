"""Tracking: metrics.jsonl and summary.json always; wandb offline writes a run dir (and a resumed run reuses its id),
disabled writes none."""
from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from src.errors import UserError
from src.schema import WandbConfig
from src.tracking import Tracker


def _wandb(mode, **kw):
    return OmegaConf.structured(WandbConfig(mode=mode, project="kt-tests", **kw))


@pytest.fixture(autouse=True)
def _no_wandb_env(monkeypatch, tmp_path):
    for k in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))


def test_disabled_writes_metrics_and_summary_but_no_wandb_dir(tmp_path):
    run = tmp_path / "run"
    t = Tracker(run, _wandb("disabled"), config={"a": 1})
    t.log({"val/acc": 0.5, "loss": torch.tensor(1.25)}, step=10)
    t.log({"val/acc": float("nan"), "loss": float("inf")}, step=20)
    s = t.summary({"test_acc": torch.tensor(0.75), "task": "x"})
    t.finish()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 10, "val/acc": 0.5, "loss": 1.25},
                                                    {"step": 20, "val/acc": None, "loss": 1e308}]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_acc"] == 0.75 and summary["task"] == "x" and "torch" in summary["versions"]
    assert s["test_acc"] == 0.75
    assert not (run / "wandb").exists() and t.run_id is None
    assert not (run / ".tracker.json").exists()
    assert t.read_metrics()[0]["step"] == 10
    assert not list(tmp_path.rglob("offline-run-*"))


def test_no_wandb_config_means_disabled(tmp_path):
    t = Tracker(tmp_path)
    t.log({"x": 1}, 1)
    assert t._wandb is None and not (tmp_path / "wandb").exists()
    assert (tmp_path / "metrics.jsonl").is_file()


def test_offline_writes_a_wandb_run_dir_and_resume_reuses_the_id(tmp_path):
    run = tmp_path / "run"
    t = Tracker(run, _wandb("offline", group="g", tags=["a", "b"], name="n"), config={"lr": 0.1})
    assert t.run_id
    t.log({"val/acc": 0.25}, step=1)
    t.summary({"test_acc": 0.5})
    t.finish()
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].is_dir()
    assert runs[0].name.endswith(t.run_id)
    assert list(runs[0].glob(f"run-{t.run_id}.wandb")), "no wandb log file in the offline run dir"
    assert json.loads((run / ".tracker.json").read_text())["wandb_id"] == t.run_id
    assert [r["step"] for r in t.read_metrics()] == [1]  # metrics.jsonl is written whatever wandb does

    t2 = Tracker(run, _wandb("offline"))  # a resumed run continues the same wandb run
    assert t2.run_id == t.run_id
    t2.finish()


def test_unknown_mode_and_unwritable_dir_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="wandb.mode"):
        Tracker(tmp_path / "a", _wandb("sometimes"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="not writable"):
        Tracker(blocker / "run")


def test_truncate_after_drops_later_lines_and_torn_lines(tmp_path):
    t = Tracker(tmp_path)
    for s in range(1, 6):
        t.log({"v": s * 1.5}, step=s)
    with open(t.metrics_path, "a") as f:
        f.write('{"step": 6, "v": ')  # a crash in the middle of a line
    t.truncate_after(3)
    rows = t.read_metrics()
    assert rows == [{"step": 1, "v": 1.5}, {"step": 2, "v": 3.0}, {"step": 3, "v": 4.5}]
    t.log({"v": 0.0}, step=4)
    assert [r["step"] for r in t.read_metrics()] == [1, 2, 3, 4]
    assert not list(tmp_path.glob("*.tmp"))


def test_nonzero_rank_writes_nothing(tmp_path):
    t = Tracker(tmp_path / "r1", _wandb("offline"), rank=1)
    t.log({"x": 1.0}, 1)
    t.summary({"y": 2})
    t.finish()
    assert not (tmp_path / "r1").exists()


def test_clean_values():
    from src.tracking import _clean

    assert _clean(torch.tensor(2.5)) == 2.5 and _clean(float("-inf")) == -1e308 and _clean(math.nan) is None
    assert _clean("s") == "s"


def test_wandb_failures_are_one_line_naming_the_fix(tmp_path, monkeypatch):
    """wandb=online without a login or a network, and a bad WANDB_MODE in the environment, were wandb / pydantic
    tracebacks. The network case talks only to a closed port on the loopback address."""
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    for k in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_MODE", "bogus")
    with pytest.raises(UserError, match=r"environment variable WANDB_MODE='bogus' is not a wandb mode: unset it"):
        Tracker(tmp_path / "a", _wandb("offline"))
    monkeypatch.delenv("WANDB_MODE")
    with pytest.raises(UserError, match=r"^wandb=online needs a login and a network: .*wandb=offline"):
        Tracker(tmp_path / "b", _wandb("online"))
    assert not (tmp_path / "b" / "wandb").exists()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there: no network
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "5")
    with pytest.raises(UserError) as e:
        Tracker(tmp_path / "c", _wandb("online"))
    assert str(e.value).startswith("wandb (mode=online) could not start: ") and "use wandb=offline" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_lock_that_is_a_directory_and_a_non_utf8_metrics_line(tmp_path, caplog):
    """A `.lock` that is a directory was an IsADirectoryError traceback; a non-UTF-8 line in metrics.jsonl (a torn
    write) was a UnicodeDecodeError on resume. The lock names the fix; the line is quarantined."""
    from src.tracking import lock_run_dir

    (tmp_path / "busy" / ".lock").mkdir(parents=True)
    with pytest.raises(UserError, match=r"run dir lock .*\.lock is a directory: remove it \(rm -r"):
        lock_run_dir(tmp_path / "busy")
    t = Tracker(tmp_path / "run")
    for s in (1, 2, 3):
        t.log({"v": float(s)}, step=s)
    with open(t.metrics_path, "ab") as f:
        f.write(b'{"step": 4, "v": \xff\xfe garbage}\n[1, 2]\n')
    t2 = Tracker(tmp_path / "run")
    assert [r["step"] for r in t2.read_metrics()] == [1, 2, 3]
    caplog.set_level("WARNING")
    t2.truncate_after(2)
    assert t2.metrics_path.read_bytes() == b'{"step": 1, "v": 1.0}\n{"step": 2, "v": 2.0}\n'
    assert (tmp_path / "run" / "metrics.jsonl.quarantine").read_bytes() == b'{"step": 4, "v": \xff\xfe garbage}\n[1, 2]\n'
    assert any("moved 2 unreadable line(s)" in r.message for r in caplog.records)
    t2.log({"v": 3.5}, step=3)
    assert [r["step"] for r in t2.read_metrics()] == [1, 2, 3]
