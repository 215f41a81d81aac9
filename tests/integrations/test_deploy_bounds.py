"""`deploy ray|kserve` and the Ray application's arguments check their settings with the server's own
ranges (settings_bounds): a NaN delay or a batch of 99,999,999 is refused with exit 2 and one line
naming the flag and its range, before any file is written."""

from __future__ import annotations

import pytest

from archiver.errors import UsageError
from tests.integrations.test_deploy import run_cli


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--max-batch-delay", "nan", "--max-batch-delay must be a number from 0 to 60000 (milliseconds)"),
        ("--max-batch-delay", "inf", "--max-batch-delay must be a number from 0 to 60000"),
        ("--max-batch-delay", "60001", "--max-batch-delay must be a number from 0 to 60000"),
        ("--batch-size", "99999999", "--batch-size must be an integer from 1 to 1024"),
        ("--batch-size", "0", "--batch-size must be an integer from 1 to 1024"),
        ("--replicas", "100000", "--replicas must be an integer from 1 to 4096"),
    ],
)
def test_deploy_ray_refuses_an_override_out_of_range(tmp_path, seed_archive, flag, value, says):
    out = tmp_path / "serve_config.yaml"
    result = run_cli("deploy", "ray", str(seed_archive), flag, value, "-o", str(out))
    assert result.code == 2, result.output
    assert says in result.output and value in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not out.exists()


def test_deploy_ray_keeps_overrides_in_range(tmp_path, seed_archive):
    out = tmp_path / "serve_config.yaml"
    result = run_cli(
        "deploy",
        "ray",
        str(seed_archive),
        "--max-batch-delay",
        "60000",
        "--batch-size",
        "1024",
        "-o",
        str(out),
    )
    assert result.code == 0, result.output
    assert "batch 1024" in result.output


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("max_batch_delay_ms", "nan", "max_batch_delay_ms must be a number from 0 to 60000"),
        ("max_batch_delay_ms", float("inf"), "max_batch_delay_ms must be a number from 0 to 60000"),
        ("batch_size", 99999999, "batch_size must be an integer from 1 to 1024"),
        ("batch_size", "2.5", "batch_size must be an integer from 1 to 1024"),
        ("num_replicas", "0", "num_replicas must be an integer from 1 to 4096"),
        ("max_request_size", -5, "max_request_size must be an integer from 1 to 1073741824"),
    ],
)
def test_the_ray_applications_arguments_are_checked_with_the_same_ranges(seed_archive, key, value, says):
    from archiver.integrations.ray_serve import build_app

    with pytest.raises(UsageError) as refused:
        build_app({"archives": [str(seed_archive)], key: value})
    assert says in refused.value.message


def test_plan_archive_checks_its_overrides(seed_archive):
    from archiver.integrations.archive_plan import plan_archive

    with pytest.raises(UsageError, match=r"max_batch_delay_ms must be a number from 0 to 60000"):
        plan_archive(seed_archive, max_batch_delay_ms=float("nan"))
    assert plan_archive(seed_archive, batch_size=7, max_batch_delay_ms=0.0).batch_size == 7
