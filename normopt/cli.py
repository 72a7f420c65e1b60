"""Command line: ``normopt fold``, ``normopt verify``, ``normopt passes``.

Exit codes: 0 success, 1 verification failed, 2 bad input or usage, 3 requested provider
unavailable. Errors are one line on stderr; ``-v`` adds the traceback.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import click

from normopt import model_io, registry, report
from normopt.errors import ModelSaveError, NormoptError, UsageError, VerificationError
from normopt.fold import FoldOptions, optimize
from normopt.inputs import parse_ranges, parse_shapes
from normopt.verify import Loaded, compare

EXIT_CODES = "Exit codes: 0 success, 1 verification failed, 2 bad input or usage, 3 requested provider unavailable."


class _Group(click.Group):
    """Turns NormoptError into one line on stderr and its exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except NormoptError as err:
            _fail(ctx, str(err), err.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as err:  # a bug: still one line unless -v
            _fail(ctx, f"internal error: {type(err).__name__}: {err} (run with -v for the traceback)", 2)


def _fail(ctx: click.Context, message: str, code: int):
    if ctx.meta.get("normopt.verbose"):
        traceback.print_exc()
    click.echo(f"error: {message}", err=True)
    ctx.exit(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
@click.version_option(package_name="normopt")
def cli():
    """Fold BatchNormalization and fuse decomposed normalizations in ONNX models,
    then prove the result equivalent with onnxruntime."""


def _verify_options(fn):
    options = [
        click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
                     help="onnxruntime provider for verification; auto = CUDA when really usable, else CPU."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs."),
        click.option("--trials", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Number of random input sets (seed, seed+1, ...)."),
        click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DxD...",
                     help="Shape for an input with dynamic dims (default: 1 for the first axis, 8 for others; 32, 224, then 1 if the model cannot run at 8)."),
        click.option("--input-range", "input_ranges", multiple=True, metavar="NAME:LOW:HIGH",
                     help="Value range [LOW, HIGH) for an input, e.g. input_ids:0:30522."),
        click.option("--inputs", "inputs_file", type=click.Path(dir_okay=False), default=None,
                     help="Real inputs: an .npz file with one array per input name."),
        click.option("--atol", type=float, default=None, help="Absolute tolerance (default per dtype: fp32 1e-5, fp16 1e-2)."),
        click.option("--rtol", type=float, default=None, help="Relative tolerance (default per dtype: fp32 1e-4, fp16 1e-2)."),
        click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
                     help="Write a JSON report to this file."),
        click.option("-v", "--verbose", is_flag=True, help="List every rewrite and skip; tracebacks on errors."),
        click.option("-q", "--quiet", is_flag=True, help="Print errors only."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@cli.command(epilog=EXIT_CODES)
@click.argument("model", type=click.Path())
@click.option("-o", "--output", type=click.Path(), default=None, help="Output path (default: <stem>.normopt.onnx beside MODEL).")
@click.option("--passes", "pass_list", default=None, metavar="A,B", help="Run only these passes (see 'normopt passes').")
@click.option("--skip", "skip_list", default=None, metavar="A,B", help="Do not run these passes.")
@click.option("--dry-run", is_flag=True, help="Rewrite and verify, but write no model.")
@click.option("--no-verify", is_flag=True, help="Do not verify with onnxruntime.")
@click.option("--force", is_flag=True, help="Write the output even when verification fails.")
@click.option("--strict", is_flag=True, help="Fail (exit 1) when any rewrite had to be rolled back; also run the ONNX checker after every pass.")
@click.option("--no-opset-upgrade", is_flag=True, help="Never raise the model's opset; skip fusions that need a newer one.")
@click.option("--external-data", is_flag=True, help="Store weights in <output>.data beside the output.")
@_verify_options
@click.pass_context
def fold(ctx, model, output, pass_list, skip_list, dry_run, no_verify, force, strict, no_opset_upgrade,
         external_data, provider, seed, trials, input_shapes, input_ranges, inputs_file, atol, rtol,
         report_path, verbose, quiet):
    """Fold and fuse normalization layers of MODEL, verify, and write the result.

    The input file is never modified; the output is written atomically and only when it
    verifies (unless --force or --no-verify).
    """
    ctx.meta["normopt.verbose"] = verbose
    names = registry.resolve(_split(pass_list), _split(skip_list))
    source = model_io.load(model)  # first: a missing input is named as such, not as a missing output folder
    out_path = Path(output) if output else model_io.default_output(model)
    if not dry_run and Path(model).exists() and out_path.exists() and out_path.resolve() == Path(model).resolve():
        raise UsageError(f"output '{out_path}' is the input file; choose another -o")
    if not dry_run and not out_path.parent.is_dir():
        raise UsageError(f"cannot write '{out_path}': folder '{out_path.parent}' does not exist")
    _check_report_path(report_path)
    options = FoldOptions(passes=names, allow_opset_upgrade=not no_opset_upgrade, verify=not no_verify,
                          provider=provider, seed=seed, trials=trials, input_shapes=parse_shapes(input_shapes),
                          input_ranges=parse_ranges(input_ranges), inputs_file=inputs_file, atol=atol, rtol=rtol,
                          strict=strict)
    full_ok = model_io.passes_full_check(source)
    options.external_data = True if external_data else None
    # Candidates are written beside the output: the verified one is then renamed into place.
    stage_dir = _stage_dir(out_path) if (options.verify and not dry_run) else None
    try:
        try:
            result = optimize(source, options, source=model,
                              stage=stage_dir / out_path.name if stage_dir is not None else None)
        except VerificationError as err:  # --strict and a rollback, or a non-deterministic input: reported too
            if report_path and getattr(err, "result", None) is not None:
                _write_fold_report(report_path, model, None, err.result, err.status)
            raise
        verified = result.verified
        write = not dry_run and (verified or force)
        if write:
            _check_output(result.rewritten.model, full_ok)
            if result.staged is not None:
                _commit_staged(result.staged, out_path)
            else:
                model_io.save(result.rewritten, out_path, external_data=options.external_data)
    finally:
        if stage_dir is not None:
            shutil.rmtree(stage_dir, ignore_errors=True)
    if report_path:
        _write_fold_report(report_path, model, out_path if write else None, result,
                           "ok" if verified else "verification_failed")
    if not quiet:
        for line in report.pipeline_lines(result.pipeline, verbose):
            click.echo(line)
        for line in report.verify_lines(result.verification, verbose):
            click.echo(line)
        for rb in result.rollbacks:
            click.echo(f"rolled back {rb.pass_name} at {rb.anchor}: {rb.reason}")
        if write:
            click.echo(f"wrote {out_path}")
        elif dry_run:
            click.echo("dry run: no output written")
    if not verified:
        suffix = "output written anyway (--force)" if write else "output NOT written (use --force to write it anyway)"
        raise VerificationError(f"{report.failure_message(result.verification)}; {suffix}")


@cli.command(epilog=EXIT_CODES)
@click.argument("reference", type=click.Path())
@click.argument("candidate", type=click.Path())
@_verify_options
@click.pass_context
def verify(ctx, reference, candidate, provider, seed, trials, input_shapes, input_ranges, inputs_file, atol, rtol,
           report_path, verbose, quiet):
    """Compare two models with the same inputs and outputs (exit 0 equal, 1 different)."""
    ctx.meta["normopt.verbose"] = verbose
    _check_report_path(report_path)
    # Read once, with clear errors for unreadable files; onnxruntime loads the files themselves.
    result = compare(*(Loaded(p, model_io.load(p)) for p in (reference, candidate)), provider=provider, seed=seed, trials=trials,
                     input_shapes=parse_shapes(input_shapes), input_ranges=parse_ranges(input_ranges),
                     inputs_file=inputs_file, atol=atol, rtol=rtol)
    if report_path:
        _write_report(report_path, reference=str(reference), candidate=str(candidate),
                      status="ok" if result.passed else "verification_failed", verification=result)
    if not quiet:
        for line in report.verify_lines(result, verbose):
            click.echo(line)
    if not result.passed:
        raise VerificationError(report.failure_message(result))


@cli.command("passes")
def list_passes():
    """List the passes, in the order they run."""
    for name, cls in registry.available().items():
        click.echo(f"{name:18} {registry.describe(cls)}")


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _check_output(model, full: bool) -> None:
    import onnx

    try:
        model_io.check(model, full=full)
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
    """Rename the verified candidate (and its data file) into place."""
    data = staged.with_name(staged.name + ".data")
    try:
        if data.exists():
            os.replace(data, out_path.with_name(out_path.name + ".data"))
        os.replace(staged, out_path)
    except OSError as err:
        raise ModelSaveError(f"cannot write '{out_path}': {err.strerror or err}") from err


def _check_report_path(path: str | None) -> None:
    """Before any work: a report that cannot be written must not fail the run after the model was."""
    if path and not Path(path).parent.is_dir():
        raise UsageError(f"cannot write report '{path}': folder '{Path(path).parent}' does not exist")


def _write_fold_report(path: str, model: str, output: Path | None, result, status: str) -> None:
    _write_report(path, input=str(model), output=str(output) if output else None, written=output is not None,
                  status=status, passes=result.pipeline.passes, opset_upgrades=result.pipeline.upgrades,
                  nodes_before=result.pipeline.nodes_before, nodes_after=result.pipeline.nodes_after,
                  seconds=result.pipeline.seconds, verification=result.verification, rollbacks=result.rollbacks)


def _write_report(path: str, **parts) -> None:
    try:
        Path(path).write_text(report.to_json(**parts) + "\n")
    except OSError as err:
        raise UsageError(f"cannot write report '{path}': {err.strerror or err}") from err


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="normopt")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
