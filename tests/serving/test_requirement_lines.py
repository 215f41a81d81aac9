"""A requirements file may name packages, nothing else: every line that pip would read as a file of the
server's machine is refused, however it is disguised (issue 19, item 6: ``x~=1 .tar.gz`` passed)."""

from __future__ import annotations

import pytest

from archiver.errors import DependencyError
from archiver.serving.supervisor.requirements_check import check_requirements

HOSTILE = [
    "x~=1 .tar.gz",  # pip: 'x~=1 .tar.gz' ends in .tar.gz, so it installs that file from the cwd
    "x==1.tar.gz",
    "x==1 x.zip",
    "x===1 .tgz",
    "x (==1) .tar.gz",
    "x==1,.tar.gz",
    "x>=1.0#.tar.gz",  # no space before '#': not a comment to pip either
    "x==1\t.tar.gz",
    "x==1\u00a0.tar.gz",
    "x==1\x00.tar.gz",
    "x[y] .zip",
    "x .whl",
    "foo[bar].tar.gz",
    "pkg.whl",
    "x==1 ; python_version>'3' ../y",
    "x; os_name == 'posix' /etc/x",
    "x==1.0 && curl",
    "x==$(id)",
    "x==`id`",
    "x==1 ~/pkg",
]
PLAIN = [
    "tabulate",
    "Tabulate >= 0.8, < 1",
    "requests[socks]~=2.31; python_version >= '3.8'",
    "x (>=1.0)",
    "a.b-c_d[e, f]==1.0.post1",
    "torch==2.1.0+cpu",
    "x===1.0",
    "x==1.*",
    "x; sys_platform == 'linux' and python_version < \"3.12\"",
]


@pytest.mark.parametrize("line", HOSTILE)
def test_a_line_that_is_not_a_plain_named_requirement_is_refused(line):
    with pytest.raises(DependencyError) as caught:
        check_requirements(f"tabulate\n{line}\n".encode())
    assert caught.value.message.startswith("requirements.txt line 2: ")


@pytest.mark.parametrize("line", PLAIN)
def test_plain_named_requirements_still_pass(line):
    assert check_requirements(f"{line}\n".encode()) == [line]
