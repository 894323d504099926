"""Text through the families on the real rotten_tomatoes reviews: the zoo (gnosis' LSTM and a small BERT) beats the
majority class, KL+DP routes per sample by id on text, and a weaker text teacher's KL hurts a stronger student
while KL+DP does not (the paper's point, on text)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import compose
from src.batch import Batch
from src.data import build_dataset
from src.experiments import pretrain, transfer
from src.methods.kd import KLDP
from src.errors import UserError
from src.models import create_model, read_meta

MAJORITY = 100 * 7403 / 12808  # fresh: 57.8% of every split


@pytest.fixture(scope="module")
def text_zoo(tmp_path_factory):
    """The zoo's lstm (gnosis' classifier) and bert_tiny, trained once (about 40 s on 2 cores)."""
    base = tmp_path_factory.mktemp("text_zoo")
    paths = [f"paths.checkpoints={base / 'checkpoints'}", f"paths.cache={base / 'cache'}", f"paths.data={base}"]
    for name in ("lstm", "bert_tiny"):
        cfg = compose("pretrain/pretrain", ["dataset=rotten_tomatoes", f"name={name}", *paths])
        pretrain.run(cfg, run_dir=base / f"run_{name}")
    return paths, base / "checkpoints" / "rotten_tomatoes"


@pytest.mark.trained
def test_text_zoo_beats_the_majority_class(text_zoo):
    """Measured on this project's 2-core CPU (zoo draws 0-2, and draw 0 under ATEN_CPU_CAPABILITY=default, fresh
    caches: the tokenizer's ids differ between processes, see README): lstm 65.1-67.1%, bert_tiny 74.3-75.7%,
    against 57.8% for the majority class."""
    _, folder = text_zoo
    acc = {n: read_meta(folder / n)["test_acc"] for n in ("lstm", "bert_tiny")}
    assert acc["lstm"] > MAJORITY + 4, acc
    assert acc["bert_tiny"] > MAJORITY + 12, acc
    assert (folder / "lstm" / "tokenizer" / "tokenizer.json").is_file()


def test_kl_dp_routes_per_sample_by_id_on_text(tmp_path):
    """KL+DP reads both frozen models' outputs from their per-id caches on a batch of raw texts: with cached logits
    where the teacher is the more confident in the true label exactly on even ids, the teacher's share is the
    share of even ids in the batch, and the student's loss has gradients."""
    cfg = compose("transfer/transfer", ["dataset=rotten_tomatoes", f"paths.cache={tmp_path}"])
    ds = build_dataset(cfg.dataset, cfg.paths)
    split = ds.split("transfer")
    n = len(split)
    y = split.labels
    right = torch.nn.functional.one_hot(y, 2).float() * 4
    wrong = torch.nn.functional.one_hot(1 - y, 2).float() * 4
    even = (torch.arange(n) % 2 == 0)[:, None]
    zt = torch.where(even, right, wrong)
    zf = torch.where(even, wrong, right)
    torch.manual_seed(0)
    m = KLDP(create_model("lstm", ds.info), create_model("bert_tiny", ds.info), create_model("lstm", ds.info),
             teacher_cache={"logits": zt}, frozen_student_cache={"logits": zf}).train()
    ids = torch.tensor([0, 1, 2, 4, 7, 9, 10, 12])
    loss, logs = m.loss(Batch([split.texts[i] for i in ids], y[ids], ids))
    assert float(logs["dp_share_teacher"]) == pytest.approx(5 / 8)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.student.parameters())


@pytest.mark.trained
def test_weaker_text_teacher_kl_hurts_and_kl_dp_does_not(text_zoo, tmp_path):
    """lstm (~66%) into bert_tiny (~75%) on the transfer split, 2 epochs. Measured on this project's CPU over zoo
    draws 0-2 and draw 0 under ATEN_CPU_CAPABILITY=default: KL -11.3 .. -14.4 points, KL+DP +0.6 .. +1.5 (at 4
    epochs KL -10.6, KL+DP -0.6; at the default 10, KL -8.9, KL+DP +1.4). A fresh clone's CI run (its own tokenizer:
    WordPiece training is not deterministic across processes, so the zoo differs) gave KL -5.54, KL+DP +0.39, and
    another under ATEN_CPU_CAPABILITY=default KL -8.63, KL+DP -4.84 (student 75.88%, teacher 65.50%): at 2 epochs
    KL+DP does not always keep the student where it was, so the test asserts what held in every draw, that KL hurts
    and KL+DP hurts clearly less (by 3.8 .. 15 points); the 3-seed, 10-epoch result that KL+DP does not hurt
    (+1.41 +- 0.61) is results/rotten_tomatoes/REPORT.md's."""
    paths, _ = text_zoo
    res = {}
    for m in ("kl", "kl_dp"):
        cfg = compose("transfer/transfer", ["dataset=rotten_tomatoes", *paths, f"method={m}", "teacher=lstm",
                                            "student=bert_tiny", "trainer.epochs=2"])
        res[m] = transfer.run(cfg, run_dir=tmp_path / m)
    assert res["kl"]["teacher_acc"] < res["kl"]["student_acc_before"] - 4
    assert res["kl"]["transfer_delta"] < -2.0
    assert res["kl_dp"]["transfer_delta"] > res["kl"]["transfer_delta"] + 2.0
    cache = Path(paths[1].split("=", 1)[1])
    assert list(cache.rglob("*__transfer-3843-*.safetensors"))  # the teacher's outputs, cached by sample id


@pytest.mark.trained
def test_flips_all_pairs_on_text_models(text_zoo, tmp_path):
    from src.experiments import flips

    paths, _ = text_zoo
    cfg = compose("prediction_flips/flips", ["dataset=rotten_tomatoes", *paths, "models=[lstm,bert_tiny]",
                                             "cka=true", "cka_samples=200"])
    s = flips.run(cfg, run_dir=tmp_path)
    assert s["n_models"] == 2 and s["n_pairs"] == 2
    with open(tmp_path / "pairs.csv") as f:
        assert len(f.readlines()) == 1 + 2
    assert s["pos_flips_pct"]["min"] > 1  # models of different architectures disagree both ways on reviews
    for name in ("heatmap_positive_flips", "flips_vs_acc_diff", "per_class_flips"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000


@pytest.mark.trained
def test_multi_teacher_ensemble_of_text_teachers(text_zoo, tmp_path):
    from src.experiments import multi_teacher

    paths, _ = text_zoo
    cfg = compose("multi_teacher/multi_teacher", ["dataset=rotten_tomatoes", *paths, "mode=ensemble",
                                                  "teachers=[lstm,bert_tiny]", "student=lstm", "trainer.epochs=1"])
    s = multi_teacher.run(cfg, run_dir=tmp_path)
    assert s["status"] == "ok" and 50 < s["student_acc_after"] <= 100
    assert (tmp_path / "student" / "tokenizer" / "tokenizer.json").is_file()


def test_fidelity_text_preset_composes_and_mixup_is_refused(text_paths_fidelity):
    from src.methods.build import check_modality, method_class

    cfg = compose("transfer/fidelity_text", text_paths_fidelity)
    assert (cfg.dataset.name, cfg.zoo.name, cfg.dataset.transfer_split) == ("rotten_tomatoes", "rotten_tomatoes",
                                                                             "train")
    assert {"lstm", "lstm_b", "lstm_c"} <= set(cfg.zoo.models) and cfg.student.arch == "lstm"
    check_modality(method_class(cfg.method), cfg.method, "method", "text")  # plain data: KL handles text
    mixed = compose("transfer/fidelity_text", [*text_paths_fidelity, "distill_data=mixup"])
    with pytest.raises(UserError, match="mixup_alpha=1.0 mixes images, which text inputs are not"):
        check_modality(method_class(mixed.method), mixed.method, "method", "text")


@pytest.fixture
def text_paths_fidelity(tmp_path):
    return [f"paths.checkpoints={tmp_path / 'ck'}", f"paths.cache={tmp_path / 'cache'}"]


@pytest.mark.trained
def test_an_image_model_on_text_and_a_text_model_on_images_are_one_line(text_zoo, tmp_path):
    paths, folder = text_zoo
    cfg = compose("transfer/transfer", ["dataset=rotten_tomatoes", *paths, "teacher=lstm", "student=resnet8"])
    with pytest.raises(UserError, match="'resnet8' is not a text model"):
        transfer.run(cfg, run_dir=tmp_path / "a")
    cfg = compose("transfer/transfer", [*paths, f"teacher={folder / 'lstm'}", "student=resnet8"])
    with pytest.raises(UserError, match="is a text model \\(lstm\\) but the dataset is image"):
        transfer.run(cfg, run_dir=tmp_path / "b")


@pytest.mark.trained
def test_aft_on_text_caches_the_feature_models_features_and_reads_them_back(text_zoo, tmp_path):
    """main_aft.py on rotten_tomatoes: a text downstream model (the lstm) learns from a text "foundation" model's
    pooled features (bert_tiny), cached by the shared output cache on the training split; a second run reads the
    same table back instead of recomputing it, and lands on the same weights."""
    from src.experiments import aft

    paths, _ = text_zoo
    args = ["dataset=rotten_tomatoes", "student=lstm", "features=[bert_tiny]", "trainer.max_steps=30",
            "trainer.eval_every_steps=30", *paths]
    first = aft.run(compose("aft/aft", args), run_dir=tmp_path / "a")
    assert first["feature_dims"] == [32] and first["train_split"] == "transfer"  # bert_tiny: hidden 32
    cached = [Path(p) for p in first["feature_cache"]]
    assert cached and all(p.is_file() for p in cached)
    stamp = [p.stat().st_mtime_ns for p in cached]
    second = aft.run(compose("aft/aft", args), run_dir=tmp_path / "b")
    assert [p.stat().st_mtime_ns for p in cached] == stamp  # read back, not rewritten
    assert second["student_acc_after"] == first["student_acc_after"]
    assert 50 < first["student_acc_after"] <= 100 and first["method_choice"] == "aft"
