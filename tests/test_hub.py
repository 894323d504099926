"""Hub weights offline (issue 22.2): a timm name whose weights are not in the HF cache fails at once in one line
(no 30 s of hub retries); weights in the cache load offline from it."""
from __future__ import annotations

import time

import pytest
import torch

from src.errors import UserError
from src.models import hub
from src.models.factory import create_model
from src.models.protocol import ImageInputs

INFO = ImageInputs(num_classes=1000, channels=3, mean=[0.5] * 3, std=[0.25] * 3, image_size=64)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)  # restored after go_offline
    return tmp_path / "hub"


def _fill(cache, repo: str, state) -> None:
    """The HF cache layout huggingface_hub reads: refs/main -> snapshots/<commit>/model.safetensors."""
    from safetensors.torch import save_file

    root = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snap / "model.safetensors"))


def test_missing_hub_weights_fail_at_once_in_one_line(offline_cache):
    t0 = time.time()
    with pytest.raises(UserError) as e:
        create_model("resnet18", INFO, pretrained=True)
    msg = str(e.value)
    assert time.time() - t0 < 5 and "\n" not in msg
    assert "'resnet18'" in msg and "timm/resnet18.a1_in1k" in msg and str(offline_cache) in msg
    assert "resnet18@/path/to/weights.safetensors" in msg and "huggingface-cli download timm/resnet18.a1_in1k" in msg


def test_cached_hub_weights_load_offline_without_retries(offline_cache):
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("resnet18", num_classes=1000)
    _fill(offline_cache, "timm/resnet18.a1_in1k", ref.state_dict())
    t0 = time.time()
    m = create_model("resnet18", INFO, pretrained=True)
    assert time.time() - t0 < 20
    got = m.net.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())
    assert hub.cached_file("timm/resnet18.a1_in1k").endswith("model.safetensors")
