"""The ``inspect`` and ``verify`` commands: what is in an archive, and whether it is intact."""

from __future__ import annotations

import json
import sys

import click

from archiver.reader import open_archive


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("archive_path", metavar="ARCHIVE", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and file table as JSON.")
def inspect(archive_path: str, as_json: bool) -> None:
    """Show an archive's manifest and its files with sizes and sha256 (.mar, .tar.gz or folder)."""
    with open_archive(archive_path) as reader:
        manifest = reader.manifest
        records = manifest.files or {}
        rows = []
        for name in reader.files():
            record = records.get(name)
            rows.append(
                {
                    "name": name,
                    "size": reader.size(name),
                    "sha256": record.sha256 if record else None,
                }
            )
        if as_json:
            doc = {
                "path": str(reader.path),
                "format": reader.format,
                "has_hashes": reader.has_hashes,
                "manifest": manifest.to_dict(),
                "files": rows,
            }
            click.echo(json.dumps(doc, indent=2))
            return
        model = manifest.to_dict()["model"]
        lines = [
            ("archive", f"{reader.path} ({reader.format})"),
            ("model", f"{manifest.model_name} version {manifest.model_version or '-'}"),
            ("handler", manifest.handler),
            *(
                (key, model[key])
                for key in ("serializedFile", "modelFile", "requirementsFile", "configFile")
                if key in model
            ),
            ("runtime", manifest.runtime),
            ("created", f"{manifest.created_on or '-'} by archiver {manifest.archiver_version or '-'}"),
        ]
        if not reader.has_hashes:
            lines.append(("hashes", "none recorded (not built by model-archiver)"))
        for label, value in lines:
            click.echo(f"{label + ':':<18}{value}")
        width = max(len(r["name"]) for r in rows)
        click.echo("")
        click.echo(f"{'file':<{width}}  {'size':>12}  sha256")
        for row in rows:
            digest = row["sha256"] or ("(manifest)" if row["name"] == "MAR-INF/MANIFEST.json" else "-")
            click.echo(f"{row['name']:<{width}}  {row['size']:>12,}  {digest}")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("archive_path", metavar="ARCHIVE", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify(archive_path: str, as_json: bool) -> None:
    """Check an archive's structure, manifest, handler and every file's sha256. Exit 0 if intact, else 1."""
    with open_archive(archive_path) as reader:
        report = reader.verify()
        count = len(reader.files())
    if as_json:
        doc = {
            "ok": report.ok,
            "has_hashes": report.has_hashes,
            "problems": report.problems,
            "notes": report.notes,
        }
        click.echo(json.dumps(doc, indent=2))
    else:
        for note in report.notes:
            click.echo(f"note: {note}")
        for problem in report.problems:
            click.echo(f"problem: {problem}")
        verdict = "OK" if report.ok else "FAILED"
        hashes = "all sha256 match" if report.has_hashes and report.ok else ""
        click.echo(f"{verdict}: {archive_path} ({count} files{', ' + hashes if hashes else ''})")
    if not report.ok:
        sys.exit(1)
