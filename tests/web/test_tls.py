"""TLS_CERT_FILE and TLS_KEY_FILE: ``serve`` speaks HTTPS and wss:// itself."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
from typing import TYPE_CHECKING

import anyio
import httpx
import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect

from tests.conftest import ADMIN_KEY, CLIENT_KEY, MINER_KEY
from tests.e2e.processes import free_port
from web.settings import Settings, SettingsError

if TYPE_CHECKING:
    from pathlib import Path


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def serve_env(cert: Path, key: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.getcwd(),
        "CLIENT_API_KEYS": CLIENT_KEY,
        "MINER_API_KEYS": MINER_KEY,
        "ADMIN_API_KEYS": ADMIN_KEY,
        "TLS_CERT_FILE": str(cert),
        "TLS_KEY_FILE": str(key),
    }


def test_both_files_or_neither() -> None:
    assert Settings.from_env({}).tls_cert_file is None
    both = Settings.from_env({"TLS_CERT_FILE": "c.pem", "TLS_KEY_FILE": "k.pem"})
    assert (both.tls_cert_file, both.tls_key_file) == ("c.pem", "k.pem")
    with pytest.raises(
        SettingsError, match=r"^TLS_KEY_FILE: must be set too when TLS_CERT_FILE is$"
    ):
        Settings.from_env({"TLS_CERT_FILE": "c.pem"})
    with pytest.raises(
        SettingsError, match=r"^TLS_CERT_FILE: must be set too when TLS_KEY_FILE is$"
    ):
        Settings.from_env({"TLS_KEY_FILE": "k.pem", "TLS_CERT_FILE": " "})


def test_serve_speaks_https_and_wss(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "web.cli",
        "serve",
        "--port",
        str(port),
        "--db",
        str(tmp_path / "c.db"),
    ]
    with subprocess.Popen(
        cmd, env=serve_env(cert, key), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            for line in proc.stdout:  # pytest-timeout bounds a start that never comes
                if line.startswith("AITBC coordinator on"):
                    assert line.startswith(f"AITBC coordinator on https://127.0.0.1:{port} ")
                if "Application startup complete" in line:
                    break
            trusted = ssl.create_default_context(cafile=str(cert))
            health = httpx.get(f"https://127.0.0.1:{port}/health", verify=trusted, trust_env=False)
            assert health.json()["status"] == "ok"
            with pytest.raises(httpx.TransportError):  # plain HTTP is not served
                httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False, timeout=5)
            assert anyio.run(_miner_hello, port, trusted) == "welcome"
        finally:
            proc.terminate()
        proc.communicate(timeout=30)
    assert proc.returncode == 0


async def _miner_hello(port: int, trusted: ssl.SSLContext) -> str:
    async with connect(
        f"wss://127.0.0.1:{port}/v1/miners/ws",
        ssl=trusted,
        additional_headers={"X-Api-Key": MINER_KEY},
    ) as ws:
        hello = {"type": "hello", "protocol": 1, "miner_id": "m1", "capabilities": {}}
        await ws.send(orjson.dumps(hello).decode())
        with anyio.fail_after(10):
            return str(orjson.loads(await ws.recv())["type"])


@pytest.mark.parametrize("broken", ["missing", "not a certificate"])
def test_a_certificate_that_does_not_load_stops_the_start_with_one_line(
    tmp_path: Path, broken: str
) -> None:
    cert, key = self_signed(tmp_path)
    if broken == "missing":
        cert.unlink()
    else:
        cert.write_text("-----BEGIN CERTIFICATE-----\nbm9wZQ==\n-----END CERTIFICATE-----\n")
    cmd = [sys.executable, "-m", "web.cli", "serve", "--port", "0", "--db", str(tmp_path / "c.db")]
    done = subprocess.run(
        cmd, env=serve_env(cert, key), capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert done.stderr.startswith(
        "aitbc-coordinator: invalid setting: TLS_CERT_FILE/TLS_KEY_FILE: "
    )
    assert done.stderr.count("\n") == 1
    assert f"({cert}, {key})" in done.stderr
    assert not (tmp_path / "c.db").exists()
