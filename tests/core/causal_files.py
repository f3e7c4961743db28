"""A tiny GPT-2 teacher trained here, on text that ships with Python, and its data files.

The corpus is the prose of ``pydoc_data.topics`` (the language reference); the tokenizer a
byte-level BPE trained here with ``tokenizers``; the teacher a 4-layer GPT-2 of width 64
trained a few hundred steps on windows of the corpus. Nothing is downloaded.
"""

from __future__ import annotations

import json
import random
import zipfile
from pathlib import Path

EOS = "<|endoftext|>"


def corpus(min_words: int = 8, max_words: int = 80) -> list[str]:
    """The paragraphs of pydoc_data.topics, whitespace folded, in a fixed order."""
    import pydoc_data.topics as topics

    out = []
    for name in sorted(topics.topics):
        for para in topics.topics[name].split("\n\n"):
            words = para.split()
            if len(words) >= min_words and not para.startswith(" "):
                out.append(" ".join(words[:max_words]))
    return out


def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """A GPT-2-style byte-level BPE tokenizer (its end-of-text token pads)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=[EOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok._tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS
    )


def windows(tokenizer, texts: list[str], length: int):  # type: ignore[no-untyped-def]
    import torch

    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    n = len(stream) // length
    return torch.tensor(stream[: n * length]).view(n, length)


def train_teacher(
    folder: Path, texts: list[str], *, steps: int = 300, layers: int = 4, width: int = 64
) -> None:
    """Train a tiny GPT-2 on ``texts`` and save it (safetensors) with its tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tokenizer = train_tokenizer(texts)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=width,
        n_layer=layers,
        n_head=4,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches run many times slower on two busy threads
    try:
        _train(model := GPT2LMHeadModel(config), tokenizer, texts, steps)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _train(model, tokenizer, texts: list[str], steps: int) -> None:  # type: ignore[no-untyped-def]
    import torch

    data = windows(tokenizer, texts, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(len(data), (16,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def zip_folder(folder: Path, path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                zf.write(file, file.relative_to(folder).as_posix())
    return path


def write_text_jsonl(path: Path, texts: list[str], n_val: int, seed: int = 0) -> Path:
    """``{"text"}`` lines, the last ``n_val`` of a shuffle marked ``"split": "val"``."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    val = set(order[-n_val:])
    with path.open("w") as fh:
        for i, text in enumerate(texts):
            row = {"text": text, **({"split": "val"} if i in val else {})}
            fh.write(json.dumps(row) + "\n")
    return path
