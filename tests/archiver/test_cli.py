"""The command line as a user types it: the seed's torch-model-archiver line, archive, inspect, verify."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from archiver.cli import cli, main

SEED = (
    "--model-name resnet34 --version 1.0 --serialized-file resnet34.pt "
    "--extra-files ./index_to_name.json,./MyHandler.py --handler my_handler.py --export-path model-store -f"
)
ARCHIVE_FLAGS = [
    "--model-name",
    "--serialized-file",
    "--model-file",
    "--handler",
    "--extra-files",
    "--runtime",
    "--export-path",
    "--archive-format",
    "-f, --force",
    "-v, --version",
    "-r, --requirements-file",
    "-c, --config-file",
]


@pytest.fixture
def seed_dir(tmp_path: Path, model_inputs, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder holding the seed's files under the seed's names, as the current directory."""
    work = tmp_path / "seed"
    work.mkdir()
    (work / "resnet34.pt").write_bytes(model_inputs.weights.read_bytes())
    (work / "index_to_name.json").write_text(model_inputs.labels.read_text())
    (work / "my_handler.py").write_text(model_inputs.handler.read_text())
    (work / "MyHandler.py").write_text("from my_handler import handle  # noqa\n")
    monkeypatch.chdir(work)
    return work


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as caught:
        main(args)
    out, err = capsys.readouterr()
    return caught.value.code, out, err


def test_seed_command_line_verbatim(seed_dir, capsys):
    code, out, err = run_main(shlex.split(SEED), capsys)
    assert (code, err) == (0, "")
    mar = seed_dir / "model-store" / "resnet34.mar"
    assert out.strip() == "model-store/resnet34.mar"
    code, out, _ = run_main(["inspect", "--json", str(mar)], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["ok"]
    assert [f["name"] for f in doc["files"]] == [
        "MAR-INF/MANIFEST.json",
        "MyHandler.py",
        "index_to_name.json",
        "my_handler.py",
        "resnet34.pt",
    ]
    model = doc["manifest"]["model"]
    assert model == {
        "modelName": "resnet34",
        "serializedFile": "resnet34.pt",
        "handler": "my_handler.py",
        "modelVersion": "1.0",
    }


def test_second_run_without_force_says_why_and_keeps_the_archive(seed_dir, capsys):
    run_main(shlex.split(SEED), capsys)
    mar = seed_dir / "model-store" / "resnet34.mar"
    before = mar.read_bytes()
    code, out, err = run_main(shlex.split(SEED.removesuffix(" -f")), capsys)
    assert code == 1 and out == ""
    assert err == (
        "model-archiver: error: model-store/resnet34.mar already exists; use -f/--force to overwrite it\n"
    )
    assert mar.read_bytes() == before


def test_archive_subcommand_is_the_same_command(seed_dir, capsys, epoch):
    run_main(shlex.split(SEED), capsys)
    implicit = (seed_dir / "model-store" / "resnet34.mar").read_bytes()
    run_main(["archive", *shlex.split(SEED)], capsys)
    assert (seed_dir / "model-store" / "resnet34.mar").read_bytes() == implicit


def test_validation_error_is_one_line_and_exit_1(seed_dir, capsys):
    code, _, err = run_main(["--model-name", "bad name!", "-v", "1", "--handler", "my_handler.py"], capsys)
    assert code == 1
    assert err.startswith("model-archiver: error: invalid model name 'bad name!'") and err.count("\n") == 1


def test_missing_required_flag_is_a_usage_error(seed_dir, capsys):
    code, _, err = run_main(["--model-name", "m", "--handler", "my_handler.py"], capsys)
    assert code == 2
    assert "Missing option '-v' / '--version'" in err and err.count("\n") == 1


def test_a_group_without_its_subcommand_names_the_choices_in_one_line(capsys):
    code, _, err = run_main(["deploy"], capsys)
    assert code == 2
    assert err == (
        "model-archiver: error: 'model-archiver deploy' needs a subcommand: kserve, ray "
        "(see 'model-archiver deploy --help')\n"
    )
    code, _, err = run_main(["deploy", "nowhere"], capsys)
    assert code == 2 and "No such command 'nowhere'" in err and err.count("\n") == 1


def test_help_lists_subcommands_and_every_archive_flag():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0, result.output
    for command in ("archive", "export", "inspect", "verify"):
        assert command in result.output
    from archiver.commands.archive import archive

    for flag in ARCHIVE_FLAGS:
        assert flag in result.output, f"{flag} missing from model-archiver --help"
    for param in archive.params:
        assert getattr(param, "help", None), f"{param.opts} has no help text"


def test_about_prints_the_tools_own_version():
    from archiver import __version__

    result = CliRunner().invoke(cli, ["--about"])
    assert result.output == f"model-archiver {__version__}\n"


def test_verify_and_inspect_a_good_archive(seed_dir, capsys):
    run_main(shlex.split(SEED), capsys)
    code, out, _ = run_main(["verify", "model-store/resnet34.mar"], capsys)
    assert code == 0
    assert out == "OK: model-store/resnet34.mar (5 files, all sha256 match)\n"
    code, out, _ = run_main(["inspect", "model-store/resnet34.mar"], capsys)
    assert code == 0
    assert "model:            resnet34 version 1.0" in out
    assert "resnet34.pt" in out and "ok" in out


def test_every_format_from_the_command_line(seed_dir, capsys):
    for fmt, name in [("default", "m.mar"), ("zip-store", "m.mar"), ("tgz", "m.tar.gz"), ("no-archive", "m")]:
        args = [
            "--model-name",
            "m",
            "-v",
            "1",
            "--handler",
            "my_handler.py",
            "--serialized-file",
            "resnet34.pt",
        ]
        code, out, err = run_main([*args, "--archive-format", fmt, "--export-path", fmt, "-f"], capsys)
        assert (code, err) == (0, ""), err
        assert Path(out.strip()) == Path(fmt) / name
        assert run_main(["verify", out.strip()], capsys)[0] == 0


def test_export_path_defaults_to_the_current_folder(seed_dir, capsys):
    code, out, _ = run_main(["--model-name", "here", "-v", "1", "--handler", "image_classifier"], capsys)
    assert code == 0
    assert Path(out.strip()) == seed_dir / "here.mar"


def test_real_console_script(seed_dir):
    script = Path(sys.executable).parent / "model-archiver"
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000"}
    proc = subprocess.run(
        [str(script), *shlex.split(SEED)], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(
        [str(script), "verify", "model-store/resnet34.mar"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.startswith("OK:")


def _run_in_a_terminal(args: list[str], cwd: Path) -> str:
    """Run the real console script with stdout and stderr on a pseudo-terminal; return what it showed."""
    import pty

    script = Path(sys.executable).parent / "model-archiver"
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([str(script), *args], cwd=cwd, stdout=terminal, stderr=terminal, stdin=terminal)
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the program exited and closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    assert proc.wait(timeout=120) == 0, shown
    return shown.decode(errors="replace")


def test_progress_bar_on_a_terminal_only_for_big_files(seed_dir):
    with open(seed_dir / "big.pt", "wb") as fh:
        fh.truncate(60 * 1000 * 1000)
    args = ["--model-name", "big", "-v", "1", "--handler", "my_handler.py", "--serialized-file", "big.pt"]
    on_terminal = _run_in_a_terminal(args, seed_dir)
    assert "archiving big" in on_terminal and "100%" in on_terminal
    small = _run_in_a_terminal([*args[:-1], "resnet34.pt", "-f"], seed_dir)
    assert "archiving" not in small
    piped = subprocess.run(
        [str(Path(sys.executable).parent / "model-archiver"), *args, "-f"],
        cwd=seed_dir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr == f"overwrote {seed_dir / 'big.mar'}\n", "no progress bar when not on a terminal"
