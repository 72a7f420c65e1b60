"""Command line: ``normopt fold``, ``normopt verify``, ``normopt inspect``, ``normopt passes``.

Exit codes: 0 success, 1 verification failed, 2 bad input or usage, 3 requested provider
unavailable, 4 ``fold --check`` found rewrites left to apply, 130 interrupted (Ctrl-C, SIGTERM).
Errors are one line on stderr;
``-v`` adds the traceback.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import click

from normopt import model_io, pipeline, progress, registry, report, signals
from normopt.errors import (ModelSaveError, NormoptError, NotFoldedError, ProviderUnavailableError, ReportPathError,
                            UsageError, VerificationError)
from normopt.fold import FoldOptions, optimize
from normopt.inputs import parse_ranges, parse_shapes
from normopt.providers import flush_streams
from normopt.targets import TARGETS

EXIT_CODES = ("Exit codes: 0 success, 1 verification failed, 2 bad input or usage, 3 requested provider unavailable, "
              "4 fold --check: rewrites left to apply, 130 interrupted (no partial output left).")


class _Group(click.Group):
    """Turns NormoptError into one line on stderr and its exit code."""

    def invoke(self, ctx: click.Context):
        signals.received = False   # (a signal before this point raised where it came)
        try:
            with _libraries_quiet():
                return super().invoke(ctx)
        except click.UsageError as err:  # a bad flag or value: one line too, not click's usage block
            where = err.ctx.command_path if err.ctx is not None else ctx.command_path
            _fail(ctx, f"{err.format_message().rstrip('.')} (see '{where} --help')", err.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except (Exception, KeyboardInterrupt) as err:   # temporary files are already removed
            code, message = _failure(err, hint=True)
            _fail(ctx, message, code)


@contextlib.contextmanager
def _libraries_quiet():
    """What the command's libraries would print besides its own lines: numpy's warnings about
    non-finite values (the passes' to judge: a negative variance is a reason to skip), and
    graphsurgeon's ("Could not convert: BFLOAT16 to a corresponding NumPy type", and that the
    ``colored`` module is missing), which even -q let through; onnx's checker's warning about
    experimental ops (ATen), on the standard output (``model_io.checker_quiet``)."""
    import numpy as np
    from onnx_graphsurgeon.logger import G_LOGGER

    with np.errstate(all="ignore"), G_LOGGER.suppress(G_LOGGER.ERROR), model_io.checker_quiet():
        yield


def _failure(err: BaseException, hint: bool = False) -> tuple[int, str]:
    """The exit code and line an exception ends a command with (and its report says); ``hint``
    adds where to find a bug's traceback."""
    if isinstance(err, KeyboardInterrupt) or signals.received:   # Ctrl-C, SIGTERM, or what one cut short
        return 130, signals.MESSAGE
    if isinstance(err, NormoptError):
        return err.exit_code, str(err)
    if isinstance(err, OSError):   # the file system refused a name or a file (too long, say)
        where = f" '{os.fsdecode(err.filename)}'" if err.filename else ""
        return 2, f"cannot use{where}: {err.strerror or err}"
    hint = " (run with -v for the traceback)" if hint else ""
    return 2, f"internal error: {type(err).__name__}: {err}{hint}"   # a bug: still one line unless -v


def _fail(ctx: click.Context, message: str, code: int):
    # A failed verification (1) or rewrites left (4) are outcomes, not errors: no traceback
    if ctx.meta.get("normopt.verbose") and code not in (1, NotFoldedError.exit_code):
        traceback.print_exc()
    _echo(f"error: {one_line(message)}", err=True)
    ctx.exit(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
@click.version_option(package_name="normopt")
def cli():
    """Fold BatchNormalization and fuse decomposed normalizations in ONNX models,
    then prove the result equivalent with onnxruntime."""


# Every set of inputs and their outputs is kept for the comparison: a bound, not "as many as asked".
MAX_TRIALS = 100


def _a_path(ctx, param, value):
    """An option's path: an empty one is a usage error (it would mean the current folder)."""
    if value is not None and not str(value).strip():
        raise click.BadParameter("the path is empty")
    return value


def _verify_options(fn):
    options = [
        click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
                     help="onnxruntime provider for verification; auto = CUDA when really usable, else CPU."),
        click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Seed of the random inputs (0 or more)."),
        click.option("--trials", type=click.IntRange(min=1, max=MAX_TRIALS), default=1, show_default=True,
                     help=f"Number of normal random input sets (seed, seed+1, ...; at most {MAX_TRIALS}); one offset "
                          "(mean 1000) and one degenerate (zero and constant rows) set run besides."),
        click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DxD...",
                     help="Shape for an input with dynamic dims (default: 2 for the first axis, 8 for others; a batch of 1, then 32, 224 and 1, if the model cannot run at that)."),
        click.option("--input-range", "input_ranges", multiple=True, metavar="NAME:LOW:HIGH",
                     help="Value range [LOW, HIGH) for an input, e.g. input_ids:0:30522."),
        click.option("--inputs", "inputs_file", type=click.Path(dir_okay=False), default=None,
                     help="Real inputs: an .npz file with one array per input name."),
        click.option("--atol", type=float, default=None, help="Absolute tolerance (default per dtype: fp32 1e-5, fp16 1e-2, raised with the output's magnitude and the original's sensitivity to input rounding)."),
        click.option("--rtol", type=float, default=None, help="Relative tolerance (default per dtype: fp32 1e-4, fp16 1e-2)."),
        click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None, callback=_a_path,
                     help="Write a JSON report to this file."),
        click.option("-v", "--verbose", is_flag=True, help="List every rewrite and skip; tracebacks on errors."),
        click.option("-q", "--quiet", is_flag=True, help="Print errors only."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@cli.command(epilog=EXIT_CODES)
@click.argument("models", nargs=-1, required=True, type=click.Path(), metavar="MODEL...")
@click.option("-o", "--output", type=click.Path(), default=None, callback=_a_path,
              help="Output path (default: <stem>.normopt.onnx beside MODEL); with several models or a folder, "
                   "an output folder (created if missing).")
@click.option("--passes", "pass_list", default=None, metavar="A,B", help="Run only these passes (see 'normopt passes').")
@click.option("--skip", "skip_list", default=None, metavar="A,B", help="Do not run these passes.")
@click.option("--target", type=click.Choice(TARGETS), default="portable", show_default=True,
              help="portable: the single standard op for every site; onnxruntime: keep the forms onnxruntime "
                   "runs best (no GroupNormalization).")
@click.option("--in-place", is_flag=True,
              help="Replace each MODEL by its folded form, atomically and only once it verifies (not with "
                   "--no-verify or --force); new weights go to a new data file, and the old one is removed "
                   "afterwards unless another model in the folder refers to it.")
@click.option("--dry-run", is_flag=True, help="Rewrite and verify, but write no model.")
@click.option("--check", is_flag=True,
              help="Rewrite and verify in memory, write nothing; exit 4 and list the sites when rewrites are "
                   "left to apply, 0 when none.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Models folded in parallel (one process each).")
@click.option("--no-verify", is_flag=True, help="Do not verify with onnxruntime.")
@click.option("--force", is_flag=True, help="Write the output even when verification fails.")
@click.option("--strict", is_flag=True, help="Fail (exit 1) when any rewrite had to be rolled back; also run the ONNX checker after every pass.")
@click.option("--no-opset-upgrade", is_flag=True, help="Never raise the model's opset; skip fusions that need a newer one.")
@click.option("--external-data", is_flag=True, help="Store weights in <output>.data beside the output (default: as the input did; one file unless over 2 GB).")
@_verify_options
@click.pass_context
def fold(ctx, models, output, pass_list, skip_list, target, in_place, dry_run, check, jobs, no_verify, force, strict,
         no_opset_upgrade, external_data, provider, seed, trials, input_shapes, input_ranges, inputs_file, atol, rtol,
         report_path, verbose, quiet):
    """Fold and fuse normalization layers of each MODEL (a file or a folder of .onnx files), verify,
    and write the result.

    The input file is never modified; the output is written atomically and only when it
    verifies (unless --force or --no-verify). With several models, each gets a status line and
    the run a summary; the exit code is that of the first model that failed.
    """
    ctx.meta["normopt.verbose"] = verbose
    progress.enable(sys.stderr.isatty() and not quiet)
    _terminate_as_interrupt()
    started = time.perf_counter()
    try:
        outcome = _fold_command(models, output, pass_list, skip_list, target, in_place, dry_run, check, jobs,
                                no_verify, force, strict, no_opset_upgrade, external_data, provider, seed, trials,
                                input_shapes, input_ranges, inputs_file, atol, rtol, report_path, verbose, quiet)
    except (Exception, KeyboardInterrupt) as err:
        # The report says so too: a report left from an earlier run must not read "ok", whatever
        # stopped this one (a bad flag value, a bad model, an interrupt).
        if report_path and not isinstance(err, ReportPathError):
            code, message = _failure(err)
            try:
                _write_json(report_path, report.error_document(models[0] if len(models) == 1 else ", ".join(models),
                                                              code, one_line(message), time.perf_counter() - started))
            except (UsageError, KeyboardInterrupt):
                pass   # the error itself is what the user needs to see
        raise
    if outcome is None or isinstance(outcome, NormoptError):   # a batch: its report and lines are out
        if outcome is not None:
            raise outcome
        return
    if report_path and outcome.report is not None:
        _write_json(report_path, outcome.report)
    if not quiet:
        for line in outcome.lines:
            _echo(line)
    if outcome.exit_code:
        raise _error(outcome.exit_code, outcome.error)


def _fold_command(models, output, pass_list, skip_list, target, in_place, dry_run, check, jobs, no_verify, force,
                  strict, no_opset_upgrade, external_data, provider, seed, trials, input_shapes, input_ranges,
                  inputs_file, atol, rtol, report_path, verbose, quiet) -> FileOutcome | NormoptError | None:
    """``fold``'s work: one model's outcome; after a batch (which reports for itself), the error
    its failed models earn, if any."""
    if in_place and output is not None:
        raise UsageError("--in-place writes over each MODEL: it takes no -o")
    if in_place and (no_verify or force):
        raise UsageError("--in-place replaces the input only once the result verifies: it cannot be combined "
                         f"with {'--no-verify' if no_verify else '--force'}; write to another file with -o")
    names = registry.resolve(_split(pass_list), _split(skip_list))
    options = FoldOptions(passes=names, allow_opset_upgrade=not no_opset_upgrade, verify=not no_verify,
                          provider=provider, seed=seed, trials=trials, input_shapes=parse_shapes(input_shapes),
                          input_ranges=parse_ranges(input_ranges), inputs_file=inputs_file, atol=atol, rtol=rtol,
                          strict=strict, target=target)
    settings = FoldSettings(options, dry_run=dry_run or check, force=force, external_data=external_data,
                            check=check, verbose=verbose, in_place=in_place, report_path=report_path)
    _check_report_path(report_path)
    if len(models) > 1 or Path(models[0]).is_dir():
        return _fold_batch(models, output, settings, jobs, report_path, quiet)
    return fold_file(models[0], output, settings)


@dataclass
class FoldSettings:
    """What ``fold`` does with one model besides the passes (picklable: it goes to worker processes)."""

    options: FoldOptions
    dry_run: bool = False
    force: bool = False
    external_data: bool = False
    check: bool = False
    verbose: bool = False
    in_place: bool = False
    report_path: str | None = None  # --report: each model's report document is built


@dataclass
class FileOutcome:
    """One model's fold: the summary lines, the report document, and the exit code it earns."""

    input: str
    output: str | None = None
    status: str = "ok"
    exit_code: int = 0
    error: str = ""
    lines: list[str] = field(default_factory=list)
    report: dict | None = None
    brief: str = ""  # the batch status line's details
    pending: list = field(default_factory=list)


def fold_file(model: str, output: str | None, s: FoldSettings) -> FileOutcome:
    """Fold one model: load, rewrite + verify, write. Bad input raises NormoptError; a model
    that fails verification (or --check) is an outcome with a non-zero exit code."""
    started = time.perf_counter()
    pipeline.release_kept()  # the graph of the model before this one, in a batch
    notes: list[str] = []
    with progress.step(f"loading {model}"):
        # First: a missing input is named as such, not as a missing output folder. A model large
        # enough for its shape inference to run beside the import has the checker run there too.
        source = model_io.load(model, notes, check_later=pipeline.in_background)
    # In place through a symbolic link: the file it points to is replaced; the link stays.
    out_path = Path(os.path.realpath(model)) if s.in_place else _output_path(model, output)
    if not s.dry_run and not s.in_place and out_path.exists() and out_path.resolve() == Path(model).resolve():
        raise UsageError(f"output '{out_path}' is the input file; choose another -o, or --in-place")
    if not s.dry_run and not out_path.parent.is_dir():
        raise UsageError(f"cannot write '{out_path}': folder '{out_path.parent}' does not exist")
    _check_writes(model, source, out_path, s)
    s.options.external_data = True if s.external_data else None
    # Candidates are written beside the output: the verified one is then renamed into place.
    stage_dir = _stage_dir(out_path) if (s.options.verify and not s.dry_run) else None
    try:
        stage = None
        if stage_dir is not None:
            stage = stage_dir / (_in_place_name(out_path) if s.in_place else out_path.name)
        return _fold_staged(model, source, out_path, s, stage, started, notes)
    except ModelSaveError as err:
        if stage_dir is None or str(stage_dir) not in str(err):
            raise
        # the candidate's temporary name says nothing to the user: the output it was to be
        raise ModelSaveError(str(err).replace(str(stage), str(out_path)).replace(str(stage_dir), str(out_path.parent))) \
            from err
    finally:
        model_io.mark_checked(source)   # checked by now, or never to be used again
        if stage_dir is not None:
            shutil.rmtree(stage_dir, ignore_errors=True)


def _output_path(model: str, output: str | None) -> Path:
    """``-o`` for one model: a file, or a folder (one that exists, or a name ending in '/',
    created) to write the model into under its own name; none: ``<stem>.normopt.onnx`` beside it."""
    if output is None:
        return model_io.default_output(model)
    out = Path(output)
    if output.endswith(("/", os.sep)) and not out.exists() and out.parent.is_dir():
        try:
            out.mkdir()
        except OSError as err:
            raise UsageError(f"cannot create output folder '{output}': {err.strerror or err}") from err
    return out / Path(model).name if out.is_dir() else out


def _check_writes(model: str, source, out_path: Path, s: FoldSettings) -> None:
    """Before any work: nothing the run writes (the output, the data file beside it) is one of
    the input's files (the model, a data file it reads): a rename over one of them would destroy
    the input. In place, the model's own switch is the point, and its new data file gets a fresh
    name. Nor is the report one of the model's files."""
    here = os.path.dirname(os.path.realpath(model))
    inputs = {os.path.realpath(model): "the input model"}
    inputs.update((path, f"a data file of the input ('{os.path.relpath(path, here)}')")
                  for path in model_io.external_files(source, here))
    writes = [] if s.dry_run else [out_path] if s.in_place else [out_path, out_path.with_name(out_path.name + ".data")]
    if s.options.verify:   # onnxruntime opens the input, and the candidate under the output's name
        for path, what in ((model, "the input"), (out_path, "the output")):
            unopenable = model_io.unopenable_name(path)
            if unopenable:
                raise UsageError(f"{unopenable} ({what}); rename it, or fold with --no-verify")
    for path in writes:
        what = "the output" if path == out_path else "the output's data file"
        if model_io.special_file(path):   # the rename would put a regular file in its place
            raise UsageError(f"cannot write '{path}' ({what}): it is {model_io.NOT_REGULAR}; choose another -o")
        real = os.path.realpath(path)
        if real in inputs and not (s.in_place and real == os.path.realpath(model)):
            raise UsageError(f"cannot write '{path}' ({what}): it is {inputs[real]}; choose another -o")
    data = out_path.with_name(out_path.name + ".data")
    if not s.dry_run and not s.in_place and data.exists() and (s.external_data or model_io.has_external_data(source)):
        # Written over, another model's data file would change what that model computes.
        others, _ = model_io.files_referenced_beside(out_path)
        if os.path.realpath(data) in others:
            raise UsageError(f"cannot write '{data}' (the output's data file): another model in its folder refers "
                             "to it; choose another -o")
    # (the input's own files, existing and no reports, were refused as reports before any work)
    if s.report_path and any(os.path.realpath(s.report_path) == os.path.realpath(path) for path in writes):
        raise ReportPathError(f"cannot write report '{s.report_path}': it is where the model is written")


def _fold_staged(model, source, out_path: Path, s: FoldSettings, stage: Path | None,
                 started: float, notes: list[str]) -> FileOutcome:
    try:
        result = optimize(source, s.options, source=model, stage=stage)
    except VerificationError as err:  # --strict and a rollback, or a non-deterministic input: reported too
        if getattr(err, "result", None) is None:
            raise
        err.result.pipeline.notes[:0] = notes
        doc = report.fold_document(input=model, output=None, status=err.status, result=err.result,
                                   target=s.options.target, seconds=time.perf_counter() - started) \
            if s.report_path else None
        return FileOutcome(str(model), None, err.status, err.exit_code, str(err), [], doc, str(err))
    result.pipeline.notes[:0] = notes
    verified = result.verified
    write = not s.dry_run and (verified or s.force)
    if write:
        _check_output(result.rewritten.model, source)
        with progress.step(f"saving {out_path}"):
            if result.staged is not None:  # the verified candidate, written beside the output
                old_data = model_io.external_files_at(model) if s.in_place else set()
                _commit_staged(result.staged, out_path)
                if old_data:
                    result.pipeline.notes.extend(_drop_old_data(out_path, old_data))
            else:
                result.save(out_path, external_data=s.options.external_data)  # the input's layout unless forced
    pending = []
    if s.check:
        from normopt.sites import sites_from_records
        pending = sites_from_records(source, result.rewritten.model, result.pipeline).pending
    status = "ok" if verified else "verification_failed"
    if verified and pending:
        status = "not_folded"
    seconds = time.perf_counter() - started
    doc = report.fold_document(input=model, output=str(out_path) if write else None, status=status, result=result,
                               target=s.options.target, seconds=seconds, pending=pending) if s.report_path else None
    lines = report.pipeline_lines(result.pipeline, s.verbose) + report.verify_lines(result.verification, s.verbose)
    lines += [f"rolled back {rb.pass_name} at {rb.anchor}{' in ' + rb.graph if rb.graph else ''}: {rb.reason}"
              for rb in result.rollbacks]
    if write:
        lines.append(f"wrote {out_path}")
    elif s.check:
        lines.append(f"check: {len(pending)} rewrite(s) left to apply" + (":" if pending else "; nothing to do"))
        lines += ["  " + line for line in report.site_lines(pending, s.verbose)]
    elif s.dry_run:
        lines.append("dry run: no output written")
    lines.append(f"time: {seconds:.2f} s; peak memory {report.peak_memory_bytes() / 2**20:.0f} MiB")
    outcome = FileOutcome(str(model), str(out_path) if write else None, status, 0, "", lines, doc, pending=pending)
    outcome.brief = _brief(result, pending if s.check else None)
    if not verified:
        suffix = "output written anyway (--force)" if write else "output NOT written (use --force to write it anyway)"
        outcome.exit_code, outcome.error = 1, f"{report.failure_message(result.verification)}; {suffix}"
    elif pending:
        outcome.exit_code = NotFoldedError.exit_code
        outcome.error = f"--check: {len(pending)} rewrite(s) left to apply; run 'normopt fold' on it"
    return outcome


def _brief(result, pending) -> str:
    parts = [f"{len(result.pipeline.applied)} rewrite(s)", f"nodes {result.pipeline.nodes_before} -> "
             f"{result.pipeline.nodes_after}"]
    if pending is not None:
        parts[0] = f"{len(pending)} rewrite(s) left" if pending else "nothing left to rewrite"
    v = result.verification
    if v is None:
        parts.append("not verified")
    elif v.passed:
        worst = max((o.max_abs for o in v.outputs), default=0.0)
        parts.append(f"verified on {v.provider.upper()} (max |diff| {worst:.1e})")
    else:
        parts.append("verification FAILED")
    if result.rollbacks:
        parts.append(f"{len(result.rollbacks)} rolled back")
    return ", ".join(parts)


def _error(code: int, message: str) -> NormoptError:
    cls = {1: VerificationError, NotFoldedError.exit_code: NotFoldedError, 3: ProviderUnavailableError}.get(code)
    err = cls(message) if cls else NormoptError(message)
    err.exit_code = code
    return err


# ----------------------------------------------------------------------------- batch

def _fold_batch(models, output, settings: FoldSettings, jobs: int, report_path, quiet: bool) -> NormoptError | None:
    started = time.perf_counter()
    files = _expand(models)
    outputs = _batch_outputs(files, output, settings.dry_run)
    tasks = [(str(f), str(o) if o else None, settings) for f, o in zip(files, outputs)]
    if jobs == 1 or len(tasks) == 1:
        results = map(_fold_task, tasks)
        pool = None
    else:
        import multiprocessing  # only for -j: not imported on every run
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=multiprocessing.get_context("spawn"))
        results = pool.map(_fold_task, tasks)
    outcomes = []
    try:
        for outcome in results:
            outcomes.append(outcome)
            _print_status(outcome, settings, quiet)
    except KeyboardInterrupt:
        if pool is not None:   # Ctrl-C reaches the workers too; SIGTERM to this process does not
            import signal
            for proc in multiprocessing.active_children():   # the pool's workers
                try:
                    os.kill(proc.pid, signal.SIGTERM)
                except OSError:
                    pass
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)   # waits for the workers: their temporary files are gone after
    seconds = time.perf_counter() - started
    failed = [o for o in outcomes if o.exit_code]
    if report_path:
        _write_json(report_path, report.batch_document(
            [{**o.report, "exit_code": o.exit_code} if o.report is not None
             else report.file_error(o.input, o.status, o.exit_code, o.error) for o in outcomes], seconds))
    if not quiet:
        _echo(f"{len(outcomes)} model(s): {len(outcomes) - len(failed)} ok, {len(failed)} failed; "
                   f"{seconds:.1f} s")
    if failed:
        first = failed[0]
        return _error(first.exit_code, f"{len(failed)} of {len(outcomes)} model(s) failed (first: {first.input}: "
                                       f"{first.error})")
    return None


_stopped = False   # a worker process told to stop (-j): the models still queued to it are not started


def _in_worker() -> bool:
    import multiprocessing

    return multiprocessing.current_process().name != "MainProcess"


def _stop_in_worker() -> None:
    """In a worker process of ``-j``: SIGTERM and SIGINT raise in the model being folded, as in
    the command (its temporary files go with its ``finally``), and no queued model starts after."""
    import signal

    if not _in_worker():
        return

    def handler(signum, frame):
        global _stopped
        if _stopped:   # Ctrl-C reaches a worker twice (from the terminal, then from the command):
            return     # the second must not cut short the cleanup the first started
        _stopped = True
        raise signals.Terminated()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _fold_task(task) -> FileOutcome:
    """One model of a batch (in a worker process with -j): never raises."""
    model, output, settings = task
    _stop_in_worker()
    if _stopped:
        return FileOutcome(model, None, "error", 130, "interrupted before it started")
    try:
        with _libraries_quiet():   # as in the command's own process (_Group.invoke)
            return fold_file(model, output, settings)
    except KeyboardInterrupt:
        if not _in_worker():   # without -j the batch itself stops here
            raise
        return FileOutcome(model, None, "error", 130, "interrupted (no partial output is left)")
    except NormoptError as err:
        return FileOutcome(model, None, "error", err.exit_code, str(err))
    except Exception as err:  # a bug: the other models still run
        return FileOutcome(model, None, "error", 2, f"internal error: {type(err).__name__}: {err}")


def _print_status(o: FileOutcome, settings: FoldSettings, quiet: bool) -> None:
    if o.exit_code:
        tag = "LEFT" if o.exit_code == NotFoldedError.exit_code else "FAILED"
        _echo(click.style(f"{tag:7}", fg="red", bold=True) + f" {o.input}: {one_line(o.error)} (exit {o.exit_code})",
                   err=True)
        if o.pending and not quiet:
            for line in report.site_lines(o.pending, settings.verbose):
                _echo(f"          {line}", err=True)
        return
    if quiet:
        return
    where = f" -> {o.output}" if o.output else ""
    _echo(click.style(f"{'ok':7}", fg="green") + f" {o.input}{where}: {o.brief}")
    if settings.verbose:
        for line in o.lines:
            _echo(f"          {line}")


def _expand(models) -> list[Path]:
    """Files as given; a folder stands for its .onnx files (not recursive; earlier outputs,
    *.normopt.onnx, excluded), sorted by name."""
    files: list[Path] = []
    seen: set[str] = set()
    for item in models:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.glob("*.onnx") if f.is_file() and not f.name.endswith(".normopt.onnx"))
            if not found:
                raise UsageError(f"folder '{p}' has no .onnx models")
            files.extend(found)
        else:
            files.append(p)
    unique = []
    for f in files:   # the same file named twice (m.onnx ./m.onnx) is folded once
        key = os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _batch_outputs(files: list[Path], output, dry_run: bool) -> list[Path | None]:
    if output is None or dry_run:
        return [None] * len(files)
    folder = Path(output)
    if (folder.exists() and not folder.is_dir()) or (not folder.exists() and folder.suffix == ".onnx"):
        raise UsageError(f"-o '{folder}' is a file; with several models -o names an output folder")
    if not folder.parent.is_dir():
        raise UsageError(f"cannot create output folder '{folder}': folder '{folder.parent}' does not exist")
    outs = [folder / f.name for f in files]
    seen: dict[Path, Path] = {}
    for f, out in zip(files, outs):
        if out in seen:
            raise UsageError(f"'{seen[out]}' and '{f}' would both be written to '{out}'; fold them separately")
        seen[out] = f
        if f.exists() and out.exists() and out.resolve() == f.resolve():
            raise UsageError(f"output '{out}' is the input file; choose another -o folder")
    try:
        folder.mkdir(exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create output folder '{folder}': {err.strerror or err}") from err
    return outs


# ----------------------------------------------------------------------------- inspect

@cli.command("inspect", epilog=EXIT_CODES)
@click.argument("model", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="text for people, json (see normopt/schema/report.schema.json) for tools.")
@click.option("--passes", "pass_list", default=None, metavar="A,B", help="Run only these passes.")
@click.option("--skip", "skip_list", default=None, metavar="A,B", help="Do not run these passes.")
@click.option("--target", type=click.Choice(TARGETS), default="portable", show_default=True,
              help="As for fold: which rewrites the target keeps.")
@click.option("--no-opset-upgrade", is_flag=True, help="As for fold: report fusions that need a newer opset as skipped.")
@click.option("-v", "--verbose", is_flag=True, help="Every node of each site; tracebacks on errors.")
@click.pass_context
def inspect_cmd(ctx, model, fmt, pass_list, skip_list, target, no_opset_upgrade, verbose):
    """List every normalization site of MODEL and what 'fold' would do with it, with the reason
    for each site it leaves alone. Runs the passes' matching on the model, without verification;
    writes nothing."""
    ctx.meta["normopt.verbose"] = verbose
    progress.enable(sys.stderr.isatty())
    started = time.perf_counter()
    names = registry.resolve(_split(pass_list), _split(skip_list))
    with progress.step(f"loading {model}"):
        source = model_io.load(model)
    from normopt.sites import inspect_model

    found = inspect_model(source, names, not no_opset_upgrade, target, base_dir=str(Path(model).resolve().parent))
    if fmt == "json":
        _echo(report.to_json(report.inspect_document(model=model, inspection=found, target=target,
                                                     seconds=time.perf_counter() - started)), raw=True)
        return
    _echo(report.inspect_summary(model, found))
    for up in found.pipeline.upgrades:
        _echo(f"fold raises the opset {up.from_version} -> {up.to_version} (for {up.for_pass})")
    for line in report.site_lines(found.sites, verbose):
        _echo(f"  {line}")


@cli.command(epilog=EXIT_CODES)
@click.argument("reference", type=click.Path())
@click.argument("candidate", type=click.Path())
@_verify_options
@click.pass_context
def verify(ctx, reference, candidate, provider, seed, trials, input_shapes, input_ranges, inputs_file, atol, rtol,
           report_path, verbose, quiet):
    """Compare two models with the same inputs and outputs (exit 0 equal, 1 different)."""
    ctx.meta["normopt.verbose"] = verbose
    progress.enable(sys.stderr.isatty() and not quiet)
    started = time.perf_counter()
    _check_report_path(report_path)
    from normopt.verify import Loaded, compare

    # Read once, with clear errors for unreadable files; onnxruntime loads the files themselves.
    result = compare(*(Loaded(p, model_io.load(p)) for p in (reference, candidate)), provider=provider, seed=seed, trials=trials,
                     input_shapes=parse_shapes(input_shapes), input_ranges=parse_ranges(input_ranges),
                     inputs_file=inputs_file, atol=atol, rtol=rtol)
    if report_path:
        _write_json(report_path, report.verify_document(
            reference=reference, candidate=candidate, status="ok" if result.passed else "verification_failed",
            verification=result, seconds=time.perf_counter() - started))
    if not quiet:
        for line in report.verify_lines(result, verbose):
            _echo(line)
    if not result.passed:
        raise VerificationError(report.failure_message(result))


@cli.command("passes")
def list_passes():
    """List the passes, in the order they run."""
    for name, cls in registry.available().items():
        _echo(f"{name:18} {registry.describe(cls)}")


_STYLE = re.compile(r"(\x1b\[[0-9;]*m)")


def _echo(text: str = "", err: bool = False, raw: bool = False) -> None:
    """``click.echo`` of one line whose names are printed escaped (a tensor name may hold a line
    break or a terminal escape; the colours of ``click.style`` stay), and that outlives a closed
    or broken stdout (``| head``, ``>&-``): what the run did and its exit code do not depend on
    whether its summary could be printed. ``raw``: JSON or a block of lines, printed as it is."""
    if not raw:
        text = "".join(part if _STYLE.fullmatch(part) else one_line(part) for part in _STYLE.split(text))
    try:
        click.echo(text, err=err)
    except (OSError, ValueError, AttributeError):   # EPIPE, a closed stream, no stream at all
        pass


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped (a tensor name may hold
    any of them): an error stays one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _check_output(model, source) -> None:
    """The output passes the full check (strict shape inference included) whenever the input
    does; the input is only checked when the output fails (one full check in the common case)."""
    import onnx

    try:
        if not model_io.passes_full_check(model):
            if model_io.passes_full_check(source):
                model_io.check(model, full=True)  # raises with the reason
            model_io.check(model, full=False)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        from normopt.errors import ModelSaveError
        raise ModelSaveError(f"the rewritten model fails the ONNX checker: {' '.join(str(err).split())[:200]}; "
                             "output NOT written") from err


def _stage_dir(out_path: Path) -> Path:
    try:
        return Path(tempfile.mkdtemp(prefix=".normopt-", dir=out_path.parent))
    except OSError as err:
        raise ModelSaveError(f"cannot write '{out_path}': {err.strerror or err}") from err


def _commit_staged(staged: Path, out_path: Path) -> None:
    """Rename the verified candidate's data file (named after the staged model file, as the model
    refers to it), then the candidate itself, into place (``model_io.switch_into_place``): when
    the switch fails or is interrupted, the model already there keeps its own data file."""
    data = staged.with_name(staged.name + ".data")
    try:
        if out_path.exists():   # a file replaced keeps its permissions (a 0640 model stays 0640)
            mode = stat.S_IMODE(out_path.stat().st_mode)
            for path in (staged, data):
                if path.exists():
                    os.chmod(path, mode)
        model_io.switch_into_place(staged, out_path, (data, out_path.with_name(data.name)) if data.exists() else None)
    except OSError as err:
        raise ModelSaveError(f"cannot write '{out_path}': {err.strerror or err}") from err


def _drop_old_data(out_path: Path, old_data: set[str]) -> list[str]:
    """After an in-place switch: remove each data file the replaced model used that the new
    model does not use and no other ``*.onnx`` model in the folder refers to; notes say what
    was removed or kept, and why."""
    new_data = model_io.external_files_at(out_path)
    others, unreadable = model_io.files_referenced_beside(out_path)
    notes = []
    for path in sorted(old_data):
        name = os.path.relpath(path, out_path.resolve().parent)
        if path in new_data or path == os.path.realpath(out_path) or not os.path.exists(path) or \
                any(os.path.exists(n) and os.path.samefile(path, n) for n in new_data):
            continue
        if path in others or unreadable:
            why = "another model in the folder refers to it" if path in others else \
                f"'{unreadable[0]}' in the folder could not be read to tell whether it refers to it"
            notes.append(f"kept the replaced model's data file '{name}': {why}")
            continue
        try:
            os.unlink(path)
        except OSError as err:
            notes.append(f"could not remove the replaced model's data file '{name}': {err.strerror or err}")
            continue
        notes.append(f"removed the replaced model's data file '{name}' (no model in the folder refers to it)")
    return notes


def _in_place_name(out_path: Path) -> str:
    """The name the in-place candidate is staged under; its data file, if any, is that name +
    '.data', a file that does not exist yet (``m.onnx.data``, else ``m.1.onnx.data``, ...): the
    input's own data file is never written over, and the switch is the model file's rename."""
    name, n = out_path.name, 0
    while (out_path.parent / (name + ".data")).exists():
        n += 1
        name = f"{out_path.stem}.{n}{out_path.suffix}"
    return name


def _terminate_as_interrupt() -> None:
    """SIGTERM raised like Ctrl-C, so that every ``finally`` removes its temporary files (the
    command has this from its start; a caller of ``main`` gets it here)."""
    import threading

    if threading.current_thread() is threading.main_thread():
        signals.install(sigint=False)


def _check_report_path(path: str | None) -> None:
    """Before any work: a report that cannot be written must not fail the run after the model
    was. Its folder must take a new file, and a file already there is replaced only when it is a
    normopt report (an input model, a data file or anything else is never written over)."""
    if not path:
        return
    folder = Path(path).parent
    if not folder.is_dir():
        raise ReportPathError(f"cannot write report '{path}': folder '{folder}' does not exist")
    _replaceable_report(path)
    try:
        fd, probe = tempfile.mkstemp(prefix=".normopt-report-", dir=folder)
    except OSError as err:
        raise ReportPathError(f"cannot write report '{path}': {err.strerror or err}") from err
    os.close(fd)
    os.unlink(probe)


def _replaceable_report(path: str) -> None:
    """Raise unless ``path`` is free or holds a normopt report (JSON with its schema_version)."""
    p = Path(path)
    if not os.path.lexists(p):
        return
    if p.is_dir():
        raise ReportPathError(f"cannot write report '{path}': it is a folder")
    if not p.is_file():   # a device, a FIFO (opening one to read it would wait for a writer), a socket
        raise ReportPathError(f"cannot write report '{path}': it is {model_io.NOT_REGULAR}")
    try:
        with open(p, "rb") as f:
            head = f.read(1 << 16)
        ours = head.lstrip().startswith(b"{") and b'"schema_version"' in head and b'"normopt_version"' in head \
            and p.stat().st_size < (1 << 30)
    except OSError as err:
        raise ReportPathError(f"cannot write report '{path}': {err.strerror or err}") from err
    if not ours:
        raise ReportPathError(f"cannot write report '{path}': the file there is not a normopt report, and is not "
                         "written over")


def _write_json(path: str, doc: dict) -> None:
    """The report, written whole or not at all: a temporary file beside it, renamed over it."""
    _replaceable_report(path)
    target = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".normopt-report-", dir=target.parent)
        with os.fdopen(fd, "w") as f:
            f.write(report.to_json(doc) + "\n")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)   # as a file the report's writer creates (mkstemp's is 0600)
        os.replace(tmp, target)
        tmp = None
    except OSError as err:
        raise ReportPathError(f"cannot write report '{path}': {err.strerror or err}") from err
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="normopt")


def entry() -> None:  # pragma: no cover - exercised as a subprocess by the tests
    """The ``normopt`` command: ``main()``, then the process ends at once with its exit code.
    Every file is written and closed by then; what is left is memory (a large graph's million
    objects), which the OS reclaims faster than the interpreter frees it object by object."""
    pipeline.keep_graphs_until_exit()
    pipeline.infer_in_background()
    for fd in (0, 1, 2):
        # A standard stream closed by the caller (``>&-``) gets /dev/null: else the next file
        # opened would take its number, and whatever a library prints would go into that file.
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)   # the lowest free number: this one
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code
    except KeyboardInterrupt:   # (click turns one into its own exit 1, below)
        print(f"error: {signals.MESSAGE}", file=sys.stderr)
        code = 130
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    if code and signals.received:   # stopped by a signal, whatever it cut short
        code = 130
    flush_streams()   # a closed pipe: nothing more can be said there
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
