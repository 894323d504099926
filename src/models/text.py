"""Text classifiers of the `TransferModel` protocol (protocol.py): raw texts in, logits / pooled features out. A text
model tokenises for itself (its own tokenizer, a memoised token table), so models with different vocabularies read
the same batch of strings (../shared/DESIGN.md, "Modalities and tasks").

Architectures (`arch`):
- `lstm` / `bilstm`: gnosis' LSTM text classifier (docs/REFERENCE.md §5.9): embedding 128 -> LSTM, cell 70, the
  final hidden state (both directions' for bilstm) -> linear head; `lstm` 1 layer, `bilstm` 1 layer bidirectional (gnosis trains its IMDB teachers with
  num_layers=2: kwargs);
- `bert_{tiny,mini,small}`: a `transformers.BertModel` from a small `BertConfig`, pooled at [CLS] (or `mean`);
- `gpt2_{tiny,mini,small}`: a `transformers.GPT2Model` from a small `GPT2Config`, pooled at the last non-pad token;
- `hf:<hub name>` or a local folder holding config.json: `AutoModel` + `AutoTokenizer` of real weights, read only
  from a local folder or the HF cache (nothing is downloaded: a missing name is one line at once).
The small ones use the dataset's tokenizer (`inputs.tokenizer`, trained on its train split by src/data/text.py);
a checkpoint folder carries its own (`<folder>/tokenizer/`, and `<folder>/hf_config/` for an `hf:` model)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import UserError, check, closest
from ..io_utils import load_state_dict

log = logging.getLogger(__name__)

# arch -> (kind, defaults); kwargs override any default
TEXT_ARCHS: Dict[str, Tuple[str, dict]] = {
    "lstm": ("lstm", {"embedding_size": 128, "hidden_size": 70, "num_layers": 1, "bidirectional": False}),
    "bilstm": ("lstm", {"embedding_size": 128, "hidden_size": 70, "num_layers": 1, "bidirectional": True}),
    "bert_tiny": ("bert", {"hidden_size": 32, "num_layers": 1, "num_heads": 2}),
    "bert_mini": ("bert", {"hidden_size": 64, "num_layers": 2, "num_heads": 2}),
    "bert_small": ("bert", {"hidden_size": 128, "num_layers": 2, "num_heads": 4}),
    "gpt2_tiny": ("gpt2", {"hidden_size": 32, "num_layers": 1, "num_heads": 2}),
    "gpt2_mini": ("gpt2", {"hidden_size": 64, "num_layers": 2, "num_heads": 2}),
    "gpt2_small": ("gpt2", {"hidden_size": 128, "num_layers": 2, "num_heads": 4}),
}
COMMON = {"dropout": 0.1, "max_length": 128, "pooling": None}
KWARGS = {"lstm": {"embedding_size", "hidden_size", "num_layers", "bidirectional"},
          "bert": {"hidden_size", "num_layers", "num_heads"}, "gpt2": {"hidden_size", "num_layers", "num_heads"},
          "hf": set()}
POOLINGS = ("cls", "mean", "last")


def is_text_arch(arch: str) -> bool:
    """Whether `arch` names a text model (one of TEXT_ARCHS or hf:<name>); an image model factory refuses these."""
    return str(arch) in TEXT_ARCHS or str(arch).startswith("hf:")


def _pool(h: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, D) hidden states -> (B, D): the first token, the masked mean, or the last non-pad token."""
    if how == "cls":
        return h[:, 0]
    if how == "last":
        last = mask.long().sum(1).clamp(min=1) - 1
        return h[torch.arange(h.shape[0], device=h.device), last]
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1)


class LSTMEncoder(nn.Module):
    """gnosis' text encoder: embedding -> (bi)LSTM over the packed sequence -> the last layer's final hidden
    state(s) (concatenated over directions). `intermediates`: every layer's final hidden state(s)."""

    def __init__(self, vocab_size: int, pad_id: int, embedding_size: int, hidden_size: int, num_layers: int,
                 bidirectional: bool, dropout: float):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embedding_size, padding_idx=pad_id)
        self.lstm = nn.LSTM(embedding_size, hidden_size, num_layers, batch_first=True, bidirectional=bidirectional,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.dirs, self.layers = 2 if bidirectional else 1, num_layers
        self.width = hidden_size * self.dirs

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, all_layers: bool = False):
        lengths = mask.long().sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(ids), lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)  # (layers * dirs, B, H)
        per_layer = [h[i * self.dirs:(i + 1) * self.dirs].transpose(0, 1).reshape(h.shape[1], -1)
                     for i in range(self.layers)]
        return per_layer[-1], (per_layer if all_layers else None)


class HFEncoder(nn.Module):
    """A transformers backbone (BertModel, GPT2Model, AutoModel) pooled over its last hidden states; intermediates
    pool every hidden state (embeddings, then each layer) the same way."""

    def __init__(self, model: nn.Module, pooling: str):
        super().__init__()
        self.model, self.pooling = model, pooling
        self.width = int(model.config.hidden_size)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, all_layers: bool = False):
        out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=all_layers)
        feats = _pool(out.last_hidden_state, mask, self.pooling)
        layers = [_pool(h, mask, self.pooling) for h in out.hidden_states] if all_layers else None
        return feats, layers


class TextModel(nn.Module):
    """encoder + linear head behind its own tokenizer. forward(list of str) -> logits; see protocol.py."""

    modality = "text"

    def __init__(self, encoder: nn.Module, tokenizer, tokenizer_dir: str, num_classes: int, arch: str,
                 max_length: int, pretrained_tag: str = "", hf_config=None):
        super().__init__()
        self.encoder, self.arch, self.max_length = encoder, arch, int(max_length)
        self.tokenizer, self.tokenizer_dir, self.hf_config = tokenizer, str(tokenizer_dir), hf_config
        self.pad_id = int(tokenizer.pad_token_id)
        self._tag = pretrained_tag
        self.head = nn.Linear(encoder.width, num_classes) if num_classes else nn.Identity()
        self._k = int(num_classes)
        self._table: Dict[str, List[int]] = {}  # text -> token ids (truncated): an epoch tokenises nothing twice
        self._said_truncated = False

    # ------------------------------------------------------------------ protocol: head and shape
    @property
    def num_classes(self) -> int:
        return self._k

    @property
    def num_features(self) -> int:
        return int(self.encoder.width)

    @property
    def classifier(self) -> nn.Module:
        return self.head

    @property
    def pretrained_tag(self) -> str:
        return self._tag

    @property
    def has_intermediates(self) -> bool:
        return True

    def get_classifier(self) -> nn.Module:  # what load_weights asks of a net to find its head's keys
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        dev = next(self.encoder.parameters()).device
        self.head = (nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()).to(dev)
        self._k = int(num_classes)

    def freeze_backbone(self) -> "TextModel":
        """Linear probe: everything in eval mode and frozen but the head."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        for p in self.head.parameters():
            p.requires_grad_(True)
        return self

    # ------------------------------------------------------------------ tokenising
    def _tokenise(self, texts: List[str]) -> None:
        new = [t for t in dict.fromkeys(texts) if t not in self._table]
        if not new:
            return
        for t in new:
            check(bool(t.strip()), f"text model '{self.arch}' got an empty text (a batch's sample {texts.index(t)}):"
                                   f" remove empty texts from the data")
        ids = self.tokenizer(new, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        longest = max(len(x) for x in ids)
        if longest > self.max_length and not self._said_truncated:
            self._said_truncated = True
            log.warning("text model '%s': texts longer than its %d positions (up to %d tokens) are truncated "
                        "(said once)", self.arch, self.max_length, longest)
        for t, x in zip(new, ids):
            self._table[t] = list(x[:self.max_length])

    def encode(self, texts: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of a batch of raw texts, padded to its longest, on the model's device."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or \
                not all(isinstance(t, str) for t in texts):
            from ..batch import is_image

            what = "images" if is_image(texts) else type(texts).__name__
            raise UserError(f"text model '{self.arch}' reads a list of raw texts but got {what}: use it with a text "
                            f"dataset (dataset=rotten_tomatoes or sms_spam)")
        texts = list(texts)
        self._tokenise(texts)
        rows = [self._table[t] for t in texts]
        n = max(len(r) for r in rows)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        dev = self.head.weight.device if isinstance(self.head, nn.Linear) else next(self.parameters()).device
        return ids.to(dev), mask.to(dev)

    # ------------------------------------------------------------------ protocol: outputs
    def features(self, texts) -> torch.Tensor:
        return self.encoder(*self.encode(texts))[0]

    def forward(self, texts) -> torch.Tensor:
        return self.head(self.features(texts))

    def features_and_logits(self, texts) -> Tuple[torch.Tensor, torch.Tensor]:
        f = self.features(texts)
        return f, self.head(f)

    def intermediates(self, texts) -> List[torch.Tensor]:
        return self.encoder(*self.encode(texts), all_layers=True)[1]

    def logits_and_intermediates(self, texts) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        f, layers = self.encoder(*self.encode(texts), all_layers=True)
        return self.head(f), layers

    def _no_input_space(self, *_):
        raise UserError(f"text model '{self.arch}' has no continuous input space (normalize / forward_normalized): "
                        f"input-gradient methods (transition curves) are image-only; use an image dataset")

    normalize = denormalize = forward_normalized = _no_input_space

    def save_extras(self, folder: Path) -> None:
        """What makes a checkpoint folder self-contained: the tokenizer (and an hf model's config)."""
        self.tokenizer.save_pretrained(str(Path(folder) / "tokenizer"))
        if self.hf_config is not None:
            self.hf_config.save_pretrained(str(Path(folder) / "hf_config"))


# ---------------------------------------------------------------------------------------------- building


def load_tokenizer(folder: str, what: str):
    from transformers import AutoTokenizer

    check(bool(folder) and Path(folder).is_dir(),
          f"{what}: no tokenizer folder ({folder or 'none given'}): a text model needs its dataset's tokenizer or "
          f"a checkpoint folder with tokenizer/")
    tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.pad_token is None:  # GPT-2's tokenizer has none: pad with its end-of-text token (never attended)
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def _settings(arch: str, kwargs: dict) -> Tuple[str, dict]:
    kind, defaults = ("hf", {}) if arch.startswith("hf:") else TEXT_ARCHS[arch]
    allowed = KWARGS[kind] | set(COMMON)
    bad = sorted(k for k in kwargs if k not in allowed)
    if bad:
        raise UserError(f"text model '{arch}' has no argument {bad[0]}{closest(bad[0], allowed)} (kwargs.{bad[0]}): "
                        f"remove it; '{arch}' takes {', '.join(sorted(allowed))}")
    s = {**COMMON, **defaults, **kwargs}
    check(s["pooling"] in (None,) + POOLINGS, f"kwargs.pooling={s['pooling']} is unknown: use one of "
                                              f"{', '.join(POOLINGS)}")
    check(int(s["max_length"]) >= 2, f"kwargs.max_length={s['max_length']} must be >= 2: use e.g. 128")
    return kind, s


def _small_encoder(kind: str, s: dict, tok) -> Tuple[nn.Module, Any]:
    """The encoder of one of TEXT_ARCHS for this tokenizer's vocabulary (and its HF config, or None)."""
    vocab = len(tok)
    if kind == "lstm":
        return LSTMEncoder(vocab, tok.pad_token_id, int(s["embedding_size"]), int(s["hidden_size"]),
                           int(s["num_layers"]), bool(s["bidirectional"]), float(s["dropout"])), None
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    h, n, heads, p = int(s["hidden_size"]), int(s["num_layers"]), int(s["num_heads"]), float(s["dropout"])
    check(h % heads == 0, f"kwargs.hidden_size={h} is not a multiple of num_heads={heads}: change one of them")
    if kind == "bert":
        cfg = BertConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                         intermediate_size=4 * h, max_position_embeddings=int(s["max_length"]),
                         hidden_dropout_prob=p, attention_probs_dropout_prob=p, pad_token_id=tok.pad_token_id)
        return HFEncoder(BertModel(cfg, add_pooling_layer=False), s["pooling"] or "cls"), None
    cfg = GPT2Config(vocab_size=vocab, n_positions=int(s["max_length"]), n_embd=h, n_layer=n, n_head=heads,
                     resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    return HFEncoder(GPT2Model(cfg), s["pooling"] or "last"), None


_ENCODER_POOLING = ("bert", "distilbert", "roberta", "electra", "albert", "deberta", "deberta-v2", "xlm-roberta")


def hf_source(name: str) -> str:
    """The local folder of HF model `name` (a folder holding config.json, or a hub name already in the HF cache);
    nothing is downloaded: a name the cache lacks is one line naming the cache checked and the fix."""
    if Path(name).is_dir():
        check((Path(name) / "config.json").is_file(), f"model folder {name} holds no config.json: give a folder "
                                                       f"saved by transformers' save_pretrained")
        return str(name)
    from huggingface_hub import constants, snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:
        offline = " (HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
        raise UserError(f"HF model '{name}' is not in the HF cache {constants.HF_HUB_CACHE}{offline} and nothing is "
                        f"downloaded at run time: run `huggingface-cli download {name}` where there is internet (same "
                        f"HF_HOME), or give a local folder with config.json and tokenizer files") from None


def _hf_encoder(arch: str, s: dict, checkpoint: Optional[str]) -> Tuple[nn.Module, Any, Any, str]:
    """(encoder, tokenizer, config, tag) of `hf:<name>`: weights from the folder / HF cache, or, with a suite
    checkpoint, the architecture from its hf_config/ (the weights come from the checkpoint)."""
    from transformers import AutoConfig, AutoModel

    saved = Path(checkpoint).parent if checkpoint else None
    if saved is not None and (saved / "hf_config").is_dir():
        cfg = AutoConfig.from_pretrained(str(saved / "hf_config"))
        model, tok = AutoModel.from_config(cfg), load_tokenizer(str(saved / "tokenizer"), arch)
    else:
        src = hf_source(arch[3:])
        model = AutoModel.from_pretrained(src, local_files_only=True)
        tok, cfg = load_tokenizer(src, arch), model.config
    pooling = s["pooling"] or ("cls" if cfg.model_type in _ENCODER_POOLING else "last")
    return HFEncoder(model, pooling), tok, cfg, arch[3:]


def _embedding_rows(model: nn.Module, state: dict) -> Tuple[str, int, int]:
    """(key, rows in the checkpoint, rows of this model) of the model's first token embedding."""
    own = model.state_dict()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding) and f"{name}.weight" in state:
            k = f"{name}.weight"
            return k, int(state[k].shape[0]), int(own[k].shape[0])
    return "", 0, 0


def build_text_model(arch: str, info, checkpoint: Optional[str] = None, kwargs: Optional[dict] = None,
                     headless: bool = False) -> TextModel:
    """A text model `arch` for `info` (num_classes, tokenizer folder), randomly initialised (an `hf:` one with its
    weights). With `checkpoint` (a weight file, loaded by the caller: `checkpoint_state`), its folder's tokenizer/
    (and hf_config/) replace the dataset's."""
    arch = str(arch)
    if not is_text_arch(arch):
        raise UserError(f"'{arch}' is not a text model{closest(arch, TEXT_ARCHS)} and dataset '{getattr(info, 'name', '')}'"
                        f" is text: use one of {', '.join(TEXT_ARCHS)} or hf:<hub name>")
    kind, s = _settings(arch, dict(kwargs or {}))
    k = 0 if headless else int(info.num_classes)
    if kind == "hf":
        enc, tok, hf_cfg, tag = _hf_encoder(arch, s, checkpoint)
        tok_dir = str(Path(checkpoint).parent / "tokenizer") if checkpoint else ""
    else:
        tok_dir = _tokenizer_dir(info, checkpoint)
        tok = load_tokenizer(tok_dir, arch)
        (enc, hf_cfg), tag = _small_encoder(kind, s, tok), ""
    return TextModel(enc, tok, tok_dir, k, arch, int(s["max_length"]), tag, hf_cfg)


def checkpoint_state(model: TextModel, checkpoint: str, headless: bool = False) -> dict:
    """The weights of `checkpoint` for `model`, after checking that its token embedding has the vocabulary of the
    model's tokenizer (another tokenizer folder is one line); headless: without the file's head."""
    state = load_state_dict(checkpoint)
    if headless:  # a feature extractor: the file's head is not asked for
        state = {n: v for n, v in state.items() if not n.startswith("head.")}
    key, rows, own = _embedding_rows(model, state)
    check(rows == own, f"checkpoint {checkpoint}: its embedding '{key}' has {rows} rows but the tokenizer "
                       f"{model.tokenizer_dir} has a vocabulary of {own}: put the tokenizer the weights were trained "
                       f"with in {Path(checkpoint).parent / 'tokenizer'}")
    return state


def _tokenizer_dir(info, checkpoint: Optional[str]) -> str:
    """A checkpoint's own tokenizer/ folder when it has one, else the dataset's (`info.tokenizer`)."""
    if checkpoint and (Path(checkpoint).parent / "tokenizer").is_dir():
        return str(Path(checkpoint).parent / "tokenizer")
    return str(getattr(info, "tokenizer", "") or "")
