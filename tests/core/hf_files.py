"""Tiny Hugging Face models and text for tests: built from a config, no downloads.

The tokenizer is a WordPiece vocabulary written here from the words of ``pydoc_data.topics``
(the language reference's text that ships with Python), the same in every process.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

LABELS = ("compound", "expressions", "data")
# Topics of the language reference, grouped by the section they come from.
TOPIC_GROUPS = {
    "compound": ("if", "while", "for", "try", "with", "function", "class", "match"),
    "expressions": ("atom-identifiers", "attribute-references", "calls", "binary", "comparisons",
                    "lambda", "booleans", "power", "unary", "subscriptions", "slicings"),
    "data": ("numbers", "strings", "typesseq", "typesmapping", "types", "specialattrs",
             "typesfunctions", "typesmethods", "bltin-null-object"),
}  # fmt: skip


def paragraphs(min_words: int = 6, max_words: int = 60) -> list[tuple[str, str]]:
    """(paragraph, section) pairs from pydoc_data.topics, for the topics of TOPIC_GROUPS."""
    import pydoc_data.topics as topics

    out = []
    for label, names in TOPIC_GROUPS.items():
        for name in names:
            text = topics.topics.get(name, "")
            for para in text.split("\n\n"):
                words = " ".join(para.split()).split(" ")
                if len(words) >= min_words:
                    out.append((" ".join(words[:max_words]), label))
    return out


SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def topic_vocab(vocab_size: int = 800) -> list[str]:
    """A WordPiece vocabulary of the topics, the same in every process: the special tokens,
    every character (alone and as a ``##`` continuation), then the most frequent words, ties
    broken alphabetically. (``tokenizers``' WordPieceTrainer breaks ties by hash-map order,
    which changes from one process to the next and with it every token id.)"""
    import pydoc_data.topics as topics
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in topics.topics.values():
        counts.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    vocab = SPECIALS + chars + [f"##{c}" for c in chars]
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    return vocab + words[: max(0, vocab_size - len(vocab))]


def train_tokenizer(vocab_size: int = 800):
    """A BERT-style WordPiece tokenizer (PreTrainedTokenizerFast) of the topics' vocabulary."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(topic_vocab(vocab_size))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def tiny_bert(
    folder: Path,
    *,
    tokenizer=None,
    labels: tuple[str, ...] | None = LABELS,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    seed: int = 0,
) -> Path:
    """Save a tiny BERT (a classifier when ``labels``, else a bare encoder) and its tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    tokenizer = tokenizer or train_tokenizer()
    kw = {}
    if labels:
        kw = {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)},
        }
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        **kw,
    )
    torch.manual_seed(seed)
    model = (BertForSequenceClassification if labels else BertModel)(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def zip_folder(folder: Path, path: Path, *, top: str | None = None) -> Path:
    """Zip a folder's files (at the root, or under ``top``)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(Path(folder).rglob("*")):
            if file.is_file():
                name = file.relative_to(folder).as_posix()
                zf.write(file, f"{top}/{name}" if top else name)
    return Path(path)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with Path(path).open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return Path(path)


def train_classifier(
    folder: Path, *, epochs: int = 8, max_length: int = 48, seed: int = 0
) -> float:
    """Fine-tune the classifier saved in ``folder`` on the topic paragraphs (all of them) and
    save it back; its training accuracy."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    rows = paragraphs()
    label2id = model.config.label2id
    enc = tokenizer([t for t, _ in rows], padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")  # fmt: skip
    y = torch.tensor([label2id[label] for _, label in rows])
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine more threads are slower
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(32):
            out = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx])
            loss = torch.nn.functional.cross_entropy(out.logits, y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        pred = model(**{k: enc[k] for k in ("input_ids", "attention_mask")}).logits.argmax(-1)
    torch.set_num_threads(threads)
    model.save_pretrained(folder)
    return float((pred == y).float().mean())
