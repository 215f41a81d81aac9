"""The ``predict`` command: load an archive in-process, run one batch, print the answers as JSON.

The quickest check of an archive in a build script: no server, no ports. Exit 0 when every input was
answered, 1 when any failed (its error is printed in the same JSON list, in its place; when the handler
raised, the frames from the archive's own files follow on stderr).
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any

import click

from archiver.commands.options import cache_dir_option
from archiver.errors import ArchiverError, InputFileError, UsageError


def _payload(item: str) -> Any:
    """A file becomes the raw body (like ``curl -T``); a ``.json`` file is sent as JSON."""
    path = Path(item)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputFileError(f"cannot read input {item}: {exc.strerror}") from exc
    if path.suffix.lower() == ".json":
        try:
            return json.loads(data)
        except ValueError as exc:
            raise UsageError(f"input {item} is not valid JSON: {exc}") from exc
    return data


def answer_to_json(answer: Any) -> Any:
    """One answer as printable JSON: errors as {code,type,message}, bytes as base64."""
    if isinstance(answer, ArchiverError):
        return {"code": answer.http_status, "type": type(answer).__name__, "message": answer.message}
    if isinstance(answer, (bytes, bytearray)):
        return {"bytes": len(answer), "base64": base64.b64encode(bytes(answer)).decode("ascii")}
    return answer


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("archive", type=click.Path(exists=True))
@click.argument("inputs", nargs=-1)
@click.option("--json", "json_inputs", multiple=True, help="A JSON payload given inline (repeatable).")
@cache_dir_option()
def predict(
    archive: str, inputs: tuple[str, ...], json_inputs: tuple[str, ...], cache_dir: str | None
) -> None:
    """Run INPUTS (files) through ARCHIVE's handler as one batch and print the answers as JSON.

    One input prints its answer; several print a list, in order. A file is sent as the raw body (as
    ``curl -T``), a .json file as JSON.

    \b
    model-archiver predict resnet34.mar kitten.jpg
    """
    payloads = [_payload(i) for i in inputs]
    for text in json_inputs:
        try:
            payloads.append(json.loads(text))
        except ValueError as exc:
            raise UsageError(f"--json value is not valid JSON: {exc}") from exc
    if not payloads:
        raise UsageError("give at least one input file (or --json PAYLOAD)")
    from archiver.serving.worker.loader import load_model
    from archiver.serving.worker.tracebacks import error_block, user_trace

    model = load_model(archive, cache_dir=cache_dir, batch_size=len(payloads))
    failures: list[BaseException] = []
    model.on_handler_error = failures.append
    try:
        answers = model.predict(payloads)
    finally:
        model.close()
    out = [answer_to_json(a) for a in answers]
    click.echo(json.dumps(out[0] if len(out) == 1 else out, indent=2))
    for exc in failures:  # the handler raised: where, in the archive's own files (stderr)
        click.echo(
            error_block(f'handler error in model "{model.name}"', user_trace(exc, model.model_dir)), err=True
        )
    if any(isinstance(a, ArchiverError) for a in answers):
        sys.exit(1)
