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

from tests.conftest import MINER_KEY
from tests.serve_once import KEYS, serve_once, serving
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


def tls_env(cert: Path, key: Path) -> dict[str, str]:
    return {**KEYS, "TLS_CERT_FILE": str(cert), "TLS_KEY_FILE": str(key)}


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
    with serving(tmp_path / "c.db", tls_env(cert, key)) as run:
        started = f"AITBC coordinator on https://127.0.0.1:{run.port} "
        assert any(line.startswith(started) for line in run.lines), run.lines
        trusted = ssl.create_default_context(cafile=str(cert))
        health = httpx.get(f"https://127.0.0.1:{run.port}/health", verify=trusted, trust_env=False)
        assert health.json()["status"] == "ok"
        with pytest.raises(httpx.TransportError):  # plain HTTP is not served
            httpx.get(f"http://127.0.0.1:{run.port}/health", trust_env=False, timeout=5)
        assert anyio.run(_miner_hello, run.port, trusted) == "welcome"
        url = f"wss://127.0.0.1:{run.port}/v1/miners/ws"
        # The example miner: told to trust the certificate, it is welcomed; not told, it stops
        # with one line (it reconnected for ever, printing the same error).
        miner = [sys.executable, "examples/ws_miner.py", "--url", url, "--key", MINER_KEY]
        env = {**os.environ, "PYTHONPATH": os.getcwd(), "PYTHONUNBUFFERED": "1"}
        with subprocess.Popen(
            miner, env={**env, "SSL_CERT_FILE": str(cert)}, stdout=subprocess.PIPE, text=True
        ) as trusting:
            assert trusting.stdout is not None
            first = trusting.stdout.readline()  # pytest-timeout bounds a miner that says nothing
            trusting.terminate()
            trusting.communicate(timeout=30)
        assert first.startswith("welcome as "), first
        untrusting = subprocess.run(miner, env=env, capture_output=True, text=True, timeout=60)
    assert untrusting.returncode == 1
    assert untrusting.stdout.count("\n") == 1, untrusting.stdout
    assert untrusting.stdout.startswith(f"{url}: its certificate is not trusted (self-signed")


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
    done = serve_once(tmp_path / "c.db", {**os.environ, **tls_env(cert, key)})
    assert done.returncode == 2
    assert done.stderr.startswith(
        "aitbc-coordinator: invalid setting: TLS_CERT_FILE/TLS_KEY_FILE: "
    )
    assert done.stderr.count("\n") == 1
    assert f"({cert}, {key})" in done.stderr
    assert not (tmp_path / "c.db").exists()
