"""A full disk (issue #25): a checkpoint write ended in a traceback that never said "no space left" (torch's zip
writer says "unexpected pos"), a cache write was a traceback, and a killed save left its temp files behind.

Now: one line naming the file and the setting that moves its folder; a cache that cannot store computes without
storing (warned once); the next start removes a dead writer's temp files and keeps the previous checkpoint.
A real full disk is a tiny tmpfs where this process may mount one (root), else the writers are patched to fail
with the errors they raise on a full disk (measured on a tmpfs: OSError ENOSPC, safetensors' "os error 28",
torch's RuntimeError)."""
from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, compose

from src.errors import UserError
from src.io_utils import DiskFull, atomic_path, ensure_dir, remove_stale_temps, save_safetensors, torch_save


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (a real full disk), unmounted afterwards; skipped where mounting is not allowed."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): the patched tests below cover the same lines")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(folder: Path, leave: int = 8192) -> None:
    """Fill the disk of `folder` until about `leave` bytes are free."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def _ckpt_dir(run_dir: Path):
    from src.engine.trainer import CheckpointDir

    ensure_dir(run_dir, "hydra.run.dir")
    return CheckpointDir(run_dir / "checkpoints" / "train")


def _weights(n=50_000):
    return {"w": torch.arange(n, dtype=torch.float32)}


def _assert_one_line(msg: str, path_part: str, key: str):
    assert "\n" not in msg and msg.startswith("no space left on the device while writing ") and path_part in msg, msg
    assert f"set {key}=<a folder on a disk with space>" in msg and "the previous file, if any, is intact" in msg


# ------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_on_a_real_full_disk_is_one_line_and_keeps_the_previous(tiny_disk):
    ck = _ckpt_dir(tiny_disk / "run")
    first = ck.save(1, _weights(1000), {"step": 1})
    _fill(tiny_disk)
    with pytest.raises(DiskFull) as e:
        ck.save(2, _weights(), {"step": 2})  # 200 kB of weights into 8 kB
    _assert_one_line(str(e.value), str(tiny_disk / "run" / "checkpoints" / "train"), "hydra.run.dir")
    assert ck.latest() == first and torch.equal(ck.load(first)[0]["w"], _weights(1000)["w"])
    assert not [p for p in tiny_disk.rglob("*.tmp")]  # the failed write's temp file is gone


@pytest.mark.parametrize("error", ["oserror", "torch_runtime"])
def test_checkpoint_state_write_fails_for_space_is_one_line(tmp_path, monkeypatch, error):
    """torch.save on a full disk: OSError ENOSPC, or (torch's zip writer) a RuntimeError that names no cause,
    recognised by the free space left after it."""
    import src.io_utils as io

    ck = _ckpt_dir(tmp_path / "run")
    first = ck.save(1, _weights(10), {"step": 1})

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"PK\3\4partial")
        if error == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(io.torch, "save", full)
    if error == "torch_runtime":
        monkeypatch.setattr(io, "free_bytes", lambda folder: 4096)
    with pytest.raises(UserError) as e:
        ck.save(2, _weights(10), {"step": 2})
    _assert_one_line(str(e.value), "state.pt", "hydra.run.dir")
    assert ck.latest() == first and not list((tmp_path / "run").rglob("*.tmp"))


def test_a_plain_runtime_error_is_not_called_a_full_disk(tmp_path, monkeypatch):
    import src.io_utils as io

    monkeypatch.setattr(io.torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        torch_save({}, tmp_path / "x.pt")  # plenty of space: the writer's own error, untouched


def test_the_setting_named_is_the_one_that_holds_the_file(tmp_path, monkeypatch):
    """paths.cache, paths.checkpoints and hydra.run.dir each name their own folder (the closest one wins)."""
    import safetensors.torch

    for key, sub in (("paths.cache", "cache"), ("paths.checkpoints", "ck"), ("hydra.run.dir", "ck/run")):
        ensure_dir(tmp_path / sub, key)

    def full(state, path, metadata=None):  # what safetensors raises on a full disk (measured on a tmpfs)
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    for key, sub in (("paths.cache", "cache/m"), ("paths.checkpoints", "ck/zoo"), ("hydra.run.dir", "ck/run/x")):
        with pytest.raises(DiskFull) as e:
            save_safetensors(_weights(4), tmp_path / sub / "model.safetensors")
        _assert_one_line(str(e.value), str(tmp_path / sub / "model.safetensors"), key)


@pytest.mark.slow
def test_a_full_disk_in_a_run_is_one_error_line_and_exit_2(tiny_disk, tmp_path):
    """The whole path: main_pretrain.py with its run dir on the full disk ends in one `error:` line, exit 2."""
    run_dir = tiny_disk / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env.pop("KT_DEBUG", None)
    _fill(tiny_disk, leave=64 << 10)  # Hydra's config files fit, a ResNet-20 checkpoint (1 MB) does not
    r = subprocess.run([sys.executable, "main_pretrain.py", "name=null", "model=resnet20", "trainer.max_steps=2",
                        "trainer.device=cpu", f"hydra.run.dir={run_dir}", f"paths.checkpoints={tmp_path / 'ck'}",
                        f"paths.cache={tmp_path / 'cache'}", f"paths.data={tmp_path / 'data'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and lines[-1].startswith("error: no space left on the device while writing "
                                                               f"{run_dir}"), r.stderr[-3000:]
    assert "set hydra.run.dir=<a folder on a disk with space>" in lines[-1]


# ------------------------------------------------------------------------------------------------- cache


def _cache_setup(tmp_path):
    from src.data import build_dataset, build_loader
    from src.engine.cache import OutputCache
    from src.engine.evaluate import predict
    from src.models import create_model

    cfg = compose("pretrain/pretrain", [f"paths.data={tmp_path / 'data'}", "loader.device=cpu"])
    ds = build_dataset(cfg.dataset, cfg.paths)
    torch.manual_seed(0)
    model = create_model("mlp", ds.info).eval()
    splits = [ds.split("test"), ds.split("val")]
    loaders = [build_loader(cfg.loader, sp, train=False) for sp in splits]
    ensure_dir(tmp_path / "cache", "paths.cache")
    expected = [predict(model, ld) for ld in loaders]
    return OutputCache(tmp_path / "cache" / "outputs"), model, splits, loaders, expected


def test_a_cache_that_cannot_store_computes_without_storing_warned_once(tmp_path, monkeypatch, caplog):
    import safetensors.torch

    cache, model, splits, loaders, expected = _cache_setup(tmp_path)
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    with caplog.at_level(logging.WARNING, logger="src.engine.cache"):
        for _ in range(2):
            for sp, ld, want in zip(splits, loaders, expected):
                out = cache.get(model, "mlp-k", "digits", sp, ld)
                assert torch.equal(out["logits"], want["logits"]) and torch.equal(out["ids"], want["ids"])
    assert cache.computed == 4 and cache.unstored == 4 and cache.hits == 0
    warned = [r.getMessage() for r in caplog.records if "cannot store" in r.getMessage()]
    assert len(warned) == 1 and "no space left on the device" in warned[0] and "paths.cache" in warned[0], warned
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.suffix == ".tmp"]


def test_a_cache_on_a_real_full_disk_still_returns_the_outputs(tiny_disk, tmp_path, caplog):
    cache, model, splits, loaders, expected = _cache_setup(tmp_path)
    cache.root = tiny_disk / "outputs"
    _fill(tiny_disk, leave=4096)
    with caplog.at_level(logging.WARNING, logger="src.engine.cache"):
        out = cache.get(model, "mlp-k", "digits", splits[0], loaders[0])
    assert torch.equal(out["logits"], expected[0]["logits"]) and cache.unstored == 1
    assert any("cannot store" in r.getMessage() for r in caplog.records)


def test_log_prob_file_on_a_full_disk_is_one_line_not_sigbus(tiny_disk):
    """The streamed KL's fp16 memory map: written past a full disk it would die of SIGBUS."""
    from src.engine.cache import log_prob_file

    with pytest.raises(DiskFull, match="no space left on the device while writing .*logp.npy"):
        log_prob_file(torch.zeros(2000, 1000), tiny_disk / "logp.npy")


# ------------------------------------------------------------------------------- leftovers of a killed save

KILLED_WRITER = """
import sys, time
from src.io_utils import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"partial " * 1000)
    print(tmp, flush=True)
    time.sleep(120)
"""


def test_a_killed_saves_temp_file_is_removed_at_the_next_start(tmp_path):
    """kill -9 during a checkpoint save leaves its temp file; the next start (ensure_dir of the run dir, as every
    run does when it locks it) removes it, keeps the previous checkpoint and a live writer's temp file."""
    import src.io_utils as io

    run = tmp_path / "run"
    ck = _ckpt_dir(run)
    first = ck.save(1, _weights(10), {"step": 1})
    target = first / "model.safetensors"  # a save over the previous checkpoint's file, killed midway
    p = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], cwd=ROOT, stdout=subprocess.PIPE,
                         text=True)
    leftover = Path(p.stdout.readline().strip())
    p.kill()
    p.wait()
    assert leftover.is_file() and leftover.parent == first
    with atomic_path(run / "live.json") as live:  # this process's own save, in progress
        live.write_text("{}")
        io._SWEPT.discard(str(run.resolve()))  # a new process: it has not swept this folder yet
        ensure_dir(run, "hydra.run.dir")
        assert live.is_file()
    assert not leftover.exists() and (run / "live.json").is_file()
    assert ck.latest() == first and torch.equal(ck.load(first)[0]["w"], _weights(10)["w"])


def test_old_or_other_host_temps(tmp_path):
    """An untagged (older suite) or other-host temp file is a leftover once it is a day old, not before."""
    fresh, old = tmp_path / ".a.safetensors.abcd1234.tmp", tmp_path / ".b.pt.kt-otherhost-1.xyz_1234.tmp"
    for f in (fresh, old):
        f.write_bytes(b"x")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    assert remove_stale_temps(tmp_path) == [old] and fresh.exists()
    deep = tmp_path / "a" / "b" / "c" / "d" / "e"  # 5 levels down: beyond what the sweep looks at
    deep.mkdir(parents=True)
    (deep / old.name).write_bytes(b"x")
    os.utime(deep / old.name, (time.time() - 2 * 86400,) * 2)
    assert remove_stale_temps(tmp_path) == [] and (deep / old.name).exists()
