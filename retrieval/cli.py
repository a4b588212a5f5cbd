"""The `dinoseek` command line. The only module that imports click; library errors become one line."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import click

from model import PRECISIONS, PRESETS, ModelError


def _translate_errors(func):
    """Library errors -> `Error: ...` and exit 1, with no traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (ModelError, ValueError) as e:
            raise click.ClickException(str(e)) from e

    return wrapper


def model_options(func):
    """--model/--weights/--device/--precision, shared by every command that embeds."""
    options = [
        click.option("--model", "model_name", type=click.Choice(sorted(PRESETS)), default="small", show_default=True,
                     help="DINOv2 preset; its weights come from the Hugging Face cache."),
        click.option("--weights", type=click.Path(exists=True, path_type=Path),
                     help="Local weights instead: an HF folder, .safetensors or original .pth file."),
        click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N]."),
        click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
                     help="auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log progress to stderr.")
@click.version_option(package_name="dinoseek")
def main(verbose: bool) -> None:
    """Search and de-duplicate photo libraries with DINOv2 embeddings."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@model_options
@click.option("--mode", type=click.Choice(["crop", "full"]), default="crop", show_default=True,
              help="crop: the reference 256/224 center crop. full: the whole frame resized to --size.")
@click.option("--size", type=int, default=224, show_default=True, help="Input side in pixels (multiple of 14 for full).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write cls/patch arrays to this .npz file.")
@click.option("--json", "as_json", is_flag=True, help="Print the vectors as JSON.")
@_translate_errors
def embed(images, model_name, weights, device, precision, mode, size, out, as_json):
    """Embed IMAGES and print (or save) their CLS and pooled-patch vectors.

    \b
    Example:
      dinoseek embed --weights ./dinov2-small photo1.jpg photo2.png --out vectors.npz
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from model import Encoder

    encoder = Encoder.from_pretrained(weights or model_name, device=device, precision=precision, mode=mode, size=size)
    pictures = []
    for path in images:
        try:
            with Image.open(path) as image:
                image.load()
                pictures.append(image.copy())
        except (UnidentifiedImageError, OSError) as e:
            raise click.ClickException(f"cannot decode {path}: {e}") from e
    vectors = encoder.embed(pictures)
    if out:
        np.savez(out, paths=np.array([str(p) for p in images]), cls=vectors.cls, patch=vectors.patch)
    if as_json:
        rows = [
            {"path": str(p), "cls": c.tolist(), "patch": q.tolist()}
            for p, c, q in zip(images, vectors.cls, vectors.patch)
        ]
        click.echo(json.dumps(rows))
    elif not out:
        for path, c in zip(images, vectors.cls):
            click.echo(f"{path}\tdim={c.shape[0]}\tcls[:4]={np.round(c[:4], 4).tolist()}")
    else:
        click.echo(f"wrote {len(images)} vectors of dim {encoder.dim} ({encoder.precision}) to {out}")
