"""FFCV files that are whole on the outside and damaged inside (issue #25): a beton whose image pages were
overwritten passes every header check and decodes to noise. scripts/write_ffcv.py records the sha256 of every
page in `<file>.beton.sha256.json`; the loader checks them per loader.verify (full | sample | none).

No batch is drawn here (that would JIT-compile an FFCV pipeline): the check runs when the loader is built."""
from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import compose, load_script

os.environ.setdefault("NUMBA_OPT", "0")
pytest.importorskip("ffcv")
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

from src.data import build_dataset, build_loader  # noqa: E402
from src.data.ffcv_loader import checksum_path, sample_pages  # noqa: E402
from src.errors import UserError  # noqa: E402


@pytest.fixture(scope="module")
def digits_beton(tmp_path_factory):
    """digits' test split written by the command-line tool (2 MiB pages), and the loader config / split."""
    base = tmp_path_factory.mktemp("ffcv_rel")
    out = base / "betons"
    common = [f"paths.data={base / 'data'}", f"paths.cache={base / 'cache'}", f"paths.checkpoints={base / 'ck'}"]
    small = ["--out-dir", str(out), "--num-workers", "1", "--page-size-mib", "2"]
    assert load_script("write_ffcv").main([*common, "--splits", "test", *small]) == 0
    cfg = compose("pretrain/pretrain", [*common, "loader=ffcv", f"loader.ffcv_dir={out}", "loader.num_workers=1",
                                        "loader.device=cpu"])
    return out / "digits_test.beton", cfg, build_dataset(cfg.dataset, cfg.paths).split("test")


def _copy(digits_beton, tmp_path, sidecar=True):
    """A copy of the good beton (and its sidecar) in `tmp_path`; a builder of a loader over it, given verify."""
    good, cfg, split = digits_beton
    path = tmp_path / good.name
    path.write_bytes(good.read_bytes())
    if sidecar:
        checksum_path(path).write_bytes(checksum_path(good).read_bytes())
    build = lambda verify: build_loader(OmegaConf.merge(cfg.loader, {"ffcv_dir": str(tmp_path), "verify": verify}),  # noqa: E731
                                        split, train=False)
    return path, build


def _first_image(path):
    """(byte offset, size) of sample 0's stored image, from the allocation table; and the header's page size."""
    from ffcv.types import ALLOC_TABLE_TYPE, HeaderType

    h = np.frombuffer(path.read_bytes()[:HeaderType.itemsize], dtype=HeaderType)[0]
    alloc = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=int(h["alloc_table_ptr"]))
    row = alloc[np.argsort(alloc["sample_id"])][0]
    return int(row["ptr"]), int(row["size"]), int(h["page_size"])


def test_sidecar_records_every_page(digits_beton):
    """write_ffcv.py writes the sidecar with one sha256 per page of the file, after the beton is complete."""
    import hashlib

    good = digits_beton[0]
    rec = json.loads(checksum_path(good).read_text())
    size, page = good.stat().st_size, rec["page_size"]
    assert rec["size"] == size and page == 2 << 20 and rec["algorithm"] == "sha256"
    assert len(rec["pages"]) == -(-size // page) >= 2  # header + metadata page, then data pages
    data = good.read_bytes()
    assert rec["pages"] == [hashlib.sha256(data[k * page:(k + 1) * page]).hexdigest()
                            for k in range(len(rec["pages"]))]
    assert checksum_path(good).stat().st_mtime_ns >= good.stat().st_mtime_ns


@pytest.mark.parametrize("verify", ["sample", "full"])
def test_overwritten_image_page_is_one_line_naming_file_and_page(digits_beton, tmp_path, verify):
    """Bytes of sample 0's image (a data page, past the header and metadata) are overwritten: the header checks
    still pass (FFCV would decode noise), the page checksum names the file and page with the rewrite command;
    verify=none opens the same file without a check."""
    from src.data.ffcv_loader import beton_damage

    path, build = _copy(digits_beton, tmp_path)
    ptr, size, page = _first_image(path)
    assert ptr >= page  # the image lives in a data page, not in the header's page
    with open(path, "r+b") as f:
        f.seek(ptr + size // 2)
        f.write(bytes(64))  # 64 zero bytes in the middle of the image
    assert beton_damage(path) is None  # what the header checks alone say
    with pytest.raises(UserError) as e:
        build(verify)
    msg = str(e.value)
    k = ptr // page
    assert "\n" not in msg and f"FFCV file {path}: page {k} (bytes {k * page}-" in msg, msg
    assert "does not match its checksum" in msg
    assert f"python scripts/write_ffcv.py dataset=digits dataset.num_classes=10 --splits test --out-dir {tmp_path} --overwrite" in msg
    assert build("none").verified_pages == 0


def test_whole_beton_passes_and_sample_hashes_a_handful(digits_beton, tmp_path):
    """The good file opens under every mode; full hashes every page, sample at most 8 (all of this small file),
    drawn by seed and file name (the same pages at every start of the same run)."""
    path, build = _copy(digits_beton, tmp_path)
    n = len(json.loads(checksum_path(path).read_text())["pages"])
    assert build("full").verified_pages == n and build("sample").verified_pages == min(n, 8)
    picked = sample_pages(1000, 0, path.name)
    assert len(set(picked)) == 8 and picked == sample_pages(1000, 0, path.name) != sample_pages(1000, 1, path.name)
    assert picked[0] == 0 and picked[-1] == 999  # the header/metadata page and the allocation table's, always


def test_beton_without_sidecar_warns_once_and_is_used(digits_beton, tmp_path, caplog):
    path, build = _copy(digits_beton, tmp_path, sidecar=False)
    with caplog.at_level(logging.WARNING, logger="src.data.ffcv_loader"):
        assert build("sample").verified_pages == 0
        assert build("full").verified_pages == 0
    lines = [r.getMessage() for r in caplog.records if "no page checksums" in r.getMessage()]
    assert len(lines) == 1 and str(path) in lines[0], lines


def test_stale_or_torn_sidecar_and_bad_mode_are_one_line(digits_beton, tmp_path):
    """Checksums of another file (another size: the beton was replaced by another writer), a torn sidecar and
    loader.verify=bogus: one line each."""
    path, build = _copy(digits_beton, tmp_path)
    rec = json.loads(checksum_path(path).read_text())
    checksum_path(path).write_text(json.dumps({**rec, "size": rec["size"] + 4096}))
    with pytest.raises(UserError, match=r"describe \d+ bytes: it was changed after it was written; rewrite it"):
        build("sample")
    checksum_path(path).write_text('{"pages": [')
    with pytest.raises(UserError, match=r"FFCV checksum file .*sha256.json is corrupt"):
        build("sample")
    with pytest.raises(UserError, match=r"loader.verify='bogus' is unknown: use one of full, sample, none"):
        build("bogus")


# ------------------------------------------------------------------------- numba's "Exception ignored" noise


def _mlp_folder(folder, seed):
    from src.models import ImageInputs, create_model, save_checkpoint

    torch.manual_seed(seed)
    m = create_model("mlp", ImageInputs(10, 1, [0.3], [0.38], 8), kwargs={"hidden": [8]})
    save_checkpoint(m, folder, {"name": folder.name, "kwargs": {"hidden": [8]},
                                "dataset": {"name": "digits", "image_size": 8, "channels": 1}})
    return folder


@pytest.mark.slow
def test_a_loader_ffcv_run_prints_no_exception_ignored(tmp_path):
    """A valid loader=ffcv transfer run (a train loader and three eval loaders, each JIT-compiled) printed
    several numba "Exception ignored ... KeyError" tracebacks: FFCV drops some of the dispatchers it compiles, and
    their finalizer fails when gc collects them inside the next compilation. They are kept until exit now."""
    import subprocess
    import sys

    from conftest import ROOT

    betons = tmp_path / "betons"
    common = [f"paths.data={tmp_path / 'data'}", f"paths.cache={tmp_path / 'cache'}",
              f"paths.checkpoints={tmp_path / 'ck'}"]
    assert load_script("write_ffcv").main([*common, "--out-dir", str(betons), "--num-workers", "1",
                                           "--page-size-mib", "2"]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    r = subprocess.run([sys.executable, "main_transfer.py", f"teacher={_mlp_folder(tmp_path / 't', 0)}",
                        f"student={_mlp_folder(tmp_path / 's', 1)}", "trainer.max_steps=3", "trainer.device=cpu",
                        "loader=ffcv", f"loader.ffcv_dir={betons}", "loader.num_workers=2",
                        f"hydra.run.dir={tmp_path / 'run'}", *common],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Exception ignored" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert (tmp_path / "run" / "summary.json").is_file()


def test_more_decoding_threads_than_numba_has_are_capped():
    """config/loader/ffcv.yaml's num_workers=8 on a 2-core machine was numba's ValueError traceback ("The number
    of threads must be between 1 and 2") at the first loader: capped to numba's threads, 0 = all of them."""
    from numba import config

    from src.data.ffcv_loader import decoding_threads

    most = int(config.NUMBA_NUM_THREADS)
    assert decoding_threads(most + 6) == most == decoding_threads(0) and decoding_threads(1) == 1


def test_write_ffcv_rewrites_a_beton_whose_pages_do_not_match(digits_beton, tmp_path, capsys):
    """Without --overwrite a whole beton is kept, one with an overwritten page is rewritten (and then opens)."""
    good, cfg, split = digits_beton
    path, build = _copy(digits_beton, tmp_path)
    base = good.parent.parent
    args = [f"paths.data={base / 'data'}", "--splits", "test", "--out-dir", str(tmp_path), "--num-workers", "1",
            "--page-size-mib", "2"]
    assert load_script("write_ffcv").main(args) == 0 and "exists, kept" in capsys.readouterr().out
    ptr, size, _ = _first_image(path)
    with open(path, "r+b") as f:
        f.seek(ptr)
        f.write(b"\xff" * 32)
    assert load_script("write_ffcv").main(args) == 0
    out = capsys.readouterr().out
    assert "exists but is unusable (page " in out and "does not match its checksum" in out, out
    assert build("full").verified_pages >= 2


def test_bad_verify_value_is_refused_before_any_work(digits_beton):
    from src.experiments.preflight import preflight

    cfg = compose("pretrain/pretrain", ["loader=ffcv", "loader.verify=always"])
    with pytest.raises(UserError, match=r"loader.verify='always' is unknown: use one of full, sample, none"):
        preflight(cfg)


def test_benchmark_reports_each_verify_mode_against_an_epoch(digits_beton):
    """scripts/benchmark.py's rows: one per mode, the check's time over one epoch's load through the same loader
    (here a stand-in that yields batches without decoding: the row arithmetic, not FFCV's speed)."""
    import types

    class StandIn:
        path, num_samples = digits_beton[0], 64

        def __len__(self):
            return 8

        def iter_epoch(self, epoch=0):
            for _ in range(8):
                time.sleep(0.002)
                yield torch.zeros(8, 1)

    bench = load_script("benchmark")
    good = digits_beton[0]
    rows = bench.bench_verify(StandIn(), types.SimpleNamespace(repeats=2), torch.device("cpu"))
    assert [r["row"].split()[1] for r in rows] == ["loader.verify=full", "loader.verify=sample", "loader.verify=none"]
    n = len(json.loads(checksum_path(good).read_text())["pages"])
    assert f"({n} pages of" in rows[0]["a"] and "(0 pages of" in rows[2]["a"]
    assert rows[0]["ratio"] > 0 and rows[2]["ratio"] < rows[0]["ratio"]
