"""Students of an ``hf`` teacher.

- ``from_teacher``: the teacher's architecture with fewer layers and/or a smaller width. Fewer
  layers are initialised as DistilBERT does (Sanh et al. 2019, arXiv:1910.01108): the
  embeddings and every k-th layer copied (here ending at the teacher's last layer). A smaller
  width keeps the teacher's most important hidden channels, attention heads and MLP neurons,
  ranked by their mean absolute activation on a slice of the transfer set, as Minitron prunes
  (Muralidharan et al. 2024, arXiv:2407.14679).
  ``"init": "random"`` opts out of both.
- ``hf_config``: a fresh model of the teacher's family with these config overrides.
- an uploaded ``hf`` student: its vocabulary must be the teacher's.

Every student carries the teacher's tokenizer and label names.
"""

from __future__ import annotations

import copy
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.distill.hf.archive import extract_hf_archive
from core.distill.hf.models import HFModel, HFTeacher, load_folder, model_class, vocab_hash
from core.distill.types import ModelFile
from core.errors import InvalidSpec
from core.spec import FromTeacher, StudentSpec

IMPORTANCE_SAMPLES = 256  # rows of the transfer set that rank channels and heads
_LAYER = re.compile(r"\.(layers?|h)\.(\d+)\.")  # BERT/Llama ``layer(s).i``, GPT-2 ``h.i``


def build_hf_student(
    spec: StudentSpec,
    teacher: HFTeacher,
    *,
    model_file: ModelFile | None,
    x: Tensor,
    field: str = "student",
) -> HFModel:
    """The student a spec asks for, on the CPU in train mode."""
    tmodel: HFModel = teacher.module
    if model_file is not None:
        student = _uploaded(model_file, teacher, field)
    elif spec.hf_config is not None:
        config = _with_overrides(tmodel.config, spec.hf_config, f"{field}.hf_config")
        student = HFModel(_fresh(config, tmodel.task), tmodel.task)
    else:
        small = spec.from_teacher or FromTeacher()
        config = smaller_config(tmodel.config, small, f"{field}.from_teacher")
        student = HFModel(_fresh(config, tmodel.task), tmodel.task)
        if small.init == "teacher":
            init_from_teacher(student, tmodel, x[:IMPORTANCE_SAMPLES])
    student.tokenizer = tmodel.tokenizer
    cfg = student.config
    cfg.id2label, cfg.label2id = dict(tmodel.config.id2label), dict(tmodel.config.label2id)
    student.distill_arch = {"name": "hf", "spec": spec.model_dump(mode="json")}  # type: ignore[assignment]
    return student.train()


def _fresh(config: Any, task: str) -> nn.Module:
    config = copy.deepcopy(config)
    config._attn_implementation = "eager"
    cls = model_class(config, task)
    if hasattr(cls, "from_config"):
        return cls.from_config(config, attn_implementation="eager")
    return cls(config)


def _with_overrides(config: Any, overrides: dict[str, Any], field: str) -> Any:
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        if key in ("vocab_size", "auto_map", "architectures", "model_type"):
            raise InvalidSpec(
                f"'{key}' cannot be overridden: the student shares the teacher's tokenizer and "
                "architecture",
                field=f"{field}.{key}",
            )
        if not hasattr(config, key):
            raise InvalidSpec(
                f"the teacher's {config.model_type} config has no '{key}'",
                field=f"{field}.{key}",
            )
        setattr(config, key, value)
    _check_heads(config, field)
    return config


def _check_heads(config: Any, field: str) -> None:
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if heads and hidden and hidden % heads:
        raise InvalidSpec(
            f"hidden_size {hidden} is not a multiple of the {heads} attention heads",
            field=field,
        )


def smaller_config(config: Any, small: FromTeacher, field: str) -> Any:
    """The teacher's config with the sizes of ``small`` (unset: the teacher's, heads and MLP
    width following a smaller hidden size at the teacher's head size and MLP ratio)."""
    config = copy.deepcopy(config)
    n = config.num_hidden_layers
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = h // heads
    inter = getattr(config, "intermediate_size", None)
    if small.layers is not None and small.layers > n:
        raise InvalidSpec(
            f"the teacher has {n} layers; a student from it has at most {n}",
            field=f"{field}.layers",
        )
    new_h = small.hidden_size or h
    if new_h > h:
        raise InvalidSpec(
            f"hidden_size {new_h} is larger than the teacher's {h}", field=f"{field}.hidden_size"
        )
    new_heads = small.heads or max(1, new_h // head_dim if new_h != h else heads)
    config.num_hidden_layers = small.layers or n
    config.hidden_size = new_h
    config.num_attention_heads = new_heads
    if inter is not None:
        config.intermediate_size = small.intermediate_size or max(1, inter * new_h // h)
    elif small.intermediate_size is not None:
        raise InvalidSpec(
            f"the teacher's {config.model_type} config has no intermediate_size",
            field=f"{field}.intermediate_size",
        )
    _check_heads(config, f"{field}.heads")
    return config


# --- initialisation from the teacher -----------------------------------------------------------


def layer_choice(n_teacher: int, n_student: int) -> list[int]:
    """The teacher layer each student layer copies: every k-th one, ending at the last.

    DistilBERT took layers 0, 2, 4, …; ending at the last layer keeps the representation the
    teacher's head reads (a 2-layer teacher's layer 0 under its head: KL 1.6 to the teacher,
    against 0.14 for layer 1 and 0.9 for a random start, tests/core/test_hf.py's model).
    """
    return [(j + 1) * n_teacher // n_student - 1 for j in range(n_student)]


@torch.no_grad()
def init_from_teacher(student: HFModel, teacher: HFModel, x: Tensor) -> None:
    """Copy the teacher's weights into a student with fewer layers and/or a smaller width."""
    t_state = teacher.model.state_dict()
    s_model = student.model
    t_cfg, s_cfg = teacher.config, student.config
    choice = layer_choice(t_cfg.num_hidden_layers, s_cfg.num_hidden_layers)
    narrower = s_cfg.hidden_size != t_cfg.hidden_size or getattr(
        s_cfg, "intermediate_size", None
    ) != getattr(t_cfg, "intermediate_size", None)
    index = _WidthIndex(teacher, student, x) if narrower else None
    new_state = {}
    for key, target in s_model.state_dict().items():
        layer = None
        t_key = key
        match = _LAYER.search(key)
        if match:
            layer = choice[int(match.group(2))]
            t_key = key[: match.start()] + f".{match.group(1)}.{layer}." + key[match.end() :]
        source = t_state.get(t_key)
        if source is None:
            continue
        if source.shape != target.shape:
            if index is None:
                continue
            source = index.slice(key, source, target.shape, layer)
            if source is None:
                continue
        new_state[key] = source.clone()
    s_model.load_state_dict(new_state, strict=False)


class _WidthIndex:
    """Which of the teacher's channels, heads and neurons a narrower student keeps."""

    def __init__(self, teacher: HFModel, student: HFModel, x: Tensor) -> None:
        t_cfg, s_cfg = teacher.config, student.config
        self.h_t, self.h_s = t_cfg.hidden_size, s_cfg.hidden_size
        self.i_t = getattr(t_cfg, "intermediate_size", None)
        self.i_s = getattr(s_cfg, "intermediate_size", None)
        self.heads_s = s_cfg.num_attention_heads
        self.dh_t = t_cfg.hidden_size // t_cfg.num_attention_heads
        self.dh_s = s_cfg.hidden_size // s_cfg.num_attention_heads
        self.attn_s = self.heads_s * self.dh_s
        hidden, context, inter = _importance(teacher, x)
        self.hidden = _top(hidden, self.h_s)
        self.context = {layer: self._heads(v) for layer, v in context.items()}
        self.inter = {layer: _top(v, self.i_s) for layer, v in inter.items() if self.i_s}

    def _heads(self, channels: Tensor) -> Tensor:
        if self.dh_s != self.dh_t:  # head sizes differ: keep single channels instead
            return _top(channels, self.attn_s)
        per_head = channels.view(-1, self.dh_t).sum(1)
        keep = _top(per_head, self.heads_s)
        return (keep[:, None] * self.dh_t + torch.arange(self.dh_t)).flatten()

    def _dim(self, key: str, dim: int, size: int, layer: int | None) -> Tensor | None:
        if layer is not None:
            if ".attention.self." in key and dim == 0:
                return self.context.get(layer)
            if ".attention.output.dense.weight" in key and dim == 1:
                return self.context.get(layer)
            if ".intermediate.dense." in key and dim == 0:
                return self.inter.get(layer)
            if key.endswith(".output.dense.weight") and ".attention." not in key and dim == 1:
                return self.inter.get(layer)
        return self.hidden if size == self.h_t else None

    def slice(
        self, key: str, source: Tensor, shape: torch.Size, layer: int | None
    ) -> Tensor | None:
        """The teacher tensor cut to the student's shape, or None when it cannot be mapped."""
        out = source
        for dim, (have, want) in enumerate(zip(source.shape, shape, strict=True)):
            if have == want:
                continue
            idx = self._dim(key, dim, have, layer)
            if idx is None or len(idx) != want:
                return None
            out = out.index_select(dim, idx)
        return out


def _top(scores: Tensor, k: int | None) -> Tensor:
    """Indices of the ``k`` largest scores, in their original order."""
    k = len(scores) if k is None else min(k, len(scores))
    return torch.topk(scores, k).indices.sort().values


def _importance(teacher: HFModel, x: Tensor) -> tuple[Tensor, dict[int, Tensor], dict[int, Tensor]]:
    """Mean |activation| of every hidden channel (summed over the layers' outputs), of every
    attention context channel per layer and of every MLP neuron per layer, on ``x``."""
    model = teacher.model
    context: dict[int, Tensor] = {}
    inter: dict[int, Tensor] = {}
    mask = x[:, 1].bool()

    def accumulate(store: dict[int, Tensor], layer: int) -> Callable[[Tensor], None]:
        def add(t: Tensor) -> None:
            score = t.abs()[mask].float().mean(0)
            store[layer] = store.get(layer, 0) + score

        return add

    handles = []
    for name, module in model.named_modules():
        match = re.search(r"layers?\.(\d+)\.(attention\.output\.dense|intermediate)$", name)
        if not match:
            continue
        layer = int(match.group(1))
        if match.group(2) == "intermediate":
            add = accumulate(inter, layer)
            handles.append(module.register_forward_hook(lambda _m, _a, out, f=add: f(out)))
        else:
            add = accumulate(context, layer)
            handles.append(module.register_forward_pre_hook(lambda _m, args, f=add: f(args[0])))
    try:
        device = next(model.parameters()).device
        _, feats = teacher.run(x.to(device), hidden=True)
    finally:
        for h in handles:
            h.remove()
    hidden = sum(f.abs()[mask].float().mean(0) for f in feats.values())
    assert isinstance(hidden, Tensor)
    return (
        hidden.cpu(),
        {k: v.cpu() for k, v in context.items()},
        {k: v.cpu() for k, v in inter.items()},
    )


# --- uploaded students -------------------------------------------------------------------------


def _uploaded(model_file: ModelFile, teacher: HFTeacher, field: str) -> HFModel:
    if model_file.format != "hf":
        raise InvalidSpec(
            "a Hugging Face teacher's uploaded student must be an hf upload (a save_pretrained "
            "zip) with the teacher's vocabulary",
            field=field,
        )
    work = Path(tempfile.mkdtemp(prefix="hf-student-"))
    try:
        student = load_folder(extract_hf_archive(model_file.path, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    check_same_vocabulary(vocab_hash(student.tokenizer), teacher.hf["vocab_sha256"], field)
    t_cfg = teacher.module.config
    if teacher.module.task == "sequence_classification" and (
        student.task != "sequence_classification" or student.config.num_labels != t_cfg.num_labels
    ):
        raise InvalidSpec(
            f"the student must be a sequence classifier with the teacher's "
            f"{t_cfg.num_labels} labels",
            field=field,
        )
    if teacher.module.task == "causal_lm" and student.task != "causal_lm":
        raise InvalidSpec(
            "a causal language model's student must be a causal LM too (a …ForCausalLM "
            "architecture) with the teacher's vocabulary",
            field=field,
        )
    student.task = teacher.module.task
    student.model.config._attn_implementation = "eager"
    return student


def check_same_vocabulary(student: str | None, teacher: str | None, field: str) -> None:
    if student is not None and teacher is not None and student != teacher:
        raise InvalidSpec(
            "the student's tokenizer has another vocabulary than the teacher's, so their token "
            "ids do not match; use a student saved with the teacher's tokenizer",
            field=field,
        )
