"""Shared fixtures: compose the real configs with Hydra's compose API (in-process, no subprocess cost), isolated
paths per test session, and a digits zoo trained once per session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import src.schema  # noqa: E402,F401  (registers schemas/resolvers)

# torch.compile's on-disk kernel cache is not keyed by ATEN_CPU_CAPABILITY: kernels built under the native back-end
# fail to compile under `default` (`'at::vec' has not been declared`). One cache per back-end, also for the
# subprocesses the tests start (they inherit the environment).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    __import__("tempfile").gettempdir(), f"torchinductor_kt_{os.environ.get('ATEN_CPU_CAPABILITY') or 'native'}"))

CONFIG_DIR = str(ROOT / "config")


def compose(config_name: str, overrides=()):
    """Compose `config_name` (e.g. 'transfer/transfer') from config/ with overrides, like the entry scripts."""
    from hydra import compose as hcompose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hcompose(config_name=config_name, overrides=list(overrides))


def load_script(name: str):
    """Import scripts/<name>.py as a module (scripts/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(mod)
    return mod


def deny_os_open(monkeypatch, target: Path):
    """`os.open` of `target` or of anything below it raises PermissionError, as a chmod 000 would for a user that
    is not root: the probes in src/io_utils.py (check_readable, write_probe) and the FFCV check open files this
    way, so the path to the one-line error is covered even where the tests run as root."""
    import errno

    real = os.open
    target = Path(os.path.abspath(target))

    def fake_open(path, flags, *args, **kwargs):
        if not isinstance(path, int):
            p = Path(os.path.abspath(os.fsdecode(path)))
            if p == target or target in p.parents:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


def find_pids(*needles: str, env_entry: str = ""):
    """pids of the processes whose command line contains every needle (and, if given, whose environment holds the
    exact entry `env_entry`, e.g. "RANK=1"); Linux /proc. Tests use it to signal one worker of a launcher."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = (d / "environ").read_bytes().split(b"\0") if env_entry else []
        except OSError:
            continue
        if all(n in cmd for n in needles) and (not env_entry or env_entry.encode() in env):
            pids.append(int(d.name))
    return pids


@pytest.fixture(scope="session")
def kt_paths(tmp_path_factory):
    """Overrides that point checkpoints and caches at a per-session temp folder."""
    base = tmp_path_factory.mktemp("kt")
    return [f"paths.checkpoints={base / 'checkpoints'}", f"paths.cache={base / 'cache'}",
            f"paths.data={base / 'data'}"]


@pytest.fixture(scope="session")
def digits_zoo(kt_paths, tmp_path_factory):
    """The digits zoo, trained once per session (about a minute on 2 cores); returns the path overrides."""
    from src.experiments import pretrain

    cfg = compose("pretrain/pretrain", ["name=all", "skip_existing=true", *kt_paths])
    pretrain.run(cfg, run_dir=tmp_path_factory.mktemp("zoo_run"))
    return kt_paths


@pytest.fixture(autouse=True)
def _environment_is_restored():
    """Every test leaves os.environ as it found it. Code under test may export variables (submitit_task_env sets
    RANK/WORLD_SIZE/MASTER_ADDR/... the way torchrun would); one leaked WORLD_SIZE=2 makes every later subprocess
    wait for a DDP rendezvous that never comes, so the whole environment is put back after each test."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:  # a test on the trained digits zoo asserts on trained models
        if "digits_zoo" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.trained)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
