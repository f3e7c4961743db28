"""Student networks: the presets (mlp, cnn, resnet, transformer) and :func:`build_student`.

Every preset is registered in the architecture registry, so a student saved as safetensors can
be rebuilt from its name and JSON config. Each one names the layers feature methods read:

- ``penultimate``: the module whose output is the feature vector fed to the final ``head``;
- ``hint_layers``: intermediate module paths, in order (hidden layers, conv blocks, encoder layers);
- ``attention_layers``: the blocks with spatial maps (N, C, H, W), for attention transfer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from core.distill.arch_registry import build_architecture, register_architecture
from core.distill.arch_weights import load_arch_weights
from core.distill.formats import check_exported_program_archive, check_torchscript_archive
from core.distill.operators import check_exported_program, check_torchscript
from core.distill.types import ModelFile, Teacher
from core.errors import InvalidSpec, ModelInvalid, ShapeMismatch
from core.spec import StudentSpec, preset_input_problem

VOCAB_SIZE = 257  # byte tokenizer: 0 is padding, byte b is b + 1
MAX_TOKENS = 2048  # positions a transformer supports when the sequence length is not fixed


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of a module."""
    return sum(p.numel() for p in module.parameters())


# --- input standardisation ---------------------------------------------------------------------


class Standardize(nn.Module):
    """``(x - mean) / std`` with the transfer set's statistics kept as buffers: the first module
    of a preset, so every export takes the same raw inputs as the teacher.

    ``shape`` is the statistics' shape, broadcast against one sample: ``[d]`` per feature,
    ``[C, 1, 1]`` per channel, ``[1, 1]`` one value for a one-channel image.
    """

    def __init__(self, shape: list[int]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> Standardize:
        """Set the statistics from samples ``x`` (N, *sample shape), the shape right-aligned as
        in broadcasting; a constant feature keeps std 1 so it stays constant."""
        offset = x.dim() - self.mean.dim()
        keep = {offset + i for i, n in enumerate(self.mean.shape) if n != 1}
        dims = [d for d in range(x.dim()) if d not in keep]
        x = x.double()
        mean = x.mean(dim=dims)
        std = x.std(dim=dims, correction=0)
        std = torch.where(std > 1e-8 * mean.abs().clamp(min=1.0), std, torch.ones_like(std))
        self.mean.copy_(mean.reshape(self.mean.shape))
        self.std.copy_(std.reshape(self.std.shape))
        return self


def standardize_shape(preset: str, input_shape: list[int | None]) -> list[int] | None:
    """The statistics' shape a preset standardises its float inputs with (None: it doesn't)."""
    if preset == "mlp" and all(d is not None for d in input_shape):
        return [int(d) for d in input_shape]  # type: ignore[arg-type]  # per feature
    if preset in ("cnn", "resnet") and len(input_shape) == 3 and input_shape[0] is not None:
        return [int(input_shape[0]), 1, 1]  # per channel
    if preset in ("cnn", "resnet") and len(input_shape) == 2:
        return [1, 1]  # one channel
    if preset == "transformer" and input_shape and input_shape[-1] is not None:
        return [int(input_shape[-1])]  # per feature of each position
    return None


def _standardize(shape: list[int] | None) -> nn.Module:
    return Standardize(shape) if shape else nn.Identity()


def input_standardizer(model: nn.Module) -> Standardize | None:
    """A preset's input standardisation layer, if it has one."""
    layer = getattr(model, "standardize", None)
    return layer if isinstance(layer, Standardize) else None


# --- presets -----------------------------------------------------------------------------------


class TokenMean(nn.Module):
    """Token ids (N, L) → mean of their embeddings over the non-padding positions (N, width)."""

    def __init__(self, vocab_size: int, width: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, width, padding_idx=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = (x != 0).unsqueeze(-1).to(self.embedding.weight.dtype)
        summed = (self.embedding(x) * keep).sum(1)
        return summed / keep.sum(1).clamp(min=1.0)


class MLP(nn.Module):
    """Fully connected network on flattened inputs (token ids: mean of token embeddings)."""

    penultimate = "body"

    def __init__(
        self,
        input_shape: list[int],
        output_dim: int,
        width: int = 128,
        depth: int = 2,
        dropout: float = 0.0,
        tokens: bool = False,
        vocab_size: int = VOCAB_SIZE,
        standardize: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.standardize = _standardize(standardize)
        if tokens:
            self.embed: nn.Module = TokenMean(vocab_size, width)
            features = width
        else:
            self.embed = nn.Flatten()
            features = math.prod(input_shape)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers.append(nn.Sequential(nn.Linear(features, width), nn.ReLU(), nn.Dropout(dropout)))
            features = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(features, output_dim)
        self.hint_layers = [f"body.{i}" for i in range(depth)]
        self.attention_layers: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(self.standardize(x))))


def _conv_block(c_in: int, c_out: int, pool: bool, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
    if dropout:
        layers.append(nn.Dropout2d(dropout))
    return nn.Sequential(*layers)


def _spatial(input_shape: list[int]) -> tuple[int, int | None, int | None]:
    """(channels, H, W) of an image input; a 2-D input is one channel."""
    if len(input_shape) == 2:
        return 1, input_shape[0], input_shape[1]
    return input_shape[0], input_shape[1], input_shape[2]


class _ImageModel(nn.Module):
    """The input side of the image presets: standardisation, and a channel axis for an (H, W)
    input."""

    penultimate = "pool"

    def __init__(self, input_shape: list[int], standardize: list[int] | None) -> None:
        super().__init__()
        self.standardize = _standardize(standardize)
        self.channels_first = len(input_shape) == 3

    def image(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` standardised, as (N, C, H, W)."""
        x = self.standardize(x)
        return x if self.channels_first else x.unsqueeze(1)


class CNN(_ImageModel):
    """Conv blocks (conv3x3, batch norm, ReLU, max-pool while the map is large), global pooling."""

    def __init__(
        self,
        input_shape: list[int],
        output_dim: int,
        width: int = 32,
        depth: int = 2,
        dropout: float = 0.0,
        standardize: list[int] | None = None,
    ) -> None:
        super().__init__(input_shape, standardize)
        c, h, w = _spatial(input_shape)
        size = min(h or 64, w or 64)
        blocks = []
        for i in range(depth):
            c_out = width * min(2**i, 4)
            # Halve the map while it is large, but keep at least 4x4 for the last block.
            pool = (size >= 4 and i < depth - 1) or size >= 8
            blocks.append(_conv_block(c, c_out, pool, dropout))
            size = math.ceil(size / 2) if pool else size
            c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, output_dim)
        self.hint_layers = [f"blocks.{i}" for i in range(depth)]
        self.attention_layers = list(self.hint_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.blocks(self.image(x))))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al. 2016)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(_ImageModel):
    """A small ResNet: a stem, three stages of ``depth`` basic blocks (width, 2·width, 4·width)."""

    def __init__(
        self,
        input_shape: list[int],
        output_dim: int,
        width: int = 16,
        depth: int = 2,
        dropout: float = 0.0,
        standardize: list[int] | None = None,
    ) -> None:
        super().__init__(input_shape, standardize)
        c, _, _ = _spatial(input_shape)
        self.stem = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages = []
        c_in = width
        for s in range(3):
            c_out = width * 2**s
            blocks = [BasicBlock(c_in, c_out, 2 if s else 1)]
            blocks += [BasicBlock(c_out, c_out, 1) for b in range(1, depth)]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.head = nn.Linear(c_in, output_dim)
        self.hint_layers = [f"stages.{s}" for s in range(3)]
        self.attention_layers = list(self.hint_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.stages(self.stem(self.image(x)))))


class MaskedMean(nn.Module):
    """Mean over the sequence positions that are not padding."""

    def forward(self, h: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        keep = (~padding).unsqueeze(-1).to(h.dtype)
        return (h * keep).sum(1) / keep.sum(1).clamp(min=1.0)


class Transformer(nn.Module):
    """A small pre-norm Transformer encoder over token ids (N, L) or float sequences (N, L, d).

    Token id 0 is padding and is masked out of attention and pooling.
    """

    penultimate = "pool"

    def __init__(
        self,
        input_shape: list[int],
        output_dim: int,
        width: int = 64,
        depth: int = 2,
        heads: int = 4,
        dropout: float = 0.0,
        tokens: bool = True,
        vocab_size: int = VOCAB_SIZE,
        max_len: int = MAX_TOKENS,
        standardize: list[int] | None = None,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be a multiple of heads {heads}")
        self.standardize = _standardize(standardize)
        self.tokens = tokens
        self.embed: nn.Module = (
            nn.Embedding(vocab_size, width, padding_idx=0)
            if tokens
            else nn.Linear(input_shape[-1], width)
        )
        self.position = nn.Embedding(max_len, width)
        layer = nn.TransformerEncoderLayer(
            width, heads, 2 * width, dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.pool = MaskedMean()
        self.head = nn.Linear(width, output_dim)
        self.hint_layers = [f"encoder.layers.{i}" for i in range(depth)]
        self.attention_layers: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        if self.tokens:
            padding = x == 0
            # A row of padding only would attend to nothing (NaN): let it attend to everything.
            padding = padding & ~padding.all(1, keepdim=True)
        else:
            padding = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        positions = torch.arange(length, device=x.device)
        h = self.embed(self.standardize(x)) + self.position(positions).unsqueeze(0)
        h = self.norm(self.encoder(h, src_key_padding_mask=padding))
        return self.head(self.pool(h, padding))


@register_architecture("mlp")
def mlp(**config: Any) -> nn.Module:
    """The ``mlp`` preset: input_shape, output_dim, width, depth, dropout, tokens."""
    return MLP(**config)


@register_architecture("cnn")
def cnn(**config: Any) -> nn.Module:
    """The ``cnn`` preset: input_shape (C, H, W) or (H, W), output_dim, width, depth, dropout."""
    return CNN(**config)


@register_architecture("resnet")
def resnet(**config: Any) -> nn.Module:
    """The ``resnet`` preset: input_shape, output_dim, width, depth (blocks per stage)."""
    return ResNet(**config)


@register_architecture("transformer")
def transformer(**config: Any) -> nn.Module:
    """The ``transformer`` preset: input_shape, output_dim, width, depth, heads, tokens."""
    return Transformer(**config)


# --- building a student for a job --------------------------------------------------------------


def build_student(
    spec: StudentSpec,
    *,
    input_shape: list[int | None] | tuple[int | None, ...],
    input_dtype: str | torch.dtype,
    output_dim: int,
    teacher: Teacher | None = None,
    model_file: ModelFile | None = None,
    inputs: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> nn.Module:
    """The student a spec asks for, shaped for the data and the teacher's outputs.

    ``input_shape`` is one sample's shape, or the batched shape with ``None`` first. A preset
    given float ``inputs`` (the transfer set) standardises its inputs with their statistics.
    ``vocab_size``: token inputs' largest id + 1, when it is more than the byte tokenizer's
    (ids from another tokenizer): the presets' embedding tables are sized to fit it.
    """
    shape = list(input_shape)
    if shape and shape[0] is None:
        shape = shape[1:]
    dtype = str(input_dtype).removeprefix("torch.")
    if model_file is not None:
        return _load_trainable(model_file, shape, dtype, output_dim)
    if spec.shrink is not None:
        return _shrink_teacher(teacher, spec.shrink)
    if spec.preset is None:
        raise InvalidSpec(
            "the student names an uploaded model but no model file was given", field="student"
        )
    config = _preset_config(spec.filled(), shape, dtype, output_dim)
    if inputs is not None and inputs.is_floating_point():
        config["standardize"] = standardize_shape(spec.preset, shape)
    if config.get("tokens") and vocab_size is not None and vocab_size > VOCAB_SIZE:
        config["vocab_size"] = int(vocab_size)
    model = build_architecture(spec.preset, config)
    layer = input_standardizer(model)
    if layer is not None and inputs is not None:
        layer.fit(inputs)
    return model


def _preset_config(
    spec: StudentSpec, shape: list[int | None], dtype: str, output_dim: int
) -> dict[str, Any]:
    preset = spec.preset
    tokens = dtype.startswith(("int", "uint"))
    config: dict[str, Any] = {
        "output_dim": output_dim,
        "width": int(spec.width),  # type: ignore[arg-type]
        "depth": int(spec.depth),  # type: ignore[arg-type]
        "dropout": spec.dropout,
    }
    problem = preset_input_problem(preset, shape, dtype)  # type: ignore[arg-type]
    if problem:
        raise InvalidSpec(problem, field="student.preset")
    if preset == "mlp":
        config["tokens"] = tokens
    elif preset == "transformer":
        heads = spec.heads or 4
        if spec.width % heads:  # type: ignore[operator]
            raise InvalidSpec(
                f"transformer width {spec.width} must be a multiple of heads {heads}",
                field="student.width",
            )
        config.update(heads=heads, tokens=tokens)
        if shape[0] is not None:
            config["max_len"] = int(shape[0])
    config["input_shape"] = [int(d) if d is not None else None for d in shape]
    return config


_WIDTH_KEYS = ("width", "hidden", "hidden_dim", "hidden_size", "channels", "d_model")


def _shrink_teacher(teacher: Teacher | None, factor: float) -> nn.Module:
    """The teacher's built-in architecture rebuilt with every width scaled by ``factor``."""
    arch = teacher.info.arch if teacher is not None else None
    config = _teacher_arch_config(teacher)
    if arch is None or config is None:
        raise InvalidSpec(
            "shrink needs a teacher whose architecture is built in (a safetensors upload with "
            "arch); use a preset student instead",
            field="student.shrink",
        )
    shrunk = dict(config)
    for key, value in config.items():
        if key in _WIDTH_KEYS or key.endswith("_width"):
            if isinstance(value, int):
                shrunk[key] = max(1, round(value * factor))
            elif isinstance(value, list):
                shrunk[key] = [max(1, round(v * factor)) for v in value]
    heads = shrunk.get("heads")
    if isinstance(heads, int) and isinstance(shrunk.get("width"), int):
        shrunk["width"] = max(heads, shrunk["width"] // heads * heads)
    return build_architecture(arch, shrunk)


def _teacher_arch_config(teacher: Teacher | None) -> dict[str, Any] | None:
    if teacher is None:
        return None
    config = getattr(teacher, "arch_config", None)
    if config is None:
        module = getattr(teacher, "module", None)
        config = (getattr(module, "distill_arch", None) or {}).get("config")
    return dict(config) if config is not None else None


def _load_trainable(
    model_file: ModelFile, shape: list[int | None], dtype: str, output_dim: int
) -> nn.Module:
    """An uploaded student, ready to train (opened by the job's own process, never the API)."""
    fmt = model_file.format
    if fmt == "torchscript":
        check_torchscript_archive(model_file.path)
        model: nn.Module = torch.jit.load(str(model_file.path), map_location="cpu")
        check_torchscript(model)
    elif fmt == "exported_program":
        check_exported_program_archive(model_file.path)
        program = torch.export.load(str(model_file.path))
        check_exported_program(program)
        # train/eval behaviour is frozen at export time; an optimizer still trains it.
        model = program.module()
    elif fmt == "safetensors":
        model = load_arch_weights(model_file).model
    else:
        raise InvalidSpec(
            f"a {fmt} model can't be trained; upload the student as torchscript, "
            "exported_program or safetensors with a built-in arch",
            field="student.model_id",
        )
    for param in model.parameters():
        param.requires_grad_(True)
    if not any(True for _ in model.parameters()):
        raise ModelInvalid("the uploaded student has no parameters to train")
    if fmt != "exported_program":
        _check_output(model, shape, dtype, output_dim)
    return model


def _check_output(model: nn.Module, shape: list[int | None], dtype: str, output_dim: int) -> None:
    """A dry forward on two zero samples: the student must output ``output_dim`` scores."""
    if any(d is None for d in shape):
        return
    probe = torch.zeros([2, *shape], dtype=getattr(torch, dtype, torch.float32))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(probe)
    except Exception as exc:
        raise ShapeMismatch(
            f"the uploaded student fails on inputs of shape {['N', *shape]}: {exc}",
            field="student",
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.shape[-1] != output_dim:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ShapeMismatch(
            f"the uploaded student outputs {got} but the teacher outputs {output_dim} values "
            "per sample; give the student a matching final layer",
            field="student",
        )
