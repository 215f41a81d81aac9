"""The ``export`` command: build a model from code (+ weights) and write a checked serialized file."""

from __future__ import annotations

import sys
import threading
import time
import warnings

import click

METHOD_SUFFIX = {"trace": ".pt", "script": ".pt", "export": ".pt2", "aoti": ".pt2"}


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--model",
    "model_spec",
    required=True,
    help="What builds the model: pkg.module:factory or path/to/file.py:ClassName (called with no arguments).",
)
@click.option(
    "--weights",
    type=click.Path(dir_okay=False),
    help="A state_dict (.pth/.pt) to load into the model, read with torch.load(weights_only=True).",
)
@click.option(
    "--method",
    type=click.Choice(list(METHOD_SUFFIX)),
    default="trace",
    show_default=True,
    help="torch.jit.trace, torch.jit.script (both TorchScript .pt), torch.export (.pt2), or aoti: "
    "torch.export with a dynamic batch, compiled to C++ by AOTInductor (.pt2; fastest, needs a C++ "
    "compiler; see docs/export-methods.md).",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    help="--method aoti: the largest batch the package serves (batch 1 to this).  "
    "[default: --config-file's batchSize, else the example's batch]",
)
@click.option(
    "--config-file",
    type=click.Path(dir_okay=False),
    help="--method aoti: the model-config.yaml the archive will carry; its batchSize is the default "
    "--max-batch.",
)
@click.option(
    "--example-input",
    "example_inputs",
    multiple=True,
    required=True,
    help="Shape[:dtype] of one example input, e.g. 1,3,224,224 or 1,128:int64. Repeat for several inputs.",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False),
    help="File to write.  [default: model.pt, or model.pt2 for --method export and aoti]",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="Where --method export and aoti trace and compile: cuda makes a package of CUDA kernels, "
    "served on a GPU (needs CUDA here).",
)
@click.option("--rtol", type=float, help="Relative tolerance of the check.  [default: 1e-4; 1e-3 for aoti]")
@click.option("--atol", type=float, help="Absolute tolerance of the check.  [default: 1e-5; 1e-4 for aoti]")
def export(
    model_spec: str,
    weights: str | None,
    method: str,
    max_batch: int | None,
    config_file: str | None,
    example_inputs: tuple[str, ...],
    output: str | None,
    rtol: float | None,
    atol: float | None,
    device: str,
) -> None:
    """Export a model to TorchScript, torch.export or AOTInductor, in eval mode, and check it against
    the eager model."""
    from archiver.errors import UsageError
    from archiver.export import check_device, export_model, load_model_object, parse_example_input

    check_device(method, device)  # before the model is built: no CUDA here is said at once
    if method != "aoti" and (max_batch is not None or config_file is not None):
        raise UsageError("--max-batch and --config-file apply to --method aoti only")
    if max_batch is None and config_file is not None:
        from archiver.config import load_model_config

        max_batch = load_model_config(config_file).batch_size
    inputs = tuple(parse_example_input(spec) for spec in example_inputs)
    model = load_model_object(model_spec, weights)
    with warnings.catch_warnings(), _StageReporter() as on_stage:
        # torch prints three multi-line FutureWarnings for one trace; one line says the same.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
        path = export_model(
            model,
            inputs,
            output or f"model{METHOD_SUFFIX[method]}",
            method=method,
            rtol=rtol,
            atol=atol,
            max_batch=max_batch,
            on_stage=on_stage,
            device=device,
        )
    if method not in ("export", "aoti"):
        click.echo(
            "note: torch 2.14 deprecates TorchScript (torch.jit); --method export is the maintained path",
            err=True,
        )
    click.echo(str(path))


class _StageReporter:
    """Progress of a long export on stderr: each stage as it starts, how long the last one took, and
    while one runs, the seconds so far (in place on a terminal, every 10 s otherwise)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._text = ""
        self._tty = sys.stderr.isatty()

    def __enter__(self) -> _StageReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._finish(ok=exc[0] is None)

    def __call__(self, text: str) -> None:
        self._finish(ok=True)
        with self._lock:
            self._started = time.monotonic()
            self._text = text
            self._stop = threading.Event()
            click.echo(f"export: {text} ...", err=True, nl=not self._tty)
            self._thread = threading.Thread(target=self._tick, args=(text, self._stop), daemon=True)
            self._thread.start()

    def _tick(self, text: str, stop: threading.Event) -> None:
        interval = 1.0 if self._tty else 10.0
        while not stop.wait(interval):
            with self._lock:
                if stop.is_set():
                    return
                seconds = time.monotonic() - self._started
                if self._tty:
                    click.echo(f"\rexport: {text} ... {seconds:.0f} s", err=True, nl=False)
                else:
                    click.echo(f"export:   still working ({seconds:.0f} s)", err=True)

    def _finish(self, *, ok: bool) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        seconds = time.monotonic() - self._started
        with self._lock:
            end = f"done in {seconds:.1f} s" if ok else f"stopped after {seconds:.1f} s"
            if self._tty:
                click.echo(f"\rexport: {self._text} ... {end}", err=True)
            else:
                click.echo(f"export:   {end}", err=True)
