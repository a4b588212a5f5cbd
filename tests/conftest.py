"""Shared fixtures: tiny and full-size random DINOv2 checkpoints made with transformers, photos."""

from __future__ import annotations

import contextlib
import math
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pg import postgres_server, postgres_url, postgres_url_module  # noqa: F401  (a real PostgreSQL for the session)

warnings.filterwarnings("ignore", message=".*register_constant.*")


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request) -> str | None:
    """The catalog's URL for tests run on both backends: None (the library's own SQLite file), or a
    fresh database on the session's PostgreSQL server (skipped where none can run)."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_url")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def catalog_url_module(request) -> str | None:
    """`catalog_url` for a whole module: one PostgreSQL database shared by the module's tests (for a
    library built once per module)."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_url_module")


def url_args(url: str | None) -> list[str]:
    """The CLI options that select the catalog under test: `--url URL`, or none for SQLite."""
    return [] if url is None else ["--url", url]


def random_hf_model(*, registers=False, swiglu=False, hidden=128, layers=2, heads=2, image_size=98, seed=0):
    """A transformers reference model with every parameter random (not just the default init)."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    kwargs = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=14,
        use_swiglu_ffn=swiglu,
    )
    torch.manual_seed(seed)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **kwargs))
    else:
        model = Dinov2Model(Dinov2Config(**kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambda1"):
                p.uniform_(0.1, 1.0)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.ndim >= 2 and "embeddings" not in name:
                fan_in = math.prod(p.shape[1:])
                p.normal_(0, fan_in**-0.5)
            else:
                p.normal_(0, 0.1)
    return model.eval()


def save_hf(model, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    return folder


def hf_to_original(state: dict[str, torch.Tensor], chunks: int = 0) -> dict[str, torch.Tensor]:
    """Rename a transformers state dict to the facebookresearch `.pth` layout (independently of ours)."""
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    per_chunk = math.ceil(depth / chunks) if chunks else 0
    out = {}
    simple = {
        "embeddings.cls_token": "cls_token",
        "embeddings.mask_token": "mask_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.register_tokens": "register_tokens",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    for k, v in state.items():
        if k in simple:
            out[simple[k]] = v
    for i in range(depth):
        src = f"encoder.layer.{i}."
        dst = f"blocks.{i // per_chunk}.{i}." if chunks else f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"norm1.{kind}"] = state[src + f"norm1.{kind}"]
            out[dst + f"norm2.{kind}"] = state[src + f"norm2.{kind}"]
            out[dst + f"attn.qkv.{kind}"] = torch.cat(
                [state[src + f"attention.attention.{n}.{kind}"] for n in ("query", "key", "value")]
            )
            out[dst + f"attn.proj.{kind}"] = state[src + f"attention.output.dense.{kind}"]
            if src + f"mlp.weights_in.{kind}" in state:
                out[dst + f"mlp.w12.{kind}"] = state[src + f"mlp.weights_in.{kind}"]
                out[dst + f"mlp.w3.{kind}"] = state[src + f"mlp.weights_out.{kind}"]
            else:
                out[dst + f"mlp.fc1.{kind}"] = state[src + f"mlp.fc1.{kind}"]
                out[dst + f"mlp.fc2.{kind}"] = state[src + f"mlp.fc2.{kind}"]
        out[dst + "ls1.gamma"] = state[src + "layer_scale1.lambda1"]
        out[dst + "ls2.gamma"] = state[src + "layer_scale2.lambda1"]
    return out


def hub_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors exactly as save_pretrained wrote them (hub names)."""
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def synthetic_photo(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Smooth gradients, a few shapes and noise: photo-like enough for resampling and embeddings."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for c in range(3):
        fx, fy, phase = rng.uniform(0.5, 4, 2).tolist() + [rng.uniform(0, 6.28)]
        channels.append(127 + 100 * np.sin(fx * 6.28 * x / width + fy * 6.28 * y / height + phase))
    img = np.stack(channels, axis=-1)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.3) * min(width, height)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 8, img.shape)
    image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    return image if mode == "RGB" else image.convert(mode)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny plain (MLP, no registers) HF checkpoint folder."""
    return save_hf(random_hf_model(), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def small_folder(tmp_path_factory) -> Path:
    """Full-size ViT-S/14 with random weights, saved as the Hub repo would hold it."""
    return save_hf(
        random_hf_model(hidden=384, layers=12, heads=6, image_size=518, seed=1), tmp_path_factory.mktemp("small")
    )


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    sizes = [(640, 480), (333, 517), (1024, 229), (225, 225), (401, 300), (259, 1001), (512, 512), (300, 257)]
    return [synthetic_photo(w, h, seed=i) for i, (w, h) in enumerate(sizes)]


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: SIGALRM interrupts a blocked open() or read()."""

    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def catalog_at_revision(root: Path, revision: str, *statements: str) -> Path:
    """The catalog an older dinoseek left in `root`/.dinoseek: migrated up to `revision` only, with
    `statements` (SQL) run on it. Returns the catalog file."""
    from alembic import command
    from sqlalchemy import create_engine

    from dinoseek.indexer import migrate

    folder = root / ".dinoseek"
    folder.mkdir(parents=True)
    catalog = folder / "catalog.sqlite"
    engine = create_engine(f"sqlite:///{catalog}")
    with engine.begin() as connection:
        config = migrate._config()
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
        for statement in statements:
            connection.exec_driver_sql(statement)
    engine.dispose()
    return catalog
