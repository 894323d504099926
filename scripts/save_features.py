#!/usr/bin/env python
"""Compute and store the pooled penultimate features of AFT's pretrained models (`features=[...]`) on the training
and evaluation splits of the downstream dataset, once, without augmentation (the shared eval transform).

It composes the same config as main_aft.py (config/aft/aft.yaml), so one command line serves both scripts, and it
stores the features through the same function main_aft.py reads them with (`src.experiments.aft.feature_outputs`:
the shared output cache, keyed by model hash + dataset + eval transform + split): no file-name mismatch is
possible, and a model already in the cache is not run again. The cache files are printed and listed in
`<run dir>/features.json`. main_aft.py computes missing features itself; this script is for doing it ahead (e.g.
big timm models on a GPU node before a sweep).

Examples
  python scripts/save_features.py                                   # digits: features=[resnet20, wrn_16_2]
  python scripts/save_features.py features=[wrn_16_2,lenet]
  python scripts/save_features.py --config-name aft/cifar100_vit.yaml paths.data=/data
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402

import src.schema  # noqa: E402,F401  (config schemas and resolvers)
from src.experiments.aft import check_feature_specs, feature_outputs, splits  # noqa: E402
from src.experiments.context import setup  # noqa: E402
from src.experiments.resolve import resolve_model  # noqa: E402
from src.errors import UserError  # noqa: E402
from src.io_utils import write_json  # noqa: E402
from src.tracking import unlock_run_dir  # noqa: E402


def save(cfg, run_dir=None) -> dict:
    """{model: {split: cache file}} for every model of `features` on the training and evaluation splits."""
    specs = check_feature_specs(cfg)  # every name checked before any model is loaded or trained
    if not cfg.get("use_cache", True):
        raise UserError("use_cache=false: this script stores features in the output cache and nothing else; drop "
                        "use_cache=false (main_aft.py use_cache=false computes them without storing)")
    ctx = setup(cfg, run_dir, job_type="save_features", tracker=False)
    try:
        return _save(ctx, cfg, specs)
    finally:
        unlock_run_dir(ctx.run_dir)


def _save(ctx, cfg, specs) -> dict:
    train, evaluation = splits(ctx, cfg)
    from src.tracking.console import columns

    result, lines = {}, []
    for i, spec in enumerate(specs):
        ref = resolve_model(spec, ctx, f"features[{i}]")
        for split in (train, evaluation) if evaluation.name != train.name else (train,):
            out, path = feature_outputs(ctx, ref, split)
            result.setdefault(ref.name, {})[split.name] = str(path) if path is not None else None
            lines.append([ref.name, split.name, tuple(out["features"].shape), path])
        ref.model.cpu()
    print("\n".join(columns(["model", "split", "features", "cache file"], lines)))
    if ctx.rank == 0:
        write_json(ctx.run_dir / "features.json", result)
        print(f"feature cache files listed in {ctx.run_dir / 'features.json'}")
    return result


@hydra.main(version_base="1.3", config_path="../config", config_name="aft/aft")
def main(cfg):
    from src.entry import entry

    return entry(save, cfg)


if __name__ == "__main__":
    main()
