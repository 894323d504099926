"""Seeds as an axis: `zoo.seed=k` is another draw of the whole zoo (every entry's seed + 1000 k, its own folder),
`trainer.seed` seeds every family, and each summary records both."""
from __future__ import annotations

import json

import pytest

from conftest import compose


@pytest.mark.trained
def test_zoo_seed_is_another_draw_in_its_own_folder(kt_paths, tmp_path):
    from src.experiments import pretrain

    ck = tmp_path / "ck"
    paths = [f"paths.checkpoints={ck}", f"paths.cache={tmp_path / 'cache'}", kt_paths[2]]
    common = ["name=mlp_small", "zoo.models.mlp_small.epochs=1", *paths]
    s0 = pretrain.run(compose("pretrain/pretrain", common), run_dir=tmp_path / "r0")
    s1 = pretrain.run(compose("pretrain/pretrain", [*common, "zoo.seed=1"]), run_dir=tmp_path / "r1")
    m0 = json.loads((ck / "digits" / "mlp_small" / "meta.json").read_text())
    m1 = json.loads((ck / "digits" / "zoo_seed1" / "mlp_small" / "meta.json").read_text())
    assert m0["recipe"]["seed"] == 1 and m1["recipe"]["seed"] == 1001  # the entry's own seed, + 1000 per draw
    assert m0["zoo_seed"] == 0 and m1["zoo_seed"] == 1
    assert m0["hash"] != m1["hash"]  # another initialisation and data order: other weights
    assert s0["zoo_seed"] == 0 and s1["zoo_seed"] == 1 and s1["family"] == "pretrain"
    assert s1["models"]["mlp_small"]["path"].endswith("zoo_seed1/mlp_small")


def test_every_family_config_has_a_trainer_seed_and_the_zoo_a_seed():
    for name in ("pretrain/pretrain", "transfer/transfer", "prediction_flips/flips", "multi_teacher/multi_teacher",
                 "aft/aft", "kdep/kdep", "zeroshot/zeroshot"):
        cfg = compose(name, ["trainer.seed=3", "zoo.seed=2"])
        assert cfg.trainer.seed == 3 and cfg.zoo.seed == 2, name
