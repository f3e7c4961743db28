"""Load a ``save_pretrained`` folder and run it over packed token inputs.

Models load from local folders only (``HF_HUB_OFFLINE``, ``local_files_only``) and never with
``trust_remote_code``; attention is the eager implementation so that attention maps can be read
(``output_attentions``) by the ``attention`` method.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.distill.hf.archive import check_config, extract_hf_archive
from core.distill.teacher_io import unknown_layer
from core.distill.teachers import ModuleTeacher
from core.distill.types import ModelFile
from core.errors import ModelInvalid
from core.spec import ModelInfo, TensorInfo

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

TASKS = ("sequence_classification", "causal_lm", "feature_extraction")


def model_task(architecture: str) -> str:
    """``sequence_classification``, ``causal_lm`` or ``feature_extraction`` for a class name."""
    from transformers.models.auto import modeling_auto as auto

    def names(mapping: Any) -> set[str]:
        out: set[str] = set()
        for value in mapping.values():
            out.update(value if isinstance(value, (list, tuple)) else [value])
        return out

    if architecture in names(auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES):
        return "sequence_classification"
    if architecture in names(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        return "causal_lm"
    return "feature_extraction"


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """The mean of the token vectors that the attention mask keeps (sentence-transformers)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


class HFModel(nn.Module):
    """A ``transformers`` model as a module over one packed tensor ``x`` (N, 2, L) int64.

    ``forward`` gives the logits of a sequence classifier, or the mean-pooled last hidden state
    of an encoder (its sentence embedding). :meth:`run` also gives the hidden states
    (``hidden_states.0`` is the embedding layer's output) and attention maps by name.
    """

    def __init__(self, model: nn.Module, task: str, tokenizer: Any = None) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.tokenizer = tokenizer  # not a module: carried to the student and into exports

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x)[0]

    def run(
        self, x: Tensor, *, hidden: bool = False, attentions: bool = False
    ) -> tuple[Tensor, dict[str, Tensor]]:
        ids, mask = x[:, 0], x[:, 1]
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            output_hidden_states=hidden or self.task == "feature_extraction",
            output_attentions=attentions,
        )
        if self.task in ("sequence_classification", "causal_lm"):
            y = out.logits  # causal LMs: (N, L, vocab), the next-token logits at every position
        else:
            y = mean_pool(out.hidden_states[-1], mask)
        feats: dict[str, Tensor] = {}
        if hidden:
            feats.update({f"hidden_states.{i}": h for i, h in enumerate(out.hidden_states)})
        if attentions:
            feats.update({f"attentions.{i}": a for i, a in enumerate(out.attentions)})
        return y, feats


def model_class(config: Any, task: str) -> Any:
    """The auto class to instantiate: the family's sequence classifier or causal LM, or its
    base model (the encoder without a head) for feature extraction."""
    import transformers

    if task == "sequence_classification":
        return transformers.AutoModelForSequenceClassification
    if task == "causal_lm":
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def load_folder(folder: Path) -> HFModel:
    """A ``save_pretrained`` folder as an :class:`HFModel` (float32, eval mode, eager attention),
    its tokenizer attached."""
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(folder)
    check_config(json.loads((folder / "config.json").read_text()))
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        task = model_task(config.architectures[0])
        cls = model_class(config, task)
        model = cls.from_pretrained(
            folder,
            config=config,
            local_files_only=True,
            trust_remote_code=False,
            attn_implementation="eager",
            dtype=torch.float32,
            use_safetensors=True,
        )
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise ModelInvalid(
            f"the model folder cannot be loaded: {type(exc).__name__}: {exc}"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelInvalid(
            "the zip has no tokenizer that loads (tokenizer.json, or vocab.txt with "
            f"tokenizer_config.json): {type(exc).__name__}: {exc}; save it beside the model "
            "with tokenizer.save_pretrained(dir)"
        ) from None
    if tokenizer.pad_token is None:
        raise ModelInvalid(
            "the tokenizer has no padding token; set one (tokenizer.pad_token = ...) and save it "
            "again"
        )
    return HFModel(model.eval(), task, tokenizer)


def vocab_hash(tokenizer: Any) -> str:
    """sha256 of the tokenizer's vocabulary (token → id): two models share ids iff equal."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def hf_block(model: HFModel) -> dict[str, Any]:
    """The signature's ``hf`` block (API.md, "Language models")."""
    c = model.config
    block: dict[str, Any] = {
        "architecture": (c.architectures or [type(model.model).__name__])[0],
        "model_type": c.model_type,
        "task": model.task,
        "vocab_size": int(c.vocab_size),
        "num_layers": int(getattr(c, "num_hidden_layers", 0) or 0),
        "hidden_size": int(getattr(c, "hidden_size", 0) or 0),
        "intermediate_size": getattr(c, "intermediate_size", None),
        "num_heads": getattr(c, "num_attention_heads", None),
        "max_positions": getattr(c, "max_position_embeddings", None),
        "vocab_sha256": vocab_hash(model.tokenizer),
    }
    if model.task == "sequence_classification":
        block["num_labels"] = int(c.num_labels)
        block["id2label"] = {str(k): str(v) for k, v in c.id2label.items()}
    return block


def encode(tokenizer: Any, texts: list[str], max_length: int) -> Tensor:
    """Texts → packed (N, 2, L) int64 (ids, attention mask), L the longest up to max_length."""
    enc = tokenizer(
        texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return torch.stack([enc["input_ids"], enc["attention_mask"]], 1).long()


class HFTeacher(ModuleTeacher):
    """A frozen ``hf`` model: ``features`` names ``hidden_states.i`` and ``attentions.i``."""

    def __init__(self, module: HFModel, info: ModelInfo, size_bytes: int) -> None:
        super().__init__(module, info, size_bytes=size_bytes)
        self.hf = hf_block(module)

    @property
    def tokenizer(self) -> Any:
        return self.module.tokenizer

    def _forward(self, x: Tensor) -> Tensor:
        return self.module(x)

    def describe_layers(self) -> list[str]:
        n = self.hf["num_layers"]
        return [f"hidden_states.{i}" for i in range(n + 1)] + [f"attentions.{i}" for i in range(n)]

    def default_feature_layer(self) -> str | None:
        return f"hidden_states.{self.hf['num_layers']}"

    def features(self, x: Tensor, names: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        known = set(self.describe_layers())
        for name in names:
            if name not in known:
                raise unknown_layer(name, self.describe_layers())
        hidden = any(n.startswith("hidden_states.") for n in names)
        attentions = any(n.startswith("attentions.") for n in names)

        def forward(xb: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            out, feats = self.module.run(xb, hidden=hidden, attentions=attentions)
            return out, {n: feats[n] for n in names}

        with torch.no_grad():
            return self._run(x, forward)


def load_hf_teacher(file: ModelFile, device: torch.device | str = "cpu") -> HFTeacher:
    """Unzip an ``hf`` upload into a temporary folder (of this process) and load it."""
    work = Path(tempfile.mkdtemp(prefix="hf-model-"))
    try:
        folder = extract_hf_archive(file.path, work)
        module = load_folder(folder)
        size = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    finally:
        shutil.rmtree(work, ignore_errors=True)  # loaded: the unpacked copy is not needed
    x = encode(module.tokenizer, ["a probe sentence", "another"], 16)
    try:
        with torch.no_grad():
            out = module(x)
    except Exception as exc:  # the model's own forward failed
        raise ModelInvalid(
            f"a dry forward on two tokenised sentences failed: {type(exc).__name__}: {exc}"
        ) from None
    ids = TensorInfo(shape=[None, None], dtype="int64")
    info = ModelInfo(
        format="hf",
        inputs=[ids, ids],
        outputs=[TensorInfo(shape=[None, int(out.shape[-1])], dtype="float32")],
        trainable=True,
        arch=None,
    )
    teacher = HFTeacher(module, info, size)
    teacher.info = info.model_copy(update={"hf": teacher.hf})
    return teacher.to(device)  # type: ignore[return-value]
