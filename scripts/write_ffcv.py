#!/usr/bin/env python
"""Write FFCV .beton files for loader=ffcv from any dataset of the suite.

The dataset is built exactly as the experiments build it: the suite's configs are composed with Hydra (the
`pretrain/pretrain` primary config by default, with loader=ffcv) and the positional `key=value` overrides you give,
so `dataset=...`, `dataset.root=...`, `paths.data=...`, `dataset.splits=...` mean what they mean on the command line
of main_*.py. One file per split is written to `<out-dir>/<dataset name>_<split>.beton` with three fields:
`image` (RGB; 1-channel data is stored as 3 equal channels and averaged back by the loader), `label` and `index`
(the split's sample ids, so subsets and caches line up with the other loaders).

Examples
  python scripts/write_ffcv.py                                   # digits, every split, raw pixels
  python scripts/write_ffcv.py dataset=cifar10 paths.data=/data  # CIFAR-10 train/val/test, raw pixels
  python scripts/write_ffcv.py dataset=imagenet paths.data=/data --splits train test \\
      --max-res 256 --write-mode proportion --compress-probability 0.5 --jpeg-quality 90 --num-workers 16
  python scripts/write_ffcv.py dataset=imagefolder dataset.root=/data/pets dataset.num_classes=37 --max-res 512

Storage (--write-mode): raw = uint8 pixels (exact, large); jpg = every image JPEG-compressed; proportion = a random
--compress-probability share JPEG-compressed, the rest raw (FFCV's ImageNet setting: --max-res 256 or 512,
--jpeg-quality 90, --compress-probability 0.5); smart = JPEG only when raw is larger than --smart-threshold bytes.
auto (default) = raw for in-memory datasets (digits, CIFAR), proportion for image folders.
--max-res resizes images whose longest side is larger (FFCV's convention); in-memory datasets are stored at
dataset.image_size.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from src.cli import (ArgumentParser, in_range_float, int_in_range, non_negative_int, positive_int,  # noqa: E402
                     run_script)


def parse_args(argv=None):
    p = ArgumentParser(
        prog="write_ffcv.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="Hydra overrides of the composed config, e.g. dataset=cifar10 paths.data=/data")
    p.add_argument("--config-name", default="pretrain/pretrain",
                   help="primary config to compose (default: %(default)s)")
    p.add_argument("--splits", nargs="+", default=None,
                   help="splits to write (default: every split of the dataset, e.g. train val test)")
    p.add_argument("--out-dir", default=None,
                   help="output folder (default: loader.ffcv_dir of loader=ffcv, i.e. <paths.data>/ffcv)")
    p.add_argument("--write-mode", default="auto", choices=["auto", "raw", "jpg", "proportion", "smart"],
                   help="image storage, see above (default: %(default)s)")
    p.add_argument("--max-res", type=positive_int(256), default=None,
                   help="longest image side stored, larger images are resized (e.g. 256 or 512; default: keep)")
    p.add_argument("--jpeg-quality", type=int_in_range(1, 100), default=90,
                   help="JPEG quality 1-100 (default: %(default)s)")
    p.add_argument("--compress-probability", type=in_range_float(0, 1), default=0.5,
                   help="share of JPEG-compressed images with --write-mode proportion (default: %(default)s)")
    p.add_argument("--smart-threshold", type=non_negative_int(65536), default=None,
                   help="--write-mode smart: JPEG-compress images whose raw size exceeds this many bytes")
    p.add_argument("--num-workers", type=positive_int(), default=4,
                   help="writer processes (default: %(default)s)")
    p.add_argument("--page-size-mib", type=int_in_range(2), default=8,
                   help="FFCV page size in MiB, a power of two >= 2 holding the largest stored image; every writer "
                        "process fills its own pages, so small datasets take about num-workers x page size "
                        "(default: %(default)s)")
    p.add_argument("--chunksize", type=positive_int(), default=100,
                   help="samples per worker task (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of --write-mode proportion (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="rewrite files that already exist (damaged ones, e.g. truncated, are always rewritten)")
    # key=value overrides may come anywhere, also after the options (as the loader's error messages suggest:
    # `... --overwrite paths.data=/data`); ones caught by --splits' nargs are moved back
    args = p.parse_intermixed_args(argv)
    if args.splits:
        args.overrides += [s for s in args.splits if "=" in s]
        args.splits = [s for s in args.splits if "=" not in s] or None
    if args.page_size_mib & (args.page_size_mib - 1):
        p.error(f"argument --page-size-mib: {args.page_size_mib} must be a power of two >= 2 (use e.g. "
                f"--page-size-mib 8)")
    if (args.write_mode == "smart") != (args.smart_threshold is not None):
        p.error("argument --write-mode: smart needs --smart-threshold <bytes> (use e.g. --write-mode smart "
                "--smart-threshold 65536)" if args.write_mode == "smart" else
                f"argument --smart-threshold: {args.smart_threshold} is only used with --write-mode smart (got "
                f"--write-mode {args.write_mode}): add --write-mode smart or drop --smart-threshold")
    return args


def compose_config(config_name: str, overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import src.schema  # noqa: F401  (registers the typed schemas)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base="1.3"):
        return compose(config_name=config_name, overrides=["loader=ffcv", *overrides])


@run_script
def main(argv=None) -> int:
    args = parse_args(argv)
    from src.data import build_dataset
    from src.data.ffcv_loader import beton_damage, beton_path, verify_beton, write_beton
    from src.errors import UserError, check

    cfg = compose_config(args.config_name, args.overrides)
    ds = build_dataset(cfg.dataset, cfg.paths)
    names = args.splits or sorted(ds.splits)
    splits = [ds.split(n) for n in names]  # UserError for an unknown name, before anything is written
    empty = [sp.name for sp in splits if len(sp) == 0]
    check(not empty, f"split(s) {', '.join(empty)} of {ds.info.name} hold no samples (nothing was written): give "
                     f"--splits without them, or fix the dataset's splits (dataset.splits / dataset.val_fraction)")
    out_dir = args.out_dir if args.out_dir is not None else cfg.loader.ffcv_dir
    check(out_dir is not None, "loader.ffcv_dir is null: give --out-dir <folder> or loader.ffcv_dir=<folder>")
    from src.io_utils import ensure_dir, remove_stale_temps

    ensure_dir(out_dir, "--out-dir" if args.out_dir is not None else "loader.ffcv_dir")  # below a file: one line, now
    remove_stale_temps(out_dir)  # the partial beton of a killed write (its writer's pid is dead)
    for split in splits:
        path = beton_path(out_dir, ds.info.name, split.name, ds.info.source)
        if path.exists() and not args.overwrite:
            try:  # a damaged file (an interrupted copy, a full disk, overwritten pages) holds nothing worth keeping
                damage = beton_damage(path) if path.is_file() else None
                if damage is None and path.is_file():
                    verify_beton(path, "full", 0, "rewrite it with --overwrite")  # every page, against its checksums
            except OSError as e:
                damage = f"unreadable: {e.strerror or type(e).__name__}"
            except UserError as e:
                damage = str(e).split(": ", 1)[-1].split(";")[0]
            if damage is None:
                print(f"{path} exists, kept (--overwrite rewrites it)")
                continue
            print(f"{path} exists but is unusable ({damage}): rewriting it", flush=True)
        mode = args.write_mode
        if mode == "auto":
            mode = "raw" if split.images is not None else "proportion"
        t0 = time.time()
        print(f"writing {path}: {len(split)} samples, write_mode={mode}, max_res={args.max_res}", flush=True)
        write_beton(split, path, write_mode=mode, max_resolution=args.max_res, jpeg_quality=args.jpeg_quality,
                    compress_probability=args.compress_probability, smart_threshold=args.smart_threshold,
                    num_workers=args.num_workers, chunksize=args.chunksize, seed=args.seed,
                    page_size_mib=args.page_size_mib)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) in {time.time() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    from src.entry import entry

    sys.exit(entry(lambda _cfg: main(), None) or 0)
