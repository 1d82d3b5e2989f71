"""Fixtures shared by the deploy/ tests: the compose file, and make-secrets.sh run once for real (in a copy of
deploy/compose, next to a copy of deploy/rabbitmq, as in the repository)."""

from __future__ import annotations

import shutil

import pytest

from tests.docker import deploy_files as d


@pytest.fixture(scope="session")
def compose():
    return d.load_compose()


@pytest.fixture(scope="session")
def generated_secrets(tmp_path_factory):
    """make-secrets.sh run for real in a copy of deploy/compose: its .env and secret files (it needs
    openssl, and no Docker engine: missing openssl fails these tests instead of skipping them)."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed; make-secrets.sh needs it (apt-get install openssl)")
    workdir = tmp_path_factory.mktemp("compose") / "compose"
    shutil.copytree(d.COMPOSE_DIR, workdir, ignore=shutil.ignore_patterns("secrets", ".env"))
    shutil.copytree(d.BROKER_DIR, workdir.parent / d.BROKER_DIR.name)  # make-secrets.sh reads ../rabbitmq
    for run in range(2):  # the second run must keep what the first made
        result = d.run_make_secrets(workdir)
        assert result.returncode == 0, result.stderr
        if run == 0:
            first = {p.name: p.read_text() for p in (workdir / "secrets").iterdir()}, (workdir / ".env").read_text()
    second = {p.name: p.read_text() for p in (workdir / "secrets").iterdir()}, (workdir / ".env").read_text()
    assert first == second, "running make-secrets.sh again changed the secrets"
    return workdir, d.parse_dotenv((workdir / ".env").read_text())


@pytest.fixture
def compose_copy(generated_secrets, tmp_path):
    """A private copy of the generated compose folder, for a test that changes its secrets."""
    workdir = tmp_path / "compose"
    shutil.copytree(generated_secrets[0], workdir)
    shutil.copytree(d.BROKER_DIR, tmp_path / d.BROKER_DIR.name)
    return workdir
