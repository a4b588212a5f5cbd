"""The `dinoseek` command line. The only module that imports click; library errors become one line."""

from __future__ import annotations

import functools
import json
import logging
import math
import shlex
from pathlib import Path

import click

from dinoseek.indexer.decode import printable
from dinoseek.indexer.errors import IndexerError, ModelMismatchError, NeedsRepairError, NotIndexedError, SweepRefusedError
from dinoseek.model import (
    PRECISIONS,
    PRESETS,
    DeviceUnavailableError,
    ModelError,
    PrecisionUnsupportedError,
    WeightsNotFoundError,
)
from dinoseek.model.preprocess import MAX_SIZE, MIN_SIZE
from dinoseek.retrieval.errors import ActionError, InvalidArgumentError, RetrievalError

# Every message and line built from file names is escaped by the one function the library uses too.
_shown = printable


class _Float(click.FloatRange):
    """click.FloatRange that also refuses NaN, which compares False with both bounds and would
    slip through (a NaN threshold matches nothing, a NaN interval never elapses)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{value!r} is not a number.", param, ctx)
        return number


# Bounds on user numbers, checked by click before anything runs (a one-line usage error, exit 2).
_COUNT64 = click.IntRange(0, 2**63 - 1)  # bytes and pixels: the catalog stores 64-bit integers
_TOP_K = click.IntRange(1, 10_000)  # results per query: FAISS allocates k slots per query up front
_SIMILARITY = _Float(0, 1, min_open=True)  # cosine similarity of unit vectors; 0 would match everything


def _root_arg(root) -> str:
    """A library root as the user would type it again in a suggested command: printable, and quoted
    for the shell when it has spaces or other special characters."""
    return shlex.quote(_shown(root if root is not None else "."))


def _hint(e: Exception, root=None) -> str | None:
    """How to fix `e` on this command line. Library messages state the problem in words that serve
    Python callers too; the options and commands that fix it are named here, with the ROOT the
    user passed (`root`, from the command's arguments) so the suggestion can be run as it is."""
    if isinstance(e, DeviceUnavailableError):
        return "use --device cpu"
    if isinstance(e, PrecisionUnsupportedError):
        return "use --precision fp16"
    if isinstance(e, WeightsNotFoundError):
        return "pass a local copy with --weights PATH (a Hugging Face folder, .safetensors or .pth file)"
    if isinstance(e, ModelMismatchError):
        return "use the same --model/--weights, or a new --library"
    if isinstance(e, NotIndexedError):
        return f"run `dinoseek index {_root_arg(root if root is not None else e.root)}` first"
    if isinstance(e, NeedsRepairError):
        return f"run `dinoseek verify {_root_arg(root if root is not None else e.root)} --repair`"
    if isinstance(e, SweepRefusedError):
        return "pass --allow-mass-delete if they really were removed"
    if isinstance(e, ActionError):
        return f"`dinoseek undo {_root_arg(root)}` restores them"
    return None


def _message(e: Exception, root=None) -> str:
    """The one line a library error becomes: an argument at fault named by the option the user
    typed for it (`--in-folder`, not `folder`), then the fix."""
    text = str(e)
    if isinstance(e, InvalidArgumentError) and e.argument:
        ctx = click.get_current_context(silent=True)
        params = ctx.command.params if ctx else ()
        options = [p for p in params if isinstance(p, click.Option) and p.name == e.argument]
        if options:
            text = f"{options[0].opts[0]} {e.problem}"
    hint = _hint(e, root)
    return f"{text}; {hint}" if hint else text


def _translate_errors(func):
    """The project's errors -> `Error: ...` and exit 1, with no traceback. Anything else (a plain
    ValueError from numpy, say) is a bug and keeps its traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from sqlalchemy.exc import SQLAlchemyError

        try:
            return func(*args, **kwargs)
        except BrokenPipeError:  # `dinoseek info | head`: the reader has what it wanted
            _quiet_broken_pipe()
        except (ModelError, IndexerError, RetrievalError) as e:
            raise click.ClickException(_shown(_message(e, kwargs.get("root")))) from e
        except OSError as e:  # disk full, permissions on the library folder, ...
            raise click.ClickException(_shown(f"{e.filename or 'file system'}: {e.strerror or e}")) from e
        except SQLAlchemyError as e:
            reason = str(e.orig if hasattr(e, "orig") else e).splitlines()[0]
            raise click.ClickException(_shown(f"catalog error: {reason}")) from e

    return wrapper


def _quiet_broken_pipe() -> None:
    """Exit 0 without the interpreter's own complaint when flushing stdout at exit (Python docs,
    "Note on SIGPIPE")."""
    import os
    import sys

    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)


class _Date(click.ParamType):
    """A date or datetime in a form parse_capture_time accepts; the message is the library's."""

    name = "date"

    def convert(self, value, param, ctx):
        from dinoseek.indexer.catalog_gateway import parse_capture_time

        try:
            return parse_capture_time(value)
        except IndexerError as e:
            self.fail(str(e), param, ctx)


def model_options(func):
    """--model/--weights/--device/--precision, shared by every command that embeds."""
    options = [
        click.option("--model", "model_name", type=click.Choice(sorted(PRESETS)), default="small", show_default=True,
                     help="DINOv2 preset; its weights come from the Hugging Face cache."),
        click.option("--weights", type=click.Path(exists=True, path_type=Path),
                     help="Local weights instead: an HF folder, .safetensors or original .pth file."),
        click.option("--device", default="auto", show_default=True,
                     help="auto (CUDA, else Apple MPS, else cpu), cpu, cuda[:N] or mps."),
        click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
                     help="auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


class _Interrupted(click.ClickException):
    """Ctrl-C: one line and exit 130 (128 + SIGINT, as shells report it), never a traceback."""

    exit_code = 130

    def show(self, file=None) -> None:
        click.echo("Aborted!", err=True)


class _LogFormatter(logging.Formatter):
    """Log lines reach the terminal too, and library code logs file and folder names."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return _shown(super().formatMessage(record))


def _verbose_after_command(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        logging.getLogger().setLevel(logging.INFO)


class _Group(click.Group):
    """The `dinoseek` group: the one place every command's errors pass through on their way out."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        # `dinoseek index ROOT -v` works as well as `dinoseek -v index ROOT`.
        cmd.params.append(click.Option(["-v", "--verbose"], is_flag=True, expose_value=False,
                                       callback=_verbose_after_command, help="Log progress to stderr."))
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.ClickException as e:
            # Messages name files (click's own "Path '...' does not exist" too): escape them here,
            # once for all commands, so no error line can carry a terminal control sequence.
            e.message = _shown(e.message)
            raise
        except KeyboardInterrupt:
            # Library code cleans up on the way out (a run is recorded as failed, locks released);
            # what is left is a consistent library that the next run completes.
            raise _Interrupted("interrupted") from None


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="Log progress to stderr.")
@click.version_option(package_name="dinoseek")
def main(verbose: bool) -> None:
    """Search and de-duplicate photo libraries with DINOv2 embeddings."""
    handler = logging.StreamHandler()
    handler.setFormatter(_LogFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@model_options
@click.option("--mode", type=click.Choice(["crop", "full"]), default="crop", show_default=True,
              help="crop: the reference 256/224 center crop. full: the whole frame resized to --size.")
@click.option("--size", type=click.IntRange(MIN_SIZE, MAX_SIZE), default=224, show_default=True,
              help="Input side in pixels (multiple of 14 for full).")
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

    from dinoseek.indexer.decode import DecodeError, load_pixels
    from dinoseek.model import Encoder

    encoder = Encoder.from_pretrained(weights or model_name, device=device, precision=precision, mode=mode, size=size)
    pixels = []
    for path in images:
        # The indexer's own path from file to pixels: format allowlist (no EPS handed to
        # Ghostscript), bomb and size limits, regular files only, EXIF orientation, the encoder's
        # decode size — so a file gets the same vector here as from `dinoseek index`.
        try:
            pixels.append(load_pixels(path, encoder.input_spec)[1])
        except DecodeError as e:
            raise click.ClickException(f"cannot decode {_shown(path)}: {e.reason}") from e
    vectors = encoder.embed_pixels(np.stack(pixels))
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
            click.echo(f"{_shown(path)}\tdim={c.shape[0]}\tcls[:4]={np.round(c[:4], 4).tolist()}")
    else:
        click.echo(f"wrote {len(images)} vectors of dim {encoder.dim} ({encoder.precision}) to {_shown(out)}")


def _found_root(name: str):
    """A command whose ROOT (`name`, as the user types it) was omitted runs on the library found from
    the current folder upwards, as git finds its repository; resolved before the command runs, so
    hints name it. An explicit ROOT, --library or --url is used as given (ROOT then defaults to `.`)."""

    def decorator(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            if kwargs["root"] is None:
                if kwargs["library_dir"] is not None or kwargs["url"] is not None:
                    kwargs["root"] = Path(".")
                else:
                    from dinoseek.indexer.library import find_library_root

                    here = Path.cwd()
                    kwargs["root"] = find_library_root(here)
                    if kwargs["root"] is None:
                        raise click.ClickException(_shown(
                            f"no library in {here} or any folder above it; pass {name} or run `dinoseek index`"))
            return func(*args, **kwargs)

        return wrapper

    return decorator


def library_options(func=None, *, find: bool = True):
    """ROOT plus --library/--url, shared by every command that opens a library. Without ROOT, the
    library is found from the current folder upwards; with find=False (`index`) it is the current folder."""
    if func is None:
        return functools.partial(library_options, find=find)
    options = [
        click.argument("root", type=click.Path(file_okay=False, path_type=Path), default=None if find else ".",
                       required=False),
        click.option("--library", "library_dir", type=click.Path(file_okay=False, path_type=Path),
                     help="Library folder (default: ROOT/.dinoseek)."),
        click.option("--url", help="SQLAlchemy URL of the catalog instead of the library's SQLite file."),
    ]
    if find:
        func = _found_root("ROOT")(func)
    for option in reversed(options):
        func = option(func)
    return func


@main.command()
@library_options(find=False)
@model_options
@click.option("--workers", type=click.IntRange(0, 1024), default=None,
              help="Decoding processes (default: CPU cores - 1; 0 = in-process).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32, show_default=True,
              help="Images per encoder batch.")
@click.option("--index", "index_choice", default=None,
              help="auto (exact, then IVF-SQ8/PQ as the library grows; the default) or a FAISS factory "
                   "string; remembered for later runs.")
@click.option("--mode", type=click.Choice(["crop", "full"]), default=None,
              help="Preprocessing of a new library [default: crop]; an existing one keeps the mode it recorded.")
@click.option("--include", multiple=True, help="Only paths matching this glob (repeatable).")
@click.option("--exclude", multiple=True, help="Skip paths matching this glob (repeatable).")
@click.option("--follow-symlinks", is_flag=True, help="Follow symbolic links (loop-safe).")
@click.option("--allow-mass-delete", is_flag=True, help="Let a run drop more than half of the library.")
@click.option("--checkpoint-seconds", type=_Float(0, 7 * 86400), default=60.0, show_default=True,
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

    from dinoseek.indexer.library import Library
    from dinoseek.indexer.pipeline import Options, run_index
    from dinoseek.indexer.store import check_factory
    from dinoseek.model import check_settings, encoder_for_library, load_weights

    if not root.is_dir():
        raise click.ClickException(f"{_shown(root)} is not a folder (unmounted disk?)")
    options = Options(batch_size=batch_size, include=include, exclude=exclude, follow_symlinks=follow_symlinks,
                      allow_mass_delete=allow_mass_delete, checkpoint_seconds=checkpoint_seconds)
    if workers is not None:
        options.workers = workers
    # The model first: its width is what a FAISS factory string is checked against, and bad
    # settings, weights or --index must fail before a library folder is created.
    check_settings(device=device, precision=precision, mode=mode or "crop")
    loaded = load_weights(weights or model_name)
    if index_choice not in (None, "auto"):
        check_factory(index_choice, loaded.vit.config.embed_dim)
    with Library.open(root, folder=library_dir, url=url, write=True, create=True, index_choice=index_choice) as library:
        # Only now is the library's recorded preprocessing known, which an existing library keeps.
        encoder = encoder_for_library(library.manifest(), loaded, device=device, precision=precision, mode=mode)
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
    from dinoseek.indexer.library import Library

    with Library.open(root, folder=library_dir, url=url) as library:
        data = library.info()
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    click.echo(f"library {_shown(data['library'])} for {_shown(data['root'])}: {data['total']} files")
    for status, count in sorted(data["counts"].items()):
        click.echo(f"  {status:<13}{count}")
    model = data["model"]
    if model:
        arch = model["arch"]
        click.echo(f"model: ViT {arch['embed_dim']}-d, {arch['depth']} blocks, {arch['num_registers']} registers, "
                   f"{model['precision']}, weights sha256 {model['weights_sha256'][:12]}")
    for kind, idx in data["indexes"].items():
        click.echo(f"index {kind}: {_shown(idx['factory'])}, {idx['vectors']} vectors, {idx['bytes'] / 1e6:.1f} MB")
    for error in data["errors"]:
        click.echo(f"  {error['status']}: {_shown(error['path'])}: {_shown(error['reason'])}")


@main.command()
@library_options
@click.option("--repair", is_flag=True, help="Drop rows with damaged vectors (the next index run embeds them "
                                             "again) and rebuild or reconcile the indexes from the catalog.")
@click.option("--json", "as_json", is_flag=True, help="Print the problems as JSON.")
@_translate_errors
def verify(root, library_dir, url, repair, as_json):
    """Check the catalog (SQLite integrity, every stored vector) and that the FAISS indexes hold
    exactly the catalog's vectors (exit 1 if not).

    \b
    Example:
      dinoseek verify ~/Pictures --repair
    """
    from dinoseek.indexer.library import Library

    dropped = 0
    with Library.open(root, folder=library_dir, url=url, write=repair) as library:
        problems = library.verify()
        if problems and repair:
            dropped = library.repair()
            problems = library.verify()
    if as_json:
        click.echo(json.dumps({"ok": not problems, "problems": problems, **({"dropped": dropped} if repair else {})}))
    else:
        for problem in problems:
            click.echo(_shown(problem))
    if problems:
        damaged = any(p.startswith("catalog:") for p in problems)  # no repair in place: a backup is needed
        raise click.ClickException(f"{len(problems)} problem(s); " + (
            "the catalog file itself is damaged (see above)" if damaged else
            f"run `dinoseek verify {_root_arg(root)} --repair`"))
    if dropped and not as_json:
        click.echo(f"{dropped} images with damaged vectors dropped: run `dinoseek index {_root_arg(root)}` to embed "
                   f"them again")
    if not as_json:
        click.echo("ok: catalog and indexes agree")


def filter_options(func):
    """SQL pre-filters shared by search, similar and dedup."""
    options = [
        click.option("--folder", help="Only images under this folder (relative to ROOT)."),
        click.option("--after", "captured_after", type=_Date(), help="Captured on or after this date (YYYY-MM-DD, YYYY/MM/DD or YYYY-MM-DDTHH:MM[:SS])."),
        click.option("--before", "captured_before", type=_Date(), help="Captured before this date or time (exclusive; same forms as --after)."),
        click.option("--camera", help="Camera make/model contains this text."),
        click.option("--min-pixels", type=_COUNT64, help="At least this many pixels (width x height)."),
        click.option("--min-bytes", type=_COUNT64, help="Files of at least this many bytes."),
        click.option("--max-bytes", type=_COUNT64, help="Files of at most this many bytes."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _filters(kwargs: dict):
    from dinoseek.retrieval.api import Filters

    names = ("folder", "captured_after", "captured_before", "camera", "min_pixels", "min_bytes", "max_bytes")
    return Filters(**{n: kwargs.pop(n) for n in names})


def _print_hits(hits, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([h.to_dict() for h in hits], indent=2))
        return
    for hit in hits:
        click.echo(f"{hit.score:.4f}  {_shown(hit.path)}")


@main.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--root", type=click.Path(file_okay=False, path_type=Path),
              help="The indexed photo folder [default: the nearest folder with a library, from here upwards].")
@click.option("--library", "library_dir", type=click.Path(file_okay=False, path_type=Path), help="Library folder.")
@click.option("--url", help="SQLAlchemy URL of the catalog.")
@model_options
@click.option("-k", "--top", "k", type=_TOP_K, default=10, show_default=True, help="Number of results.")
@click.option("--kind", type=click.Choice(["cls", "patch", "both"]), default="cls", show_default=True,
              help="Which vectors to compare: global (cls), pooled patches, or their average.")
@filter_options
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@_found_root("--root")
@_translate_errors
def search(image, root, library_dir, url, model_name, weights, device, precision, k, kind, as_json, **filters):
    """Find the photos in the library most similar to IMAGE (any file, indexed or not).

    \b
    Example:
      dinoseek search query.jpg --root ~/Pictures --weights ./dinov2-small -k 20 --after 2023-01-01
    """
    from dinoseek.retrieval.api import open_library

    with open_library(root, folder=library_dir, url=url, model=None if weights else model_name, weights=weights,
                      device=device, precision=precision) as lib:
        hits = lib.search(image, k=k, kind=kind, filters=_filters(filters))
    _print_hits(hits, as_json)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--root", type=click.Path(file_okay=False, path_type=Path),
              help="The indexed photo folder [default: the nearest folder with a library, from here upwards].")
@click.option("--library", "library_dir", type=click.Path(file_okay=False, path_type=Path), help="Library folder.")
@click.option("--url", help="SQLAlchemy URL of the catalog.")
@click.option("-k", "--top", "k", type=_TOP_K, default=10, show_default=True, help="Number of results.")
@click.option("--kind", type=click.Choice(["cls", "patch", "both"]), default="cls", show_default=True)
@filter_options
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@_found_root("--root")
@_translate_errors
def similar(path, root, library_dir, url, k, kind, as_json, **filters):
    """Find the photos most similar to PATH, an image already in the library (no model needed).

    \b
    Example:
      dinoseek similar ~/Pictures/2023/IMG_0042.jpg --root ~/Pictures --json
    """
    from dinoseek.retrieval.api import open_library

    with open_library(root, folder=library_dir, url=url) as lib:
        hits = lib.similar(path, k=k, kind=kind, filters=_filters(filters))
    _print_hits(hits, as_json)


@main.command()
@library_options
@click.option("--threshold", type=_SIMILARITY, default=None,
              help="Similarity for near duplicates, in (0, 1] [default: 0.95].")
@click.option("--kind", type=click.Choice(["cls", "patch"]), default="cls", show_default=True)
@click.option("--exact", "exact_only", is_flag=True, help="Only byte-identical copies.")
@click.option("--keep", "keep_order", default="protected,resolution,size,oldest,format", show_default=True,
              help="Keep rules, in order of priority.")
@click.option("--protect", "protected", multiple=True,
              help="Folder (under ROOT) whose copies are always the ones kept (repeatable).")
@click.option("--in-folder", "folder",
              help="Only groups with a member under this folder (each group is shown and acted on whole).")
@click.option("--crops", is_flag=True, help="Re-rank candidates with patch tokens so crops group with their "
                                             "source (re-reads those files; needs --model/--weights).")
@click.option("--candidates", "candidate_threshold", type=_SIMILARITY,
              help="With --crops: lowest global similarity to re-rank [default: threshold - 0.15].")
@model_options
@click.option("--action", type=click.Choice(["report", "move", "hardlink", "symlink"]), default="report",
              show_default=True, help="What --apply does to the copies that are not kept.")
@click.option("--apply", "do_apply", is_flag=True, help="Carry out the action (default: a dry-run plan only).")
@click.option("--quarantine", type=click.Path(file_okay=False, path_type=Path),
              help="Where moved copies go (default: the library's quarantine folder).")
@click.option("--report", "report_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the groups to a .json, .csv or .html file.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--exit-code", is_flag=True,
              help="Exit 1 if duplicates were found, 0 if none (as `git diff --exit-code`). Errors exit 1 too "
                   "(usage errors 2), with an `Error:` line on stderr.")
@_translate_errors
def dedup(root, library_dir, url, threshold, kind, exact_only, keep_order, protected, folder, crops,
          candidate_threshold, model_name, weights, device, precision, action, do_apply, quarantine, report_file,
          as_json, exit_code):
    """Find duplicate groups; with --action and --apply, set the extra copies aside (undoably).

    Nothing changes on disk without --apply. Applying moves the copies that are not kept into a
    quarantine folder (paths preserved), or replaces them by links to the kept copy; every step is
    journaled, and `dinoseek undo` restores them.

    \b
    Example:
      dinoseek dedup ~/Pictures --report dups.html
      dinoseek dedup ~/Pictures --threshold 0.97 --protect originals --action move --apply
    """
    from dinoseek.indexer.library import Library
    from dinoseek.retrieval import actions
    from dinoseek.retrieval.dedup import DEFAULT_THRESHOLD, find_duplicates
    from dinoseek.retrieval.report import to_json, write_report

    # `is None`, not `or`: a threshold the user typed is never swapped for the default.
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    if candidate_threshold is not None and not crops:
        raise click.BadParameter("only means something with --crops", param_hint="'--candidates'")
    if candidate_threshold is not None and candidate_threshold > threshold:
        raise click.BadParameter(f"{candidate_threshold} is above the --threshold {threshold}; candidates for "
                                 f"re-ranking are the pairs below it", param_hint="'--candidates'")
    order = tuple(r.strip() for r in keep_order.split(",") if r.strip())
    with Library.open(root, folder=library_dir, url=url, write=do_apply) as library:
        crop_encoder = None
        if crops:
            from dinoseek.model import encoder_for_library

            crop_encoder = encoder_for_library(library.manifest(), weights or model_name, device=device,
                                               precision=precision)
            library.check_model(crop_encoder.manifest())
        groups = find_duplicates(library, threshold=threshold, kind=kind, exact_only=exact_only,
                                 order=order, protected=protected, folder=folder, crop_encoder=crop_encoder,
                                 candidate_threshold=candidate_threshold)
        if report_file:
            write_report(groups, report_file, library.root, action)
        if as_json:
            click.echo(to_json(groups, action))
        else:
            for number, group in enumerate(groups, 1):
                click.echo(f"group {number} ({group.kind}, min similarity {group.min_similarity:.3f}): "
                           f"keep {_shown(group.keeper.path)} — {_shown(group.reason)}")
                for member in group.others:
                    click.echo(f"    {action if action != 'report' else 'duplicate'}: {_shown(member.path)}")
            extra = sum(len(g.others) for g in groups)
            click.echo(f"{len(groups)} groups, {extra} files {'to act on' if action != 'report' else 'duplicated'}"
                       + ("" if do_apply or action == "report" else " (dry run: add --apply)"))
        if do_apply:
            if action == "report":
                raise click.ClickException("--apply needs --action move, hardlink or symlink")
            result = actions.apply(library, groups, action, quarantine)
            for group, why in result.skipped:
                click.echo(f"skipped group keeping {_shown(group.keeper.path)}: {_shown(why)}", err=True)
            for path, why in result.skipped_files:
                click.echo(f"skipped {_shown(path)}: {_shown(why)}", err=True)
            if result.journal is None:  # no journal written: `undo` still finds the previous one
                click.echo(f"0 files {actions.PAST[action]}; nothing to undo")
            else:
                click.echo(f"{len(result.done)} files {actions.PAST[action]}; journal {_shown(result.journal)} "
                           f"(undo: `dinoseek undo {_root_arg(root)}`)")
    if exit_code and groups:
        raise click.exceptions.Exit(1)  # duplicates found: the `git diff --exit-code` convention


@main.command()
@library_options
@click.option("--journal", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Journal to undo (default: the newest one not yet undone).")
@click.option("--list", "list_only", is_flag=True, help="List the journals not yet undone, newest last.")
@click.option("--accept-missing", is_flag=True,
              help="Close the journal even though some quarantined copies are gone for good (they are listed and "
                   "recorded); the next `undo` then moves on to the journal before it.")
@_translate_errors
def undo(root, library_dir, url, journal, list_only, accept_missing):
    """Restore the files a `dedup --apply` set aside, byte for byte.

    A journal is checked whole before anything moves: one this library's catalog has no record of
    (or whose folders differ from the recorded ones), one that names paths outside this library's
    photo folder and quarantine, or another library's folder, is refused. Files whose quarantined
    copy changed or vanished stay where they are and are listed (exit 1).

    \b
    Example:
      dinoseek undo ~/Pictures
      dinoseek undo ~/Pictures --list
      dinoseek undo ~/Pictures --accept-missing
    """
    from dinoseek.indexer.library import Library
    from dinoseek.retrieval import actions

    if list_only:
        with Library.open(root, folder=library_dir, url=url) as library:
            _list_journals(actions.pending_journals(library))
        return
    with Library.open(root, folder=library_dir, url=url, write=True) as library:
        try:
            result = actions.undo(library, journal, accept_missing=accept_missing)
        except actions.UndoIncomplete as e:
            result = e.result
    click.echo(f"restored {len(result.restored)} files")
    if result.not_in_catalog:
        click.echo(f"{result.not_in_catalog} of them left the catalog meanwhile: run "
                   f"`dinoseek index {_root_arg(root)}` to embed them again")
    for problem in result.accepted:
        click.echo(f"accepted as lost: {_shown(problem)}", err=True)
    for problem in result.problems:
        click.echo(_shown(problem), err=True)
    if result.problems:
        missing = sum(isinstance(p, actions.Missing) for p in result.problems)
        how = ("once they are put right, run undo again" if not missing else
               "if those copies are gone for good, `--accept-missing` closes it without them" if
               missing == len(result.problems) else
               "put the changed copies right (or remove them) and run undo again, with `--accept-missing` for "
               "copies gone for good")
        raise click.ClickException(f"{len(result.problems)} file(s) not restored, their quarantined copies left as "
                                   f"they are; journal {_shown(result.journal.name)} stays pending ({how}; older "
                                   f"journals: `dinoseek undo {_root_arg(root)} --list`, then `--journal FILE`)")


def _list_journals(pending) -> None:
    if not pending:
        click.echo("no journal to undo")
    for journal in pending:
        if isinstance(journal, tuple):
            path, why = journal
            click.echo(f"{_shown(path)}: {_shown(why)}")
        else:
            click.echo(f"{journal.date}  {journal.header.action:<8} {journal.files:>6} files  {_shown(journal.path)}")


@main.command()
@library_options
@model_options
@click.option("--sample", type=click.IntRange(1, 100_000), default=50, show_default=True,
              help="Photos to alter and compare.")
@click.option("--kind", type=click.Choice(["cls", "patch"]), default="cls", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@_translate_errors
def calibrate(root, library_dir, url, model_name, weights, device, precision, sample, kind, as_json):
    """Measure precision/recall of dedup thresholds on altered copies of your own photos.

    \b
    Example:
      dinoseek calibrate ~/Pictures --weights ./dinov2-small --sample 100
    """
    from dinoseek.indexer.library import Library
    from dinoseek.model import encoder_for_library
    from dinoseek.retrieval.calibrate import calibrate as run

    with Library.open(root, folder=library_dir, url=url) as library:
        encoder = encoder_for_library(library.manifest(), weights or model_name, device=device, precision=precision)
        table, recommended, used = run(library, encoder, sample=sample, kind=kind)
    if as_json:
        click.echo(json.dumps({"photos": used, "recommended": recommended,
                               "rows": [vars(r) for r in table]}, indent=2))
        return
    edits = list(table[0].recall_by_edit)
    click.echo(f"{used} photos x {len(edits)} edits; recall per edit at each threshold")
    click.echo(f"{'threshold':>9} {'precision':>9} {'recall':>7}  " + " ".join(f"{e:>12}" for e in edits))
    for r in table:
        click.echo(f"{r.threshold:>9.2f} {r.precision:>9.3f} {r.recall:>7.3f}  "
                   + " ".join(f"{r.recall_by_edit[e]:>12.2f}" for e in edits))
    if recommended is None:
        click.echo("no threshold reaches 99% precision on this sample")
    else:
        click.echo(f"recommended: dinoseek dedup {_root_arg(root)} --threshold {recommended:.2f}")


if __name__ == "__main__":
    main()
