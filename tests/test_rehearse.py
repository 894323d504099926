"""The full-scale presets rehearsed on CPU (issue 22): each at its real resolution and architectures for 2 steps on
small data in the real on-disk formats (an ImageNet-shaped ImageFolder of JPEGs, CIFAR pickles) with random-init
weights of the real architectures saved locally; each row asserts image size, normalisation, head, subset,
augmentation and evaluation split (scripts/rehearse.py `check`)."""
from __future__ import annotations

import pytest

from conftest import load_script

rehearse = load_script("rehearse")
pytestmark = pytest.mark.rehearse


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("rehearsal")
    return out, rehearse.write_data(out)


def test_the_rehearsal_data_is_in_the_real_formats(rehearsal):
    from src.data.datasets import load_image

    out, paths = rehearsal
    train = sorted((paths["data"] / "imagenet" / "train").iterdir())
    assert [p.name for p in train] == rehearse.WNIDS
    jpeg = next(train[0].glob("*.JPEG"))
    assert jpeg.read_bytes()[:2] == b"\xff\xd8" and load_image(str(jpeg), 3, 224).shape == (3, 224, 224)
    assert (paths["data"] / "cifar10" / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert (paths["data"] / "cifar100" / "cifar-100-python" / "meta").is_file()
    from safetensors import safe_open

    with safe_open(str(paths["weights"] / "dinov2.safetensors"), "pt") as f:  # hub-shaped: no head, 518 px table
        keys = set(f.keys())
        assert "head.weight" not in keys and f.get_tensor("pos_embed").shape[1] == 1 + (518 // 14) ** 2


@pytest.mark.parametrize("name", [r.name for r in rehearse.ROWS])
def test_preset_rehearsal(rehearsal, name):
    out, paths = rehearsal
    row = next(r for r in rehearse.ROWS if r.name == name)
    res = rehearse.run_row(row, paths, out)
    log = out / "logs" / f"{name}.txt"
    assert res["rc"] == 0, f"{res['problems']}\n{log.read_text() if log.is_file() else ''}"
    assert res["sizes"] == [f"{row.size}x{row.size}"]
    print(rehearse.table([res]))
