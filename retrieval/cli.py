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
from dinoseek.indexer.errors import (IndexerError, ModelMismatchError, NeedsRepairError, NeedsUpgradeError,
                                      NotIndexedError, SweepRefusedError)
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
from dinoseek.retrieval.keep import DEFAULT_ORDER

# Every message and line built from file names is escaped by the one function the library uses too.
_shown = printable
URL_ENV = "DINOSEEK_URL"
URL_HELP = (f"SQLAlchemy URL of the catalog (e.g. postgresql+psycopg://USER:PASSWORD@HOST/DB) instead of the "
            f"library's SQLite file; default: ${URL_ENV}.")


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
    if isinstance(e, NeedsUpgradeError):
        where = _root_arg(root if root is not None else e.root)
        return f"run `dinoseek index {where}` (or `dinoseek verify {where} --repair`) once to upgrade it"
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
        click.option("--model", "model_name", type=click.Choice(sorted(PRESETS)), default=None,
                     help="DINOv2 preset; its weights come from the Hugging Face cache [default: the model the "
                          "library was built with, else small]."),
        click.option("--weights", type=click.Path(exists=True, path_type=Path),
                     help="Local weights instead: an HF folder, .safetensors or original .pth file. A library "
                          "remembers them (and follows them when moved: give the new place once)."),
        click.option("--device", default="auto", show_default=True,
                     help="auto (CUDA, else Apple MPS, else cpu), cpu, cuda[:N] or mps."),
        click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
                     help="auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


class _Interrupted(click.ClickException):
    """Ctrl-C: one line and exit 130 (128 + SIGINT, as shells report it), never a traceback. The
    line is the message: "Aborted!", or what a command saved and how to go on."""

    exit_code = 130

    def show(self, file=None) -> None:
        click.echo(self.message, err=True)


class _LogFormatter(logging.Formatter):
    """Log lines reach the terminal too, and library code logs file and folder names."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return _shown(super().formatMessage(record))


_VERBOSE_HELP = "Log details to stderr: each skipped file and why, index upkeep (progress is shown without it)."


def _verbose(ctx: click.Context | None = None, param: click.Parameter | None = None, value: bool = True) -> None:
    # dinoseek's own loggers only: -v is about our progress and skipped files, not Alembic's or FAISS's.
    if value:
        logging.getLogger("dinoseek").setLevel(logging.INFO)


class _Group(click.Group):
    """The `dinoseek` group: the one place every command's errors pass through on their way out."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        # `dinoseek index ROOT -v` works as well as `dinoseek -v index ROOT`.
        cmd.params.append(click.Option(["-v", "--verbose"], is_flag=True, expose_value=False,
                                       callback=_verbose, help=_VERBOSE_HELP))
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
            raise _Interrupted("Aborted!") from None


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help=_VERBOSE_HELP)
@click.version_option(package_name="dinoseek")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Search and de-duplicate photo libraries with DINOv2 embeddings.

    Long steps show progress on stderr: a bar with counts, rate and ETA on a terminal, otherwise a
    line with counts every DINOSEEK_PROGRESS_INTERVAL seconds (default 10). DINOSEEK_PROGRESS=off
    hides it. stdout carries only results (pure JSON with --json).
    """
    from dinoseek.model.progress import showing_progress

    handler = logging.StreamHandler()
    handler.setFormatter(_LogFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    _verbose(value=verbose)
    ctx.with_resource(showing_progress())  # until the command ends; log lines go around a bar


@main.command()
@click.argument("images", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--from-file", "path_list", type=click.File("rb"),
              help="Also embed the paths listed in this file, one per line ('-': standard input); read as it "
                   "arrives, so a pipe from `find` starts at once. Folders in it are walked too.")
@click.option("-0", "--null", is_flag=True, help="Paths in --from-file are separated by NUL bytes (find -print0).")
@model_options
@click.option("--mode", type=click.Choice(["crop", "full"]), default="crop", show_default=True,
              help="crop: the reference 256/224 center crop. full: the whole frame resized to --size.")
@click.option("--size", type=click.IntRange(MIN_SIZE, MAX_SIZE), default=224, show_default=True,
              help="Input side in pixels (multiple of 14 for full).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32, show_default=True,
              help="Images per encoder batch; output is written after each batch.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Write cls.npy, patch.npy (N x D float32) and paths.jsonl (line i: row i) into this folder, "
                   "a batch at a time.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object per image (JSON Lines): path, cls, patch; or path, status, error.")
@_translate_errors
def embed(images, path_list, null, model_name, weights, device, precision, mode, size, batch_size, out, as_json):
    """Embed IMAGES (files, or folders walked as `index` walks them) and print or save their CLS and
    pooled-patch vectors, a batch at a time: memory stays flat however many files there are.

    Files are read by the indexer's decoder: with a library's model, --mode and --size, each gets the
    vector `index` stores for it (to float16 rounding). A file that cannot be read is skipped with
    one line on stderr; a summary line ends the run there. Exit status 0 when at least one image was
    embedded, 1 when none was.

    \b
    Example:
      dinoseek embed --weights ./dinov2-small photo1.jpg photo2.png --json
      find ~/Pictures -name '*.jpg' -print0 | dinoseek embed --from-file - -0 --out vectors/
    """
    import contextlib
    import itertools

    import numpy as np

    from dinoseek.model import Encoder
    from dinoseek.model.encoder import DEFAULT_MODEL
    from dinoseek.model.progress import echo as progress_echo
    from dinoseek.retrieval.embed import Embedded, VectorFolder, embed_paths, image_paths, read_path_list

    if not images and path_list is None:
        raise click.UsageError("give IMAGES (files or folders) or --from-file LIST")
    if null and path_list is None:
        raise click.UsageError("--null applies to --from-file")
    if out:
        VectorFolder.check(out)  # before the model loads: a taken --out fails in an instant
    encoder = Encoder.from_pretrained(weights or model_name or DEFAULT_MODEL, device=device, precision=precision,
                                      mode=mode, size=size)
    sources = itertools.chain(images, read_path_list(path_list, null=null) if path_list is not None else ())
    # Only a run over named files knows its length up front; folders and lists are counted as they come.
    total = len(images) if path_list is None and not any(p.is_dir() for p in images) else None
    embedded = skipped = 0
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(VectorFolder(out, encoder.dim)) if out else None
        # Progress is reported per batch inside embed_paths (model.progress; shown on stderr).
        for batch in embed_paths(image_paths(sources), encoder, batch_size, total=total):
            lines = []
            for result in batch:
                if isinstance(result, Embedded):
                    embedded += 1
                    if as_json:
                        lines.append(json.dumps(result.to_dict()))
                    elif not out:
                        lines.append(f"{_shown(result.path)}\tdim={result.cls.shape[0]}\t"
                                     f"cls[:4]={np.round(result.cls[:4], 4).tolist()}")
                else:
                    skipped += 1
                    progress_echo(f"skipped {_shown(result.path)}: {_shown(result.reason)}")  # above the bar
                    if as_json:
                        lines.append(json.dumps(result.to_dict()))
            if writer is not None:
                writer.append(batch)
            if lines:
                click.echo("\n".join(lines))  # one write, flushed, per batch: a reader sees each batch at once
        if writer is not None and not embedded:
            writer.discard_if_empty()  # so the same --out can be used again
    if not embedded:
        raise click.ClickException(f"nothing embedded: {skipped} file(s) skipped (see above)" if skipped else
                                   "no image files found (JPEG, PNG, WebP, GIF, TIFF, BMP, AVIF, HEIC)")
    where = f"; written to {_shown(out)}" if out else ""
    click.echo(f"{embedded} embedded (dim {encoder.dim}, {encoder.precision}), {skipped} skipped{where}", err=True)


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
    library is found from the current folder upwards; with find=False (`index`) the command decides."""
    if func is None:
        return functools.partial(library_options, find=find)
    options = [
        click.argument("root", type=click.Path(file_okay=False, path_type=Path), default=None, required=False),
        click.option("--library", "library_dir", type=click.Path(file_okay=False, path_type=Path),
                     help="Library folder (default: ROOT/.dinoseek)."),
        click.option("--url", envvar=URL_ENV, help=URL_HELP),
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
@click.option("--size", type=click.IntRange(MIN_SIZE, MAX_SIZE), default=None,
              help="Input side in pixels of a new library [default: 224; a multiple of 14 for full]; an existing "
                   "one keeps the size it recorded.")
@click.option("--include", multiple=True, help="Only paths matching this glob (repeatable).")
@click.option("--exclude", multiple=True, help="Skip paths matching this glob (repeatable).")
@click.option("--follow-symlinks", is_flag=True, help="Follow symbolic links (loop-safe).")
@click.option("--allow-mass-delete", is_flag=True, help="Let a run drop more than half of the library.")
@click.option("--checkpoint-seconds", type=_Float(0, 7 * 86400), default=60.0, show_default=True,
              help="How often the FAISS files are checkpointed during a run (indexes with lists on "
                   "disk: at the run's end only).")
@click.option("--decode", "decode", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
              help="Where JPEGs are decoded: gpu = in batches with nvjpeg (needs torchvision) beside the CPU "
                   "workers; auto = gpu when the encoder runs on CUDA and that works, else cpu.")
@click.option("--ray", "ray_address", metavar="local|auto|ADDRESS", default=None,
              help="Decode and embed on Ray (pip install 'dinoseek[ray]'): local = a runtime started on this "
                   "machine; auto or HOST:PORT = an existing cluster, whose nodes all see ROOT at the same path.")
@click.option("--ray-cpus", type=click.IntRange(1, 4096), default=None,
              help="With --ray local: the CPUs the runtime may use [default: all].")
@click.option("--ray-actors", type=click.IntRange(1, 4096), default=None,
              help="With --ray: encoder actors [default: one per GPU of the cluster; without GPUs, one per 8 CPUs].")
@_translate_errors
def index(root, library_dir, url, model_name, weights, device, precision, workers, batch_size, index_choice, mode,
          size, include, exclude, follow_symlinks, allow_mass_delete, checkpoint_seconds, decode, ray_address,
          ray_cpus, ray_actors):
    """Index the photos under ROOT: new and changed files are embedded, removed ones dropped.

    \b
    Example:
      dinoseek index ~/Pictures --weights ./dinov2-small --workers 4
    """
    import time

    from dinoseek.indexer.library import find_library_root, open_for_indexing
    from dinoseek.indexer.pipeline import IndexInterrupted, Options, run_index
    from dinoseek.indexer.store import check_factory
    from dinoseek.model import check_settings, encoder_for_library

    if root is None:
        # Inside a library (a subfolder of ROOT): that library, as git finds its repository; a new
        # library is only ever made here when no folder above has one.
        root = (None if library_dir or url else find_library_root(Path.cwd())) or Path(".")
    if not root.is_dir():
        raise click.ClickException(f"{_shown(root)} is not a folder (unmounted disk?)")
    options = Options(batch_size=batch_size, include=include, exclude=exclude, follow_symlinks=follow_symlinks,
                      allow_mass_delete=allow_mass_delete, checkpoint_seconds=checkpoint_seconds)
    if workers is not None:
        options.workers = workers
    check_settings(device=device, precision=precision)
    if ray_address is not None:
        from dinoseek.indexer.ray_executor import RayOptions, require_ray

        if decode == "gpu":
            raise click.UsageError("--decode gpu runs beside local decode workers; with --ray, Ray's CPU tasks decode")
        if ray_cpus is not None and ray_address != "local":
            raise click.UsageError("--ray-cpus sizes a runtime started here: it needs --ray local")
        require_ray()  # before the library is touched: one line saying how to install it
        options.ray = RayOptions(ray_address, cpus=ray_cpus, actors=ray_actors)
        decode = "cpu"
    elif ray_cpus is not None or ray_actors is not None:
        raise click.UsageError("--ray-cpus and --ray-actors need --ray")
    if decode != "cpu":  # before the library is touched: --decode gpu may be impossible here
        from dinoseek.indexer.gpu_jpeg import jpeg_decoder_for
        from dinoseek.model.precision import resolve_device

        options.jpeg_decoder = jpeg_decoder_for(decode, resolve_device(device))
    options.decode = "cpu" if options.jpeg_decoder is None else "gpu"  # settled once, here

    def model_for(manifest):
        # The library's recorded model and preprocessing unless flags say otherwise (which must fit
        # them). Its width is what a FAISS factory string is checked against; missing weights, bad
        # settings or --index fail before a new library folder is created.
        encoder = encoder_for_library(manifest, weights or model_name, root=root, device=device, precision=precision,
                                      mode=mode, size=size)
        if index_choice not in (None, "auto"):
            check_factory(index_choice, encoder.dim)
        return encoder

    again = _rerun("index", root, library_dir, url, model_name, weights)
    if ray_address is not None:  # resumed the way it ran
        again += f" --ray {shlex.quote(ray_address)}"
    try:
        library, encoder = open_for_indexing(root, model_for, folder=library_dir, url=url, index_choice=index_choice)
        with library:
            started = time.monotonic()
            counts = run_index(library, encoder, options)  # progress of the scan and the images: on stderr
    except IndexInterrupted as e:
        # Every committed batch stays, and the next run reads only what the catalog does not have.
        raise _Interrupted(f"interrupted: {e.saved:,} of {e.total:,} images saved in the catalog; "
                           f"run `{again}` again to resume") from None
    except KeyboardInterrupt:
        raise _Interrupted(f"interrupted before any image was saved; run `{again}` again") from None
    seconds = time.monotonic() - started
    click.echo(f"{counts['embedded']} embedded, {counts['moved']} moved, {counts['failed']} failed, "
               f"{counts['deleted']} removed, {counts['scanned']} files seen in {seconds:.1f}s")
    if counts["failed"]:
        click.echo(f"`dinoseek info {_root_arg(root)}` lists the files not embedded, with the reason for each")


def _url_from_environment() -> bool:
    context = click.get_current_context(silent=True)
    return context is not None and context.get_parameter_source("url") == click.core.ParameterSource.ENVIRONMENT


def _hide_password(url: str) -> str:
    """`url` as a command line may show it: the password as ***."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def _rerun(command: str, root, library_dir, url, model_name: str | None, weights) -> str:
    """`dinoseek COMMAND ROOT` with the options the user gave to pick the library and the model,
    shell-quoted: the command line that does it again."""
    words = ["dinoseek", command, _root_arg(root)]
    if library_dir is not None:
        words += ["--library", _root_arg(library_dir)]
    if url is not None and not _url_from_environment():
        words += ["--url", shlex.quote(_shown(_hide_password(url)))]
    if weights is not None:
        words += ["--weights", _root_arg(weights)]
    elif model_name is not None:
        words += ["--model", model_name]
    return " ".join(words)


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
        arch = model.get("arch") or {}
        shape = (f"ViT {arch['embed_dim']}-d, {arch['depth']} blocks, {arch['num_registers']} registers"
                 if {"embed_dim", "depth", "num_registers"} <= arch.keys() else f"{model.get('dim', '?')}-d vectors")
        click.echo(f"model: {shape}, {model.get('precision', '?')}, "
                   f"weights sha256 {str(model.get('weights_sha256', '?'))[:12]}")
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
        click.option("--folder", help="Only images under this folder (absolute, from here, or from ROOT)."),
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


def _filters(kwargs: dict, root: Path):
    """The filter options as `Filters`; --folder is resolved as --in-folder is (a folder that does not
    exist is an error, not an empty result) and given as the catalog's printable folder prefix."""
    from dinoseek.indexer.paths import display_path
    from dinoseek.retrieval.api import Filters
    from dinoseek.retrieval.dedup import folder_prefix

    names = ("folder", "captured_after", "captured_before", "camera", "min_pixels", "min_bytes", "max_bytes")
    values = {n: kwargs.pop(n) for n in names}
    if values["folder"] is not None:
        values["folder"] = display_path(folder_prefix(root, values["folder"], "folder")) or None
    return Filters(**values)


def _print_hits(hits, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([h.to_dict() for h in hits], indent=2))
        return
    for hit in hits:
        click.echo(f"{hit.score:.4f}  {_shown(hit.path)}")
    if not hits:
        click.echo("no matching photos", err=True)


@main.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--root", type=click.Path(file_okay=False, path_type=Path),
              help="The indexed photo folder [default: the nearest folder with a library, from here upwards].")
@click.option("--library", "library_dir", type=click.Path(file_okay=False, path_type=Path), help="Library folder.")
@click.option("--url", envvar=URL_ENV, help=URL_HELP)
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
                      device=device, precision=precision, load_model=True) as lib:
        hits = lib.search(image, k=k, kind=kind, filters=_filters(filters, lib.library.root))
    _print_hits(hits, as_json)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--root", type=click.Path(file_okay=False, path_type=Path),
              help="The indexed photo folder [default: the nearest folder with a library, from here upwards].")
@click.option("--library", "library_dir", type=click.Path(file_okay=False, path_type=Path), help="Library folder.")
@click.option("--url", envvar=URL_ENV, help=URL_HELP)
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
        hits = lib.similar(path, k=k, kind=kind, filters=_filters(filters, lib.library.root))
    _print_hits(hits, as_json)


@main.command("mark-distinct")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--root", type=click.Path(file_okay=False, path_type=Path),
              help="The indexed photo folder [default: the nearest folder with a library, from here upwards].")
@click.option("--library", "library_dir", type=click.Path(file_okay=False, path_type=Path), help="Library folder.")
@click.option("--url", envvar=URL_ENV, help=URL_HELP)
@click.option("--remove", is_flag=True, help="Remove the marks instead: dedup may group these photos again.")
@_found_root("--root")
@_translate_errors
def mark_distinct(paths, root, library_dir, url, remove):
    """Mark the photos PATHS (two or more) as not duplicates of each other: `dedup` never groups them.

    Every pair among them is marked, by content (sha256): the marks survive renames and re-indexing,
    and cover every byte copy of each photo. Byte-identical photos cannot be marked. Marking works
    while `index` runs (it does not take the library's writer lock); if the catalog stays busy for
    30 s (SQLite has one writer at a time) it is refused in one line, nothing changed: run it again.

    \b
    Example:
      dinoseek mark-distinct ~/Pictures/2023/IMG_0042.jpg ~/Pictures/2023/IMG_0043.jpg
      dinoseek mark-distinct 2023/IMG_0042.jpg 2023/IMG_0043.jpg --root ~/Pictures --remove
    """
    from dinoseek.indexer.library import Library
    from dinoseek.retrieval.marks import paths_to_sha_pairs

    with Library.open(root, folder=library_dir, url=url) as library:
        pairs = paths_to_sha_pairs(library, paths, refuse_identical=not remove)
        if remove:
            removed = library.catalog.unmark_not_duplicate(pairs)
            click.echo(f"{removed} of {len(pairs)} pairs unmarked ({len(pairs) - removed} were not marked); "
                       f"dedup may group them again")
        else:
            added = library.catalog.mark_not_duplicate(pairs)
            click.echo(f"{len(pairs)} pairs marked not duplicates ({added} new, {len(pairs) - added} already "
                       f"marked); dedup no longer groups them")


@main.command()
@library_options
@click.option("--threshold", type=_SIMILARITY, default=None,
              help="Similarity for near duplicates, in (0, 1] [default: 0.95].")
@click.option("--kind", type=click.Choice(["cls", "patch"]), default="cls", show_default=True)
@click.option("--exact", "exact_only", is_flag=True, help="Only byte-identical copies.")
@click.option("--keep", "order", default=",".join(DEFAULT_ORDER),
              show_default=True,
              help="Keep rules, in order of priority: protected (--protect folders); resolution (1.2x the pixels or "
                   "more; an upscale without camera EXIF gets no credit); original (RAW+JPEG pair, then camera "
                   "EXIF); size (within one format); oldest (capture time); modified (earliest file time); format "
                   "(the one cameras write; a lossless re-save is not better). Ties: shorter path.")
@click.option("--protect", "protected", multiple=True,
              help="Folder (under ROOT) whose copies are always the ones kept (repeatable).")
@click.option("--in-folder", "folder",
              help="Only groups with a member under this folder (each group is shown and acted on whole).")
@click.option("--crops", is_flag=True, help="Re-rank candidates with patch tokens so crops group with their "
                                             "source (re-reads those files with the library's model).")
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
@click.option("--json", "as_json", is_flag=True,
              help="Print the plan as JSON (with --action move, each duplicate lists the sidecars that go with it; "
                   "with --apply, printed once applied, what was done under \"applied\"). Nothing else on stdout.")
@click.option("--exit-code", is_flag=True,
              help="Exit 1 if duplicates were found, 0 if none (as `git diff --exit-code`). Errors exit 1 too "
                   "(usage errors 2), with an `Error:` line on stderr.")
@_translate_errors
def dedup(root, library_dir, url, threshold, kind, exact_only, order, protected, folder, crops,
          candidate_threshold, model_name, weights, device, precision, action, do_apply, quarantine, report_file,
          as_json, exit_code):
    """Find duplicate groups; with --action and --apply, set the extra copies aside (undoably).

    Nothing changes on disk without --apply. Applying moves the copies that are not kept into a
    quarantine folder (paths preserved), or replaces them by links to the kept copy; every step is
    journaled, and `dinoseek undo` restores them. Every copy that goes is listed with its similarity
    to the kept one (exact cosine) and its own reason; the plan ends with the files and bytes that
    leave the photo folder, and whether the quarantine's filesystem is the photos' own (then no
    space is freed until `dinoseek purge`). Ctrl-C during --apply stops between two files and says
    how many were set aside: `dinoseek undo` puts them back, the same command again goes on.

    \b
    Example:
      dinoseek dedup ~/Pictures --report dups.html
      dinoseek dedup ~/Pictures --threshold 0.97 --protect originals --action move --apply
    """
    from dinoseek.indexer.library import Library
    from dinoseek.retrieval import actions
    from dinoseek.retrieval.dedup import DEFAULT_THRESHOLD, find_duplicates
    from dinoseek.retrieval.report import member_note, plan_summary, to_json, write_report
    from dinoseek.retrieval.sidecars import one_listing_per_folder

    # `is None`, not `or`: a threshold the user typed is never swapped for the default.
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    if candidate_threshold is not None and not crops:
        raise click.BadParameter("only means something with --crops", param_hint="'--candidates'")
    if candidate_threshold is not None and candidate_threshold > threshold:
        raise click.BadParameter(f"{candidate_threshold} is above the --threshold {threshold}; candidates for "
                                 f"re-ranking are the pairs below it", param_hint="'--candidates'")
    order = tuple(r.strip() for r in order.split(",") if r.strip())
    # Usage mistakes are found before any work (exit 2), not after a long plan was printed.
    from dinoseek.retrieval.errors import InvalidArgumentError
    from dinoseek.retrieval.keep import check_order

    if do_apply and action == "report":
        raise click.UsageError("--apply needs --action move, hardlink or symlink")
    try:
        check_order(order)
    except InvalidArgumentError as e:
        raise click.BadParameter(str(e), param_hint="'--keep'") from None
    if report_file is not None and report_file.suffix.lower() not in (".json", ".csv", ".html", ".htm"):
        raise click.BadParameter(f"{_shown(report_file.name)}: the name must end in .json, .csv or .html",
                                 param_hint="'--report'")
    try:
        # one_listing_per_folder: keep rules, plan, summary and apply list each photo folder once
        with Library.open(root, folder=library_dir, url=url, write=do_apply) as library, one_listing_per_folder():
            crop_encoder = None
            if crops:
                from dinoseek.model import encoder_for_library

                crop_encoder = encoder_for_library(library.manifest(), weights or model_name, root=library.root,
                                                   device=device, precision=precision)
                library.check_model(crop_encoder.manifest())
            # Progress of the candidate search, grouping, --crops and thumbnails: on stderr (model.progress)
            groups = find_duplicates(library, threshold=threshold, kind=kind, exact_only=exact_only,
                                     order=order, protected=protected, folder=folder, crop_encoder=crop_encoder,
                                     candidate_threshold=candidate_threshold)
            # A duplicate whose RAW would move while the kept copy has no RAW of those bytes stays (JPEG
            # and RAW) and says why; apply gets the groups as found and checks again on the files then.
            found, (groups, held) = groups, actions.hold_back_only_raws(library, groups, action)
            # What leaves the photo folder, and whether the quarantine's disk is the photos' (space back only on purge)
            summary = plan_summary(library, groups, action, quarantine, applied=do_apply) if groups else None
            # The sidecars each duplicate takes along (`move`, and the `report` dry run that previews it;
            # links leave them beside the link)
            sidecars = {raw: paths for group in groups for raw, paths in
                        actions.planned_sidecars(library, group, "move" if action == "report" else action).items()}
            listed = sidecars if action == "move" else None
            if report_file:
                write_report(groups, report_file, library.root, action, summary, listed)
            if as_json and not do_apply:
                click.echo(to_json(groups, action, summary, listed))
            elif not as_json:
                for number, group in enumerate(groups, 1):
                    click.echo(f"group {number} ({group.kind}, min similarity {group.min_similarity:.3f}): "
                               f"keep {_shown(group.keeper.path)} — {_shown(group.reason)}")
                    for member in group.members:
                        if member.id in group.protected_ids and member.id != group.keeper.id:
                            click.echo(f"    also kept: {_shown(member.path)} — in a protected folder")
                    for member in group.others:
                        click.echo(f"    {action if action != 'report' else 'duplicate'}: {_shown(member.path)} — "
                                   f"{_shown(member_note(group, member))}")
                        for sidecar in sidecars.get(member.raw_path, ()):
                            click.echo(f"        with sidecar: {_shown(sidecar.name)}")
                    for member in group.members:
                        if member.id in held:
                            click.echo(f"    left in place: {_shown(member.path)} — {_shown(held[member.id])}")
                extra = sum(len(g.others) for g in groups)
                click.echo(f"{len(groups)} groups, {extra} files {'to act on' if action != 'report' else 'duplicated'}"
                           + ("" if do_apply or action == "report" else " (dry run: add --apply)"))
                if summary is not None and summary.files:
                    click.echo(_shown(summary.text()))
            if do_apply:
                result = actions.apply(library, found, action, quarantine)
                _report_skips(result)
                if as_json:  # one JSON document on stdout: the plan and what the apply did
                    click.echo(to_json(groups, action, summary, listed, result.to_dict(library.root)))
                elif result.journal is None:  # no journal written: `undo` still finds the previous one
                    click.echo(f"0 files {actions.PAST[action]}; nothing to undo")
                else:
                    with_sidecars = f" (with {len(result.sidecars)} sidecars)" if result.sidecars else ""
                    undo = _rerun("undo", root, library_dir, url, None, None)
                    click.echo(f"{len(result.done)} files {actions.PAST[action]}{with_sidecars}; journal "
                               f"{_shown(result.journal)} (undo: `{undo}`)")
    except actions.ApplyInterrupted as e:
        _report_skips(e.result)
        raise _Interrupted(_apply_interrupted(e, action, _rerun("undo", root, library_dir, url, None, None))) from None
    except KeyboardInterrupt:  # before the apply began (or a dry run): nothing on disk was touched
        raise _Interrupted("interrupted: nothing was changed") from None
    if exit_code and groups:
        raise click.exceptions.Exit(1)  # duplicates found: the `git diff --exit-code` convention


def _report_skips(result) -> None:
    """What an apply (finished or interrupted) left alone, one line each on stderr."""
    from dinoseek.model.progress import echo

    for group, why in result.skipped:
        echo(f"skipped group keeping {_shown(group.keeper.path)}: {_shown(why)}")
    for path, why in result.skipped_files:
        echo(f"skipped {_shown(path)}: {_shown(why)}")
    for path, why in result.sidecars_left:
        echo(f"sidecar left beside its moved photo {_shown(path)}: {_shown(why)}")


def _apply_interrupted(e, action: str, undo: str) -> str:
    """The line for Ctrl-C during `dedup --apply`: what was done and the two ways on. A re-run
    plans again from the catalog, where the copies set aside are no longer candidates."""
    from dinoseek.retrieval.actions import PAST

    result = e.result
    done = f"{len(result.done)} of {e.planned} files {PAST[action]}"
    if result.journal is None:
        return f"interrupted: {done}; nothing was changed"
    with_sidecars = f" (with {len(result.sidecars)} sidecars)" if result.sidecars else ""
    return (f"interrupted: {done}{with_sidecars}, journal {_shown(result.journal.name)}; `{undo}` puts them back, "
            f"or run the same command again to go on")


@main.command()
@library_options
@click.option("--journal", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Journal to undo (default: the newest one not yet undone).")
@click.option("--list", "list_only", is_flag=True, help="List the journals not yet undone (and those purged), newest last.")
@click.option("--accept-missing", is_flag=True,
              help="Close the journal even though some quarantined copies are gone for good (they are listed and "
                   "recorded); the next `undo` then moves on to the journal before it.")
@_translate_errors
def undo(root, library_dir, url, journal, list_only, accept_missing):
    """Restore the files a `dedup --apply` set aside, byte for byte.

    A journal is checked whole before anything moves: one this library's catalog has no record of
    (or whose folders differ from the recorded ones), one that names paths outside this library's
    photo folder and quarantine, or another library's folder, is refused. Files whose quarantined
    copy changed or vanished stay where they are and are listed (exit 1). Ctrl-C stops between two
    files; running undo again finishes the journal.

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
            _list_journals(actions.listed_journals(library))
        return
    with Library.open(root, folder=library_dir, url=url, write=True) as library:
        try:
            result = actions.undo(library, journal, accept_missing=accept_missing)  # progress: on stderr
        except actions.UndoIncomplete as e:
            result = e.result
        except actions.UndoInterrupted as e:
            # The files back so far stay back; the journal stays pending, so undo again finishes it.
            again = _rerun("undo", root, library_dir, url, None, None)
            again += f" --journal {_root_arg(journal)}" if journal is not None else ""
            again += " --accept-missing" if accept_missing else ""
            raise _Interrupted(f"interrupted: {len(e.result.restored)} of {e.to_restore} files restored; run "
                               f"`{again}` again to finish") from None
    click.echo(f"restored {len(result.restored)} files")
    if result.sidecars:
        click.echo(f"restored {len(result.sidecars)} sidecars beside them")
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


@main.command()
@library_options
@click.option("--older-than", "older_than", type=click.FloatRange(min=0), metavar="DAYS",
              help="Only journals applied more than DAYS ago [default: every journal not undone].")
@click.option("--apply", "do_apply", is_flag=True, help="Delete them for good (default: a dry run listing them).")
@_translate_errors
def purge(root, library_dir, url, older_than, do_apply):
    """Empty the quarantine on purpose: delete the copies `dedup --apply` set aside, for good.

    Without --apply, lists the quarantined copies (and sidecars) that would be deleted and their
    bytes. With --apply, deletes them, removes their rows from the catalog, and records in the
    catalog and the journal that the bytes are gone: `undo` then refuses that journal and
    `undo --list` shows it as purged. Only files inside the quarantine that still hold the bytes
    the journal recorded are deleted, and only while each kept copy is still in place (same bytes,
    or embedded for near duplicates) and no other pending journal names the file; a journal failing
    any of this is left whole and reported.
    Ctrl-C never leaves a journal half purged: each is purged whole or left as it was.

    \b
    Example:
      dinoseek purge ~/Pictures --older-than 30
      dinoseek purge ~/Pictures --older-than 30 --apply
    """
    from dinoseek.indexer.library import Library
    from dinoseek.retrieval import purge as purging

    with Library.open(root, folder=library_dir, url=url, write=do_apply) as library:
        plan = purging.plan_purge(library, older_than)
        for path, why in plan.skipped:
            click.echo(f"skipped {_shown(path.name)}: {_shown(why)}", err=True)
        for item in plan.journals:
            click.echo(f"journal {_shown(item.journal.path.name)} ({item.journal.header.action}, applied "
                       f"{item.applied_at:%Y-%m-%d %H:%M} UTC): {item.files} files, {item.bytes} bytes")
            for copy in item.copies:
                if copy.present:
                    click.echo(f"    {_shown(copy.step.dst)}  {copy.size} bytes")
        if not do_apply:
            click.echo(f"{plan.files} files, {plan.bytes} bytes in {len(plan.journals)} journals would be deleted "
                       f"(dry run: add --apply)")
            return
        try:
            result = purging.purge(library, plan)  # progress: on stderr
        except purging.PurgeInterrupted as e:
            # Each journal is purged whole or not at all: the others are as they were, still undoable.
            done = e.result
            again = _rerun("purge", root, library_dir, url, None, None)
            again += f" --older-than {older_than:g}" if older_than is not None else ""
            raise _Interrupted(f"interrupted: {len(done.journals)} of {e.planned} journals purged ({done.files} "
                               f"files, {done.bytes} bytes deleted), the others left as they were; run "
                               f"`{again} --apply` again to go on") from None
    for problem in result.problems:
        click.echo(_shown(problem), err=True)
    click.echo(f"deleted {result.files} files, {result.bytes} bytes; {len(result.journals)} journals purged, "
               f"{result.rows} rows left the catalog")
    not_purged = len(result.problems) + len(plan.skipped)
    if not_purged:
        raise click.ClickException(f"{not_purged} journal(s) not purged (listed above); they stay as they are")


def _list_journals(pending) -> None:
    if not pending:
        click.echo("no journal to undo")
    for journal in pending:
        if isinstance(journal, tuple):
            path, why = journal
            click.echo(f"{_shown(path)}: {_shown(why)}")
        elif journal.purged:  # listed so the user sees why it cannot be undone
            click.echo(f"{journal.date}  {journal.header.action:<8} purged: its quarantined copies were deleted  "
                       f"{_shown(journal.path)}")
        else:
            click.echo(f"{journal.date}  {journal.header.action:<8} {journal.photos:>6} files  {_shown(journal.path)}")


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

    try:
        with Library.open(root, folder=library_dir, url=url) as library:
            encoder = encoder_for_library(library.manifest(), weights or model_name, root=library.root,
                                          device=device, precision=precision)
            table, recommended, used = run(library, encoder, sample=sample, kind=kind)
    except KeyboardInterrupt:  # calibration only reads the library: nothing to save, nothing to resume
        again = _rerun("calibrate", root, library_dir, url, model_name, weights)
        raise _Interrupted(f"interrupted: calibration changes nothing in the library; `{again}` starts it "
                           f"again") from None
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


@main.command()
@library_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback needs a token (one is made when --token is not "
                   "given).")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True,
              help="Port to listen on (0: any free one).")
@click.option("--token", help="Token to require (the printed URL carries it once; the browser then keeps a cookie).")
@model_options
@_translate_errors
def serve(root, library_dir, url, host, port, token, model_name, weights, device, precision):
    """Review duplicates and search by image in a browser: two pages and a JSON API (/docs).

    Listens on 127.0.0.1 only unless --host says otherwise; then every request needs the token from
    the printed URL. Reads the library while `dinoseek index` runs. Ctrl-C stops it (an apply under
    way finishes first).

    \b
    Example:
      dinoseek serve ~/Pictures
      dinoseek serve ~/Pictures --host 0.0.0.0 --port 8000
    """
    from dinoseek.retrieval.server import create_app
    from dinoseek.retrieval.server.run import listen, token_for, url_of
    from dinoseek.retrieval.server.run import serve as run_server

    token = token_for(host, token)
    try:
        sock = listen(host, port)
    except OSError as e:
        raise click.ClickException(_shown(f"cannot listen on {host}:{port}: {e.strerror or e}")) from e
    with sock:
        port = sock.getsockname()[1]
        app = create_app(root, library_dir=library_dir, url=url, model=None if weights else model_name,
                         weights=weights, device=device, precision=precision, host=host, port=port, token=token)
        address = url_of(host, port, token)
        click.echo(f"serving {_shown(app.state.server.place.root)} at {address} (search: {address.split('?')[0]}"
                   f"search); Ctrl-C stops")
        run_server(app, sock)
    click.echo("stopped")


if __name__ == "__main__":
    main()
