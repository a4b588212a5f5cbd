"""The `dinoseek` command line. The only module that imports click; library errors become one line."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import click

from indexer.errors import IndexerError
from model import PRECISIONS, PRESETS, ModelError


def _translate_errors(func):
    """Library errors -> `Error: ...` and exit 1, with no traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (ModelError, IndexerError, ValueError) as e:
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


def library_options(func):
    """ROOT plus --library/--url, shared by every command that opens a library."""
    options = [
        click.argument("root", type=click.Path(file_okay=False, path_type=Path), default=".", required=False),
        click.option("--library", "library_dir", type=click.Path(file_okay=False, path_type=Path),
                     help="Library folder (default: ROOT/.dinoseek)."),
        click.option("--url", help="SQLAlchemy URL of the catalog instead of the library's SQLite file."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@main.command()
@library_options
@model_options
@click.option("--workers", type=int, default=None, help="Decoding processes (default: CPU cores - 1; 0 = in-process).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Images per encoder batch.")
@click.option("--index", "index_choice", default="auto", show_default=True,
              help="auto (exact, then IVF-SQ8/PQ as the library grows) or a FAISS factory string.")
@click.option("--mode", type=click.Choice(["crop", "full"]), default="crop", show_default=True,
              help="Preprocessing for new libraries (recorded in the library's model manifest).")
@click.option("--include", multiple=True, help="Only paths matching this glob (repeatable).")
@click.option("--exclude", multiple=True, help="Skip paths matching this glob (repeatable).")
@click.option("--follow-symlinks", is_flag=True, help="Follow symbolic links (loop-safe).")
@click.option("--allow-mass-delete", is_flag=True, help="Let a run drop more than half of the library.")
@click.option("--checkpoint-seconds", type=float, default=60.0, show_default=True,
              help="How often the FAISS files are checkpointed during a run.")
@_translate_errors
def index(root, library_dir, url, model_name, weights, device, precision, workers, batch_size, index_choice, mode,
          include, exclude, follow_symlinks, allow_mass_delete, checkpoint_seconds):
    """Index the photos under ROOT: new and changed files are embedded, removed ones dropped.

    \b
    Example:
      dinoseek index ~/Pictures --weights ./dinov2-small --workers 4
    """
    import time

    from indexer.library import Library
    from indexer.pipeline import Options, run_index
    from model import Encoder

    if not root.is_dir():
        raise click.ClickException(f"{root} is not a folder (unmounted disk?)")
    options = Options(batch_size=batch_size, include=include, exclude=exclude, follow_symlinks=follow_symlinks,
                      allow_mass_delete=allow_mass_delete, checkpoint_seconds=checkpoint_seconds)
    if workers is not None:
        options.workers = workers
    with Library.open(root, folder=library_dir, url=url, write=True, create=True, index=index_choice) as library:
        encoder = Encoder.from_pretrained(weights or model_name, device=device, precision=precision, mode=mode)
        started = time.monotonic()
        bar = None

        def on_progress(progress):
            nonlocal bar
            if bar is None:
                bar = click.progressbar(length=progress.total, label="embedding", show_eta=True, show_pos=True,
                                        file=click.get_text_stream("stderr"))
                bar.__enter__()
            rate = progress.done / max(time.monotonic() - started, 1e-9)
            bar.label = f"embedding ({rate:.1f} img/s)"
            bar.update(1)

        try:
            counts = run_index(library, encoder, options, on_progress)
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)
    seconds = time.monotonic() - started
    click.echo(f"{counts['embedded']} embedded, {counts['moved']} moved, {counts['failed']} failed, "
               f"{counts['deleted']} removed, {counts['scanned']} files seen in {seconds:.1f}s")


@main.command()
@library_options
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@_translate_errors
def info(root, library_dir, url, as_json):
    """Show a library: counts by status, errors with reasons, model, indexes.

    \b
    Example:
      dinoseek info ~/Pictures --json
    """
    from indexer.library import Library

    with Library.open(root, folder=library_dir, url=url) as library:
        data = library.info()
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    click.echo(f"library {data['library']} for {data['root']}: {data['total']} files")
    for status, count in sorted(data["counts"].items()):
        click.echo(f"  {status:<13}{count}")
    model = data["model"]
    if model:
        arch = model["arch"]
        click.echo(f"model: ViT {arch['embed_dim']}-d, {arch['depth']} blocks, {arch['num_registers']} registers, "
                   f"{model['precision']}, weights sha256 {model['weights_sha256'][:12]}")
    for kind, idx in data["indexes"].items():
        click.echo(f"index {kind}: {idx['factory']}, {idx['vectors']} vectors, {idx['bytes'] / 1e6:.1f} MB")
    for error in data["errors"]:
        click.echo(f"  {error['status']}: {error['path']}: {error['reason']}")


@main.command()
@library_options
@click.option("--repair", is_flag=True, help="Rebuild or reconcile the indexes from the catalog.")
@_translate_errors
def verify(root, library_dir, url, repair):
    """Check that the FAISS indexes hold exactly the catalog's vectors (exit 1 if not).

    \b
    Example:
      dinoseek verify ~/Pictures --repair
    """
    from indexer.library import Library

    with Library.open(root, folder=library_dir, url=url, write=repair) as library:
        problems = library.verify()
        if problems and repair:
            library.load_indexes()
            problems = library.verify()
    for problem in problems:
        click.echo(problem)
    if problems:
        raise click.ClickException(f"{len(problems)} problem(s); run `dinoseek verify --repair`")
    click.echo("ok: catalog and indexes agree")


if __name__ == "__main__":
    main()
