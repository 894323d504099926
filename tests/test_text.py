"""Text as a modality, without training: the two offline text datasets (splits, stratification, tokenizer), the text
loader, the text models of every architecture through `create_model`, their checkpoints, and the one-line refusals."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from conftest import compose
from src.data import build_dataset, build_loader
from src.errors import UserError
from src.models import ImageInputs, create_model, load_checkpoint, save_checkpoint
from src.models.protocol import TextInputs, TransferModel

ARCHS = ["lstm", "bilstm", "bert_tiny", "gpt2_tiny"]


@pytest.fixture(scope="module")
def text_paths(tmp_path_factory):
    base = tmp_path_factory.mktemp("text")
    return [f"paths.checkpoints={base / 'checkpoints'}", f"paths.cache={base / 'cache'}", f"paths.data={base}"]


def _cfg(text_paths, *overrides):
    return compose("transfer/transfer", ["dataset=rotten_tomatoes", *text_paths, *overrides])


@pytest.fixture(scope="module")
def rt(text_paths):
    cfg = _cfg(text_paths)
    return cfg, build_dataset(cfg.dataset, cfg.paths)


def test_rotten_tomatoes_splits_are_stratified_and_seeded(rt, text_paths):
    cfg, ds = rt
    assert ds.info.modality == "text" and ds.info.classes == ["rotten", "fresh"]
    sizes = {k: len(v) for k, v in ds.splits.items()}
    assert sum(sizes.values()) == 7403 + 5405  # the plot rows are dropped
    for name, frac in cfg.dataset.splits.items():
        assert abs(sizes[name] - frac * 12808) <= 2
        s = ds.split(name)
        assert abs(s.labels.float().mean().item() - 7403 / 12808) < 1e-3  # the same share of fresh in every split
        assert len(s.texts) == len(s) and all(isinstance(t, str) and t for t in s.texts)
        assert torch.equal(s.ids, torch.arange(len(s)))
    again = build_dataset(cfg.dataset, cfg.paths).split("train")
    assert again.texts == ds.split("train").texts
    other = build_dataset(_cfg(text_paths, "dataset.split_seed=1").dataset, cfg.paths).split("train")
    assert other.texts != ds.split("train").texts
    sub = ds.split("test").select(torch.tensor([3, 1]))
    assert sub.texts == [ds.split("test").texts[3], ds.split("test").texts[1]]


def test_sms_spam_builds_and_picks_its_zoo(text_paths):
    cfg = compose("transfer/transfer", ["dataset=sms_spam", *text_paths])
    assert cfg.zoo.name == "sms_spam"
    assert compose("transfer/transfer", ["dataset=sms_spam", "zoo=digits", *text_paths]).zoo.name == "digits"
    assert compose("transfer/transfer", list(text_paths)).zoo.name == "digits"
    ds = build_dataset(cfg.dataset, cfg.paths)
    assert ds.info.classes == ["ham", "spam"]
    n = sum(len(s) for s in ds.splits.values())
    spam = sum(int(s.labels.sum()) for s in ds.splits.values())
    assert (n, spam) == (4837, 638)


def test_tokenizer_is_cached_and_loads_with_autotokenizer(rt, text_paths):
    from transformers import AutoTokenizer

    cfg, ds = rt
    folder = Path(ds.info.tokenizer)
    assert folder.parent == Path(cfg.paths.cache) / "tokenizers"
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert 1000 < len(tok) <= 8000
    assert [tok.pad_token, tok.cls_token, tok.sep_token, tok.unk_token, tok.mask_token] == \
        ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    ids = tok("A Great movie")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and tok.unk_token_id not in ids
    mtime = (folder / "tokenizer.json").stat().st_mtime_ns
    assert build_dataset(cfg.dataset, cfg.paths).info.tokenizer == str(folder)
    assert (folder / "tokenizer.json").stat().st_mtime_ns == mtime  # found in the cache, not retrained
    small = build_dataset(_cfg(text_paths, "dataset.text.vocab_size=500").dataset, cfg.paths).info.tokenizer
    assert small != str(folder) and len(AutoTokenizer.from_pretrained(small)) <= 500


def test_text_loader_yields_raw_texts_by_id_seeded_and_resumable(rt):
    cfg, ds = rt
    split = ds.split("val")
    ld = build_loader(cfg.loader, split, train=True, seed=3, device="cpu")
    assert not ld.augmented and len(ld) == -(-len(split) // cfg.loader.batch_size)
    batches = list(ld.iter_epoch(1))
    b = batches[0]
    assert isinstance(b.inputs, list) and len(b) == len(b.inputs) == cfg.loader.batch_size
    assert all(split.texts[i] == t for i, t in zip(b.ids.tolist(), b.inputs))
    assert torch.equal(b.targets, split.labels[b.ids])
    seen = torch.cat([x.ids for x in batches])
    assert torch.equal(seen.sort().values, torch.arange(len(split)))
    assert [x.inputs for x in ld.iter_epoch(1, start_batch=2)] == [x.inputs for x in batches[2:]]
    assert batches[0].inputs != next(ld.iter_epoch(2)).inputs  # another epoch, another order
    ev = next(build_loader(cfg.loader, split, train=False, device="cpu").iter_epoch(0))
    assert ev.inputs == split.texts[:len(ev)]  # eval: in order


@pytest.mark.parametrize("arch", ARCHS)
def test_text_models_implement_the_protocol(rt, arch):
    _, ds = rt
    torch.manual_seed(0)
    m = create_model(arch, ds.info).eval()
    assert isinstance(m, TransferModel) and m.arch == arch and m.num_classes == 2
    texts = ds.split("test").texts[:5]
    with torch.no_grad():
        z = m(texts)
        f, z2 = m.features_and_logits(texts)
        layers = m.intermediates(texts)
        z3, layers2 = m.logits_and_intermediates(texts)
    assert z.shape == (5, 2) and f.shape == (5, m.num_features)
    assert torch.allclose(z, z2, atol=1e-5) and torch.allclose(z, z3, atol=1e-5)
    assert torch.allclose(m.classifier(f), z, atol=1e-5)
    assert len(layers) >= 1 and all(x.shape[0] == 5 for x in layers) and len(layers2) == len(layers)
    with torch.no_grad():  # a text's logits do not depend on the batch it is padded in
        assert torch.allclose(m(texts[:1]), z[:1], atol=1e-4)
    m.reset_classifier(3)
    assert m(texts).shape == (5, 3)
    with pytest.raises(UserError, match="image-only"):
        m.normalize(texts)


def test_token_table_memoises_and_truncation_is_said_once(rt, caplog):
    _, ds = rt
    m = create_model("lstm", ds.info, kwargs={"max_length": 8})
    long = [" ".join(["wonderful"] * 50), " ".join(["awful film"] * 30)]
    with caplog.at_level(logging.WARNING, logger="src.models.text"):
        ids, mask = m.encode(long)
        m.encode(long[::-1] + ["a third long text " * 5])
    assert ids.shape == (2, 8) and bool(mask.all())
    assert sum("truncated" in r.getMessage() for r in caplog.records) == 1
    assert set(m._table) == {*long, "a third long text " * 5}


def test_checkpoint_round_trip_carries_its_tokenizer(rt, tmp_path):
    _, ds = rt
    torch.manual_seed(1)
    m = create_model("gpt2_tiny", ds.info).eval()
    save_checkpoint(m, tmp_path / "ck", {"name": "g", "kwargs": {}})
    assert (tmp_path / "ck" / "tokenizer" / "tokenizer.json").is_file()
    back, meta = load_checkpoint(tmp_path / "ck", 2, expect_modality="text")
    texts = ds.split("test").texts[:4]
    with torch.no_grad():
        assert torch.allclose(back.eval()(texts), m(texts), atol=1e-5)
    assert meta["modality"] == "text"
    with pytest.raises(UserError, match="is a text model .* the dataset is image"):
        load_checkpoint(tmp_path / "ck", 2, expect_modality="image")


def test_a_tokenizer_of_another_vocabulary_is_one_line(rt, text_paths, tmp_path):
    import shutil

    cfg, ds = rt
    m = create_model("lstm", ds.info)
    save_checkpoint(m, tmp_path / "ck", {"name": "l", "kwargs": {}})
    small = build_dataset(_cfg(text_paths, "dataset.text.vocab_size=500").dataset, cfg.paths).info.tokenizer
    shutil.rmtree(tmp_path / "ck" / "tokenizer")
    shutil.copytree(small, tmp_path / "ck" / "tokenizer")
    with pytest.raises(UserError, match=r"embedding 'encoder.embed.weight' has \d+ rows but the tokenizer .* "
                                        r"vocabulary of \d+"):
        load_checkpoint(tmp_path / "ck", 2)


def test_models_and_datasets_of_other_modalities_are_refused(rt):
    _, ds = rt
    with pytest.raises(UserError, match="'resnet8' is not a text model .* is text"):
        create_model("resnet8", ds.info)
    with pytest.raises(UserError, match="'lstm' is a text model but the dataset is image"):
        create_model("lstm", ImageInputs(10, 1, [0.5], [0.5], 8))
    m = create_model("lstm", ds.info)
    with pytest.raises(UserError, match="reads a list of raw texts but got images"):
        m(torch.rand(2, 1, 8, 8))
    with pytest.raises(UserError, match="empty text"):
        m(["fine", "  "])
    with pytest.raises(UserError, match="no argument hidden"):
        create_model("lstm", ds.info, kwargs={"hidden": 3})


def test_bad_text_files_are_one_line(rt, text_paths, tmp_path):
    cfg, _ = rt
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("category,text\nfresh,caf\xe9 au lait\n".encode("latin1"))
    with pytest.raises(UserError, match="is not UTF-8 .*iconv"):
        build_dataset(_cfg(text_paths, f"dataset.root={bad}").dataset, cfg.paths)
    empty = tmp_path / "empty.csv"
    empty.write_text("category,text\nfresh,good\nrotten,\"  \"\n", encoding="utf-8")
    with pytest.raises(UserError, match="row 2 has an empty text"):
        build_dataset(_cfg(text_paths, f"dataset.root={empty}").dataset, cfg.paths)


def test_hf_models_load_from_a_folder_and_a_missing_name_is_one_line(rt, tmp_path, monkeypatch):
    import time

    from transformers import BertConfig, BertModel

    _, ds = rt
    folder = tmp_path / "hf_bert"
    BertModel(BertConfig(vocab_size=len(create_model("lstm", ds.info).tokenizer), hidden_size=16,
                         num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(folder)
    create_model("lstm", ds.info).tokenizer.save_pretrained(str(folder))
    from src.models.spec import ModelSpec

    spec = ModelSpec.parse(str(folder))  # a transformers folder (config.json, no meta.json) is the hf kind
    assert (spec.kind, spec.arch) == ("hf", f"hf:{folder}") and ModelSpec.parse("hf:gpt2").kind == "hf"
    m = create_model(f"hf:{folder}", TextInputs(2))
    assert m.num_features == 16 and m(ds.split("test").texts[:3]).shape == (3, 2)
    save_checkpoint(m, tmp_path / "ck", {"name": "hf", "kwargs": {}})
    back, _ = load_checkpoint(tmp_path / "ck", 2)  # rebuilt from its hf_config/ and tokenizer/, no hub
    with torch.no_grad():
        assert torch.allclose(back.eval()(ds.split("test").texts[:3]), m.eval()(ds.split("test").texts[:3]),
                              atol=1e-5)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    t = time.time()
    with pytest.raises(UserError, match="'prajjwal1/bert-small' is not in the HF cache .*empty_cache"):
        create_model("hf:prajjwal1/bert-small", TextInputs(2))
    assert time.time() - t < 5


def test_the_aft_nlp_gpu_preset_composes():
    """config/aft/rotten_tomatoes_bert.yaml: the paper's NLP recipe (composition only: no LM weights here)."""
    import subprocess
    import sys

    from conftest import ROOT

    cfg = compose("aft/rotten_tomatoes_bert")
    assert cfg.dataset.name == "rotten_tomatoes" and cfg.zoo.name == "rotten_tomatoes"
    assert cfg.student == "hf:prajjwal1/bert-small" and list(cfg.features) == ["hf:gpt2"]
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.trainer.max_steps, cfg.loader.batch_size) == \
        ("adam", 1e-4, 5000, 128)
    res = subprocess.run([sys.executable, "main_aft.py", "--config-name", "aft/rotten_tomatoes_bert.yaml", "--cfg",
                          "job"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "student: hf:prajjwal1/bert-small" in res.stdout, res.stderr[-2000:]
