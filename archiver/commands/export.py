"""The ``export`` command: build a model from code (+ weights) and write a checked serialized file."""

from __future__ import annotations

import warnings

import click

METHOD_SUFFIX = {"trace": ".pt", "script": ".pt", "export": ".pt2"}


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
    help="torch.jit.trace, torch.jit.script (both TorchScript .pt), or torch.export (.pt2).",
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
    help="File to write.  [default: model.pt, or model.pt2 for --method export]",
)
@click.option("--rtol", type=float, default=1e-4, show_default=True, help="Relative tolerance of the check.")
@click.option("--atol", type=float, default=1e-5, show_default=True, help="Absolute tolerance of the check.")
def export(
    model_spec: str,
    weights: str | None,
    method: str,
    example_inputs: tuple[str, ...],
    output: str | None,
    rtol: float,
    atol: float,
) -> None:
    """Export a model to TorchScript or torch.export, in eval mode, and check it against the eager model."""
    from archiver.export import export_model, load_model_object, parse_example_input

    inputs = tuple(parse_example_input(spec) for spec in example_inputs)
    model = load_model_object(model_spec, weights)
    with warnings.catch_warnings():
        # torch prints three multi-line FutureWarnings for one trace; one line says the same.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
        path = export_model(
            model,
            inputs,
            output or f"model{METHOD_SUFFIX[method]}",
            method=method,
            rtol=rtol,
            atol=atol,
        )
    if method != "export":
        click.echo(
            "note: torch 2.14 deprecates TorchScript (torch.jit); --method export is the maintained path",
            err=True,
        )
    click.echo(str(path))
