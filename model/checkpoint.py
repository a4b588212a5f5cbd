"""Reading DINOv2 weights from disk and remapping them to this package's names — in one place.

Sources: Hugging Face folders (`config.json` + `model.safetensors`, sharded with
`model.safetensors.index.json`, or `pytorch_model.bin`), single `.safetensors` files, and the original
facebookresearch `.pth` files. Pickles are only ever read with `weights_only=True`.

Our names follow the original layout (fused `attn.qkv`, `ls1.gamma`, `mlp.w12`), so `.pth` files map
almost one to one and Hugging Face tensors are renamed and fused. References: timm
`vision_transformer.py` `checkpoint_filter_fn` / `_convert_dinov2`.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePath

import torch

from .config import HEAD_DIM, LIMITS, ViTConfig, swiglu_hidden
from .errors import CheckpointError
from .files import open_regular, read_regular

# Caps on what is read: JSON files are a few KB (a sharded index lists every tensor: ~100 KB for
# giant); weight files are ~4.5 GB for giant in fp32. A FIFO, a device such as /dev/zero, or a
# runaway file is refused before it is read (model.files).
MAX_JSON_BYTES = 16 << 20
MAX_WEIGHTS_BYTES = 64 << 30

# Wrappers that training checkpoints put around the backbone's own keys.
_PREFIXES = ("module.", "backbone.", "dinov2.", "model.", "encoder_model.")
# Tensors of the released files that inference never uses.
_IGNORED = re.compile(r"^(mask_token|embeddings\.mask_token|classifier\..*|head\..*|dino_head\..*|ibot_head\..*)$")


@dataclass(frozen=True)
class RawCheckpoint:
    tensors: dict[str, torch.Tensor]
    hf_config: dict | None  # contents of config.json when the source had one
    files: tuple[Path, ...]  # every file read, for fingerprints


def read_checkpoint(path: str | Path) -> RawCheckpoint:
    """Read all tensors (and config.json, if any) from a folder, `.safetensors`, or `.pth`/`.bin` file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weights not found: {path}")
    if path.is_dir():
        return _read_folder(path)
    return RawCheckpoint(_read_file(path), None, (path,))


def _read_json(path: Path, what: str) -> dict:
    """A JSON object from a regular file of at most MAX_JSON_BYTES."""
    try:
        data = json.loads(read_regular(path, max_bytes=MAX_JSON_BYTES))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable {what} ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} must hold a JSON object, got {type(data).__name__}")
    return data


def _shard_names(index: Path) -> list[str]:
    """The shard files an index lists, each a relative path inside the index's folder.

    A forged index could otherwise make us read `../../x.safetensors` or `/dev/...`: absolute
    names and `..` components are refused (checked on the names, not on resolved paths, because
    the Hugging Face cache legitimately links every file to a blob elsewhere).
    """
    weight_map = _read_json(index, "safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: not a safetensors index (no weight_map object)")
    names = set()
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not name.endswith(".safetensors"):
            raise CheckpointError(f"{index}: tensor {tensor!r} maps to {name!r}, expected a .safetensors file name")
        pure = PurePath(name)
        if pure.is_absolute() or ".." in pure.parts or "\\" in name or "\0" in name:
            raise CheckpointError(f"{index}: shard {name!r} of tensor {tensor!r} is outside the checkpoint folder")
        names.add(name)
    return sorted(names)


def _read_folder(folder: Path) -> RawCheckpoint:
    config_path = folder / "config.json"
    hf_config = _read_json(config_path, "config.json") if config_path.exists() else None
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = tuple(folder / name for name in _shard_names(index))
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{folder}: shards listed in the index are missing: {', '.join(missing)}")
    else:
        candidates = [folder / "model.safetensors", folder / "pytorch_model.bin"]
        candidates += sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.pth"))
        found = [c for c in candidates if c.exists()]
        if not found:
            raise CheckpointError(f"{folder}: no model.safetensors, pytorch_model.bin or .pth file")
        files = (found[0],)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(_read_file(f))
    return RawCheckpoint(tensors, hf_config, files)


def _not_a_checkpoint(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a DINOv2 checkpoint: {reason}")


def _one_line(e: BaseException) -> str:
    """The gist of a loader's error on one line. torch's weights_only refusal is a paragraph of
    advice around the one phrase that matters ("WeightsUnpickler error: Unsupported operand 255"),
    and its zip reader adds sentences of guesses after the first."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    line = lines[0]
    if len(line) > 100 and ". " in line:
        line = line.split(". ", 1)[0]
    return line.rstrip(".")


# What torch.load can read: a zip archive (torch.save since 1.6) or a legacy pickle (protocol 2+).
_TORCH_MAGICS = (b"PK\x03\x04", b"\x80")


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            # safetensors mmaps the path itself: make sure first that it is a regular file (a FIFO
            # would block the open, /dev/zero would be mapped and parsed without end).
            open_regular(path, max_bytes=MAX_WEIGHTS_BYTES).close()
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise _not_a_checkpoint(path, f"not a readable safetensors file ({_one_line(e)})") from e
    try:
        with open_regular(path, max_bytes=MAX_WEIGHTS_BYTES) as f:
            head = f.read(4)
            # A photo or a text file would otherwise reach the unpickler and fail with a KeyError
            # or a paragraph of torch's advice about weights_only.
            if not head:
                raise _not_a_checkpoint(path, "the file is empty")
            if not head.startswith(_TORCH_MAGICS):
                raise _not_a_checkpoint(path, f"neither a PyTorch file (zip or pickle) nor .safetensors (starts with {head!r})")
            f.seek(0)
            with warnings.catch_warnings():
                # A protocol-4 pickle (or random bytes after 0x80) draws a two-line UserWarning.
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses anything that would execute code on load.
        raise _not_a_checkpoint(path, f"refused to unpickle, only plain tensors are loaded ({_one_line(e)})") from e
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        # A corrupt pickle or zip fails in the unpickler's own ways (KeyError on an unknown memo
        # id, EOFError on a truncated file): all of them mean the same to the user.
        raise _not_a_checkpoint(path, f"not a readable PyTorch checkpoint ({_one_line(e) or type(e).__name__})") from e
    # Training checkpoints nest the weights ("teacher" holds the EMA backbone the paper releases).
    for key in ("teacher", "model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise _not_a_checkpoint(path, "expected a dict of tensors (a state dict)")
    return obj


def convert_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Hugging Face or original DINOv2 tensors to this package's names; fuse q/k/v."""
    tensors = _strip_prefixes(tensors)
    if any(k.startswith(("embeddings.", "encoder.layer.")) for k in tensors):
        return _convert_hf(tensors)
    return _convert_original(tensors)


def _strip_prefixes(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if tensors and all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
                changed = True
    # Classification wrappers keep the backbone under a prefix next to their head.
    for prefix in ("dinov2.", "backbone."):
        inner = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if inner:
            return inner
    return tensors


_HF_RENAMES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.(output\.dense|o_proj)\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.(fc[12])\.", r"blocks.\1.mlp.\2."),
    (r"^encoder\.layer\.(\d+)\.mlp\.(weights_in)\.", r"blocks.\1.mlp.w12."),
    (r"^encoder\.layer\.(\d+)\.mlp\.(weights_out|down_proj)\.", r"blocks.\1.mlp.w3."),
    (r"^layernorm\.", "norm."),
]
# Separate q/k/v (old names `attention.attention.query`, new names `attention.q_proj`) and split
# SwiGLU input projections (`gate_proj`, `up_proj`) are fused into one tensor each.
_HF_FUSED = re.compile(
    r"^encoder\.layer\.(\d+)\.(?:attention\.attention\.(query|key|value)|attention\.([qkv])_proj"
    r"|mlp\.(gate|up)_proj)\.(weight|bias)$"
)
_FUSE_ORDER = {"query": 0, "key": 1, "value": 2, "q": 0, "k": 1, "v": 2, "gate": 0, "up": 1}


def _convert_hf(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in tensors.items():
        fused = _HF_FUSED.match(key)
        if fused:
            layer, qkv_old, qkv_new, swiglu, param = fused.groups()  # param: "weight" or "bias"
            name = qkv_old or qkv_new or swiglu
            target = f"blocks.{layer}.{'mlp.w12' if swiglu else 'attn.qkv'}.{param}"
            parts.setdefault(target, {})[_FUSE_ORDER[name]] = value
            continue
        for pattern, replacement in _HF_RENAMES:
            new_key, n = re.subn(pattern, replacement, key)
            if n:
                out[new_key] = value
                break
        else:
            out[key] = value  # left for strict loading to report (or _IGNORED to drop)
    for target, pieces in parts.items():
        expected = 2 if ".mlp." in target else 3
        if sorted(pieces) != list(range(expected)):
            raise CheckpointError(f"incomplete projection {target}: found parts {sorted(pieces)} of {expected}")
        shapes = [tuple(pieces[i].shape) for i in range(expected)]
        if len(set(shapes)) != 1 or len(shapes[0]) not in (1, 2):
            # q, k and v (gate and up) are stacked along their rows: they must be alike.
            raise CheckpointError(f"cannot fuse {target}: its parts have shapes {shapes}")
        out[target] = torch.cat([pieces[i] for i in range(expected)], dim=0)
    return out


def _convert_original(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tensors.items():
        # Chunked FSDP checkpoints: blocks.<chunk>.<global index>.* -> blocks.<global index>.*
        out[re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)] = value
    return out


def drop_unused(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove tensors inference never reads (mask token, training heads)."""
    return {k: v for k, v in tensors.items() if not _IGNORED.match(k)}


_REQUIRED = object()


def _field(hf_config: dict, name: str, expected: type, default=_REQUIRED):
    """config.json field `name` of type `expected` (ints are not bools; floats accept ints)."""
    value = hf_config.get(name, default)
    if value is _REQUIRED:
        raise CheckpointError(f"config.json: {name} is missing")
    accepted = (int, float) if expected is float else (expected,)
    if isinstance(value, bool) != (expected is bool) or not isinstance(value, accepted):
        raise CheckpointError(f"config.json: {name} must be {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def _sized(hf_config: dict, name: str, low: int, high: int, default=_REQUIRED) -> int:
    value = _field(hf_config, name, int, default)
    if not low <= value <= high:
        raise CheckpointError(f"config.json: {name} must be in {low}..{high}, got {value}")
    return value


def config_from_hf(hf_config: dict) -> ViTConfig:
    """ViTConfig from a transformers `Dinov2Config` / `Dinov2WithRegistersConfig` dict.

    Every size is type- and range-checked here, naming the config.json field, before a model of
    that shape is ever built.
    """
    model_type = hf_config.get("model_type", "dinov2")
    if model_type not in ("dinov2", "dinov2_with_registers"):
        raise CheckpointError(f"config.json describes a {model_type!r} model, not DINOv2")
    if hf_config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"unsupported hidden_act {hf_config['hidden_act']!r} (DINOv2 uses exact 'gelu')")
    dim = _sized(hf_config, "hidden_size", *LIMITS["embed_dim"])
    depth = _sized(hf_config, "num_hidden_layers", *LIMITS["depth"])
    heads = _sized(hf_config, "num_attention_heads", *LIMITS["num_heads"])
    if dim % heads:
        raise CheckpointError(f"config.json: num_attention_heads {heads} does not divide hidden_size {dim}")
    patch = _sized(hf_config, "patch_size", *LIMITS["patch_size"], default=14)
    image_size = _sized(hf_config, "image_size", patch, patch * LIMITS["pos_grid"][1], default=518)
    ratio = _field(hf_config, "mlp_ratio", float, 4)
    if not 0 < ratio <= 64:  # also refuses NaN and inf, which Python's json accepts
        raise CheckpointError(f"config.json: mlp_ratio must be in (0, 64], got {ratio}")
    swiglu = _field(hf_config, "use_swiglu_ffn", bool, False)
    hidden = swiglu_hidden(dim, ratio) if swiglu else int(dim * ratio)
    low, high = LIMITS["mlp_hidden"]
    if not low <= hidden <= high:
        raise CheckpointError(f"config.json: mlp_ratio {ratio} gives an MLP width of {hidden}, expected {low}..{high}")
    registers = 0
    if model_type == "dinov2_with_registers":
        registers = _sized(hf_config, "num_register_tokens", *LIMITS["num_registers"], default=0)
    eps = _field(hf_config, "layer_norm_eps", float, 1e-6)
    if not 0 < eps < 1:
        raise CheckpointError(f"config.json: layer_norm_eps must be in (0, 1), got {eps}")
    return ViTConfig(
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        patch_size=patch,
        pos_grid=image_size // patch,
        num_registers=registers,
        mlp_hidden=hidden,
        ffn="swiglu" if swiglu else "mlp",
        layer_norm_eps=eps,
        qkv_bias=_field(hf_config, "qkv_bias", bool, True),
        interpolate_antialias=model_type == "dinov2_with_registers",
        in_chans=_sized(hf_config, "num_channels", *LIMITS["in_chans"], default=3),
    )


def _shape(tensors: dict[str, torch.Tensor], name: str, ndim: int) -> tuple[int, ...]:
    """The shape of tensor `name`, which must have `ndim` dimensions."""
    shape = tuple(tensors[name].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"tensor {name} has shape {shape}, expected {ndim} dimensions")
    return shape


def infer_config(tensors: dict[str, torch.Tensor]) -> ViTConfig:
    """Architecture from converted tensor shapes (no config.json): the `.pth` and bare-safetensors case.

    Only the shapes that define the architecture are read here; `check_compatible` then checks
    every tensor (fused q/k/v and SwiGLU projections included) against the model built from it.
    """
    required = ("cls_token", "pos_embed", "patch_embed.proj.weight")
    missing = [k for k in required if k not in tensors]
    if missing:
        raise CheckpointError(f"not a DINOv2 checkpoint: missing {', '.join(missing)}")
    dim = _shape(tensors, "cls_token", 3)[-1]  # (1, 1, D)
    _, in_chans, patch, _ = _shape(tensors, "patch_embed.proj.weight", 4)  # (D, C, p, p)
    n_pos = _shape(tensors, "pos_embed", 3)[1] - 1  # (1, 1 + grid * grid, D)
    grid = math.isqrt(max(n_pos, 0))
    if n_pos < 1 or grid * grid != n_pos:
        raise CheckpointError(f"pos_embed holds {n_pos} patch positions, not a square grid")
    depth = len({int(m.group(1)) for k in tensors if (m := re.match(r"blocks\.(\d+)\.", k))})
    if depth == 0:
        raise CheckpointError("not a DINOv2 checkpoint: no transformer blocks (blocks.N.*)")
    swiglu = "blocks.0.mlp.w12.weight" in tensors
    if swiglu:
        rows = _shape(tensors, "blocks.0.mlp.w12.weight", 2)[0]  # (2 * hidden, D): gate and up stacked
        if rows % 2:
            raise CheckpointError(f"tensor blocks.0.mlp.w12.weight has {rows} rows, expected an even number")
        hidden = rows // 2
    elif "blocks.0.mlp.fc1.weight" in tensors:
        hidden = _shape(tensors, "blocks.0.mlp.fc1.weight", 2)[0]  # (hidden, D)
    else:
        raise CheckpointError("not a DINOv2 checkpoint: blocks.0 has neither mlp.fc1 nor mlp.w12")
    registers = _shape(tensors, "register_tokens", 3)[1] if "register_tokens" in tensors else 0  # (1, R, D)
    if dim % HEAD_DIM:
        raise CheckpointError(f"cannot infer the head count of width {dim}; pass a config.json with the weights")
    try:
        return ViTConfig(
            embed_dim=dim,
            depth=depth,
            num_heads=dim // HEAD_DIM,
            patch_size=patch,
            pos_grid=grid,
            num_registers=registers,
            mlp_hidden=hidden,
            ffn="swiglu" if swiglu else "mlp",
            qkv_bias="blocks.0.attn.qkv.bias" in tensors,
            interpolate_antialias=registers > 0,
            in_chans=in_chans,
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"tensor shapes describe an impossible model: {e}") from e


def check_finite(tensors: dict[str, torch.Tensor], order) -> None:
    """Refuse weights with NaN or inf values (or of a non-float dtype), naming the first such tensor
    in `order`: they would silently turn every vector into NaN, which no search can rank."""
    for name in order:
        tensor = tensors[name]
        if not tensor.is_floating_point():
            raise CheckpointError(f"tensor {name} has dtype {tensor.dtype}, expected floating point")
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"tensor {name} holds {bad} NaN or infinite value(s); the weights are corrupt")


def check_compatible(expected: dict[str, torch.Size], tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming missing/unexpected keys and shape mismatches, if any."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [
        f"{k} {tuple(tensors[k].shape)} != {tuple(shape)}"
        for k, shape in expected.items()
        if k in tensors and tensors[k].shape != shape
    ]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if names:
            shown = ", ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{source} does not fit the architecture — " + "; ".join(problems))
