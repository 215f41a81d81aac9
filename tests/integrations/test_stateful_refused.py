"""A stateful archive (model-config.yaml ``sequenceBatching: true``) is refused by the Ray Serve and
KServe hosts and by ``model-archiver deploy``, each with one line saying why: those engines route no
sequence to one replica, so each replica would keep its own state and the sequences would be mixed."""

from __future__ import annotations

import pytest

from archiver.errors import ConfigError
from tests.integrations.test_deploy import run_cli

STATEFUL = "batchSize: 2\nsequenceBatching: true\nsequenceMaxIdleMSec: 60000\nmaxNumSequence: 4\n"
WHY = 'model "echo" is stateful (model-config.yaml sequenceBatching: true)'


@pytest.fixture
def stateful_echo(tmp_path, kit):
    return kit.write_echo(tmp_path, "3.0", STATEFUL)


def test_kserves_runtime_refuses_a_stateful_archive_before_loading_it(stateful_echo, tmp_path, kit, capsys):
    from archiver.integrations import kserve

    with pytest.raises(ConfigError, match="no sequence routing"):
        kserve.build_models(stateful_echo)
    # the runtime's command line (what the ServingRuntime runs): one line, exit 1, no server started
    assert kserve.main(["--model_dir", str(stateful_echo), "--http_port", "1"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and WHY in lines[0] and "model-archiver serve" in lines[0], lines

    # the same archive without sequenceBatching is a KServe model as before
    plain = kit.write_echo(tmp_path / "plain", "1.0", "batchSize: 2\n")
    assert [m.name for m in kserve.build_models(plain)] == ["echo"]


def test_ray_serve_refuses_a_stateful_archive_among_its_archives(stateful_echo, echo_archives):
    from archiver.integrations.ray_serve import plans_from_args

    with pytest.raises(ConfigError) as refused:
        plans_from_args({"archives": [str(echo_archives[0]), str(stateful_echo)], "num_replicas": 1})
    assert WHY in refused.value.message and "\n" not in refused.value.message
    assert len(plans_from_args({"archives": [str(echo_archives[0])]})) == 1


@pytest.mark.parametrize("engine", ["ray", "kserve"])
def test_deploy_refuses_a_stateful_archive_and_writes_nothing(stateful_echo, tmp_path, engine):
    out = tmp_path / ("serve_config.yaml" if engine == "ray" else "k8s")
    extra = ["--storage-uri", "pvc://models/echo"] if engine == "kserve" else []
    result = run_cli("deploy", engine, str(stateful_echo), *extra, "-o", str(out))
    code, output = result.code, result.output
    assert code == 1, output
    assert WHY in output and len(output.strip().splitlines()) == 1, output
    assert not out.exists()
