"""Operator mistakes on the command line are one ``qpc: error:`` line and a non-zero exit
status, never a traceback: a data directory that is a file, bad ``gen-cert`` options, and
``gen-cert`` over an existing certificate (refused without ``--force``)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from qpc_core import cli
from qpc_core.testing import BIN

CERT_FILES = ("server-cert.der", "server-key.der", "server-cert.pem", "server-key.pem",
              "ca-cert.pem", "ca-cert.der")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No QPC_* environment, no ./qpc-server.toml, no global logging changes."""
    for name in list(os.environ):
        if name.startswith("QPC_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_setup_logging", lambda level: None)
    return tmp_path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli.main(list(argv))
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_data_dir_that_is_a_file(clean_env: Path, capsys, command: str) -> None:
    not_a_dir = clean_env / "data"
    not_a_dir.write_text("oops")
    rc, err = _run(capsys, command, "--data-dir", str(not_a_dir))
    assert rc == 1
    assert err == f"qpc: error: config: data_dir: {not_a_dir} exists and is not a directory\n"
    assert not_a_dir.read_text() == "oops"


def test_os_error_at_start_up_is_one_line(clean_env: Path, capsys) -> None:
    blocker = clean_env / "file"
    blocker.write_text("")
    data = blocker / "data"  # its parent is a regular file: creating it fails (ENOTDIR)
    rc, err = _run(capsys, "run", "--data-dir", str(data), "--listen", "127.0.0.1:0")
    assert rc == 1
    assert err.startswith("qpc: error: ") and "Not a directory" in err
    assert err.count("\n") == 1 and "Errno" not in err


@pytest.mark.parametrize("days", ["-1", "0", "36501", "10000000", "ten"])
def test_gen_cert_days_out_of_range(clean_env: Path, capsys, days: str) -> None:
    out = clean_env / "certs"
    with pytest.raises(SystemExit) as exc:
        cli.main(["gen-cert", "--out", str(out), "--days", days])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "qpc gen-cert: error: argument --days:" in err and "Traceback" not in err
    assert not out.exists()


def test_gen_cert_days_at_the_limits(clean_env: Path, capsys) -> None:
    for days in ("1", str(cli.MAX_CERT_DAYS)):
        out = clean_env / f"days-{days}"
        rc, err = _run(capsys, "gen-cert", "--out", str(out), "--days", days)
        assert rc == 0, err
        assert all((out / n).is_file() for n in CERT_FILES)


def test_gen_cert_out_is_a_file(clean_env: Path, capsys) -> None:
    out = clean_env / "certs"
    out.write_text("not a directory")
    rc, err = _run(capsys, "gen-cert", "--out", str(out))
    assert rc == 1
    assert err == f"qpc: error: --out: {out} exists and is not a directory\n"


def test_gen_cert_refuses_to_replace_without_force(clean_env: Path, capsys) -> None:
    out = clean_env / "certs"
    assert _run(capsys, "gen-cert", "--out", str(out))[0] == 0
    first = {n: (out / n).read_bytes() for n in CERT_FILES}
    rc, err = _run(capsys, "gen-cert", "--out", str(out), "--hostname", "other.example")
    assert rc == 1
    assert err.startswith(f"qpc: error: --out: {out} already holds server-cert.der, ")
    assert "--force" in err
    assert {n: (out / n).read_bytes() for n in CERT_FILES} == first  # untouched
    # One leftover file is enough to refuse (e.g. only the CA clients already trust).
    only_ca = clean_env / "only-ca"
    only_ca.mkdir()
    (only_ca / "ca-cert.pem").write_bytes(first["ca-cert.pem"])
    rc, err = _run(capsys, "gen-cert", "--out", str(only_ca))
    assert rc == 1 and "already holds ca-cert.pem:" in err
    assert sorted(p.name for p in only_ca.iterdir()) == ["ca-cert.pem"]
    # --force replaces them all.
    rc, _err = _run(capsys, "gen-cert", "--out", str(out), "--force")
    assert rc == 0
    assert (out / "server-key.der").read_bytes() != first["server-key.der"]
    assert (out / "ca-cert.pem").read_bytes() != first["ca-cert.pem"]
    assert os.stat(out / "server-key.der").st_mode & 0o777 == 0o600


def test_real_entry_point_prints_no_traceback(tmp_path: Path) -> None:
    """The installed ``qpc`` script: the same errors, as a subprocess."""
    not_a_dir = tmp_path / "data"
    not_a_dir.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPC_")}
    res = subprocess.run([str(BIN / "qpc"), "run", "--data-dir", str(not_a_dir)],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60,
                         check=False)
    assert res.returncode == 1
    assert res.stderr.strip().endswith("exists and is not a directory")
    assert "Traceback" not in res.stderr
    res = subprocess.run([str(BIN / "qpc"), "gen-cert", "--out", str(not_a_dir)],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60,
                         check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip() == f"qpc: error: --out: {not_a_dir} exists and is not a directory"
