"""/docs (Swagger UI) and /redoc (ReDoc) work offline: every asset is served by the app; the
docs say what the code does (docs/configuration.md's table and CLI line against the settings
and the command)."""

from __future__ import annotations

import argparse
import re
import shlex
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from protocol.types import CloseCode, ErrorCode
from tests.conftest import ADMIN_KEY, CLIENT_KEY, MINER_KEY
from tests.web.rest_harness import Api, running_api
from web.cli import main
from web.settings import Settings, SettingsError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = pytest.mark.anyio

_ROOT = Path(__file__).resolve().parents[2]
_SRC = re.compile(r"<script[^>]*\ssrc=\"([^\"]+)\"")
_HREF = re.compile(r"<link[^>]*\shref=\"([^\"]+)\"")
_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with running_api(tmp_path) as a:
        yield a


@pytest.mark.parametrize(
    ("page", "needs"),
    [
        ("/docs", ("swagger-ui-bundle.js", "swagger-ui.css", "SwaggerUIBundle(")),
        ("/redoc", ("redoc.standalone.js", "<redoc spec-url=")),
    ],
)
async def test_doc_pages_load_only_local_assets(api: Api, page: str, needs: tuple[str]) -> None:
    """200 HTML; every <script src>/<link href> is a local path served 200 with its type."""
    r = await api.http.get(page)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "http://" not in html
    assert "https://" not in html
    assert "/openapi.json" in html
    for needle in needs:
        assert needle in html
    assets = _SRC.findall(html) + _HREF.findall(html)
    assert len(assets) >= 2
    for url in assets:
        assert url.startswith("/"), url
        assert not url.startswith("//"), url
        asset = await api.http.get(url)
        assert asset.status_code == 200, url
        expected = _TYPES[url[url.rfind(".") :]]
        assert expected in asset.headers["content-type"], (url, asset.headers["content-type"])
        assert len(asset.content) > 100, url


async def test_redoc_may_load_images_from_the_coordinator_only(api: Api) -> None:
    """The ReDoc bundle draws its footer's logo from https://cdn.redoc.ly: every view of /redoc
    asked a third party for it. The page's policy allows images from here only."""
    r = await api.http.get("/redoc")
    assert r.headers["content-security-policy"] == "img-src 'self' data:"


async def test_doc_pages_are_in_openapi(api: Api) -> None:
    doc = (await api.http.get("/openapi.json")).json()
    for page in ("/docs", "/redoc"):
        op = doc["paths"][page]["get"]
        assert op["security"] == []
        assert "text/html" in op["responses"]["200"]["content"]


async def test_openapi_descriptions_point_at_docs_that_exist(api: Api) -> None:
    """/docs showed "Client job routes (rest-api.md §2.2)", "Signed receipt (rest-api §4.3)":
    sections of the project's spec, which docs/rest-api.md does not have. Every reference in
    /openapi.json now names a file of docs/, and each exists."""
    text = (await api.http.get("/openapi.json")).text
    assert "§" not in text
    named = set(re.findall(r"docs/[a-z-]+\.md", text))
    assert named, "no doc named"
    assert [doc for doc in sorted(named) if not (_ROOT / doc).is_file()] == []


async def test_the_curl_lines_of_rest_api_md_work_as_written(api: Api) -> None:
    """rest-api.md had no request a new user could paste: its "Try it" lines run here in order,
    as curl would send them (method, headers, body), with the keys and the job id filled in."""
    doc = (_ROOT / "docs" / "rest-api.md").read_text()
    block = doc.split("## Try it", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("curl ")]
    assert len(lines) == 8
    env = {"CLIENT_KEY": CLIENT_KEY, "MINER_KEY": MINER_KEY}
    answers = []
    for line in lines:
        for name, value in env.items():
            line = line.replace(f"${name}", value)
        words = shlex.split(line)[1:]
        method, headers, body, url = "GET", {}, None, None
        while words:
            word = words.pop(0)
            if word == "-X":
                method = words.pop(0)
            elif word == "-H":
                name, _, value = words.pop(0).partition(":")
                headers[name] = value.strip()
            elif word == "-d":
                body = words.pop(0)
                method = "POST" if method == "GET" else method
            elif word != "-s":
                url = word
        assert url is not None, line
        assert url.startswith("http://127.0.0.1:8000/"), line
        r = await api.http.request(
            method, url.removeprefix("http://127.0.0.1:8000"), headers=headers, content=body
        )
        assert r.status_code in (200, 201), (line, r.status_code, r.text)
        answers.append(r.json())
        env.setdefault("JOB_ID", answers[0]["job_id"])
    job_id = env["JOB_ID"]
    assert answers[3]["miner_id"] == "curl-1"  # not the key's id: a socket miner's, replaced
    assert answers[4]["job_id"] == job_id  # the poll handed the miner that job
    assert answers[5]["receipt"]["job_id"] == job_id
    assert answers[6]["result"] == {"output": "olleh"}
    assert [receipt["job_id"] for receipt in answers[7]["items"]] == [job_id]


async def test_unknown_asset_is_a_json_404(api: Api) -> None:
    r = await api.http.get("/docs/static/swagger-ui/nope.js")
    assert r.status_code == 404
    assert r.json() == {"detail": "Not Found"}


# docs/configuration.md against web/settings.py: every variable the settings read is in the
# table and every row names one they read, with its real default and bounds.
_CONFIGURATION = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
_ROW = re.compile(r"^\| `([A-Z][A-Z0-9_]*)` \| (.*?) \| (.*) \|$", re.MULTILINE)
# "LO\u2013HI" (an en dash) in a row's meaning: the last one ("1024\u201367108864 (64 MiB):
# ..."), never a size in MB (the WAL's "75\u2013118 MB").
_RANGE = re.compile(r"(?<![\w.])(2⁴⁰|[0-9][0-9.]*)\u2013(2⁴⁰|[0-9][0-9.]*)(?![0-9.]| MB)")
# The heartbeat timeout may not be shorter than the interval: each bound of either is tried
# with the other out of its way.
_ROOM = {"HEARTBEAT_INTERVAL_SECONDS": "0.05", "HEARTBEAT_TIMEOUT_SECONDS": "3600"}


class _Recording(dict[str, str]):
    """An environment that notes every variable read from it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.read.add(key)
        return super().__contains__(key)


def _rows() -> dict[str, tuple[str, str]]:
    rows = {name: (default, meaning) for name, default, meaning in _ROW.findall(_read_doc())}
    assert len(rows) > 40
    return rows


def _read_doc() -> str:
    return _CONFIGURATION.read_text()


def _bound(text: str) -> Decimal:
    return Decimal(1 << 40) if text == "2⁴⁰" else Decimal(text)


def _settings(env: dict[str, str]) -> Settings | str:
    try:
        return Settings.from_env(env)
    except SettingsError as exc:
        return str(exc)


def test_the_configuration_table_names_every_variable_the_settings_read() -> None:
    env = _Recording()
    Settings.from_env(env)
    assert set(_rows()) == env.read


def test_each_documented_default_is_the_default() -> None:
    """Setting a variable to its documented default changes nothing."""
    unset = Settings.from_env({})
    checked = 0
    for name, (default, _) in _rows().items():
        written = re.fullmatch(r"`([^`]+)`(?: \(.*\))?", default)
        if written is None:  # "—", "generated"
            continue
        value = {"off": "off", "on": "on"}.get(written.group(1), written.group(1))
        assert Settings.from_env({name: value}) == unset, (name, value)
        checked += 1
    assert checked > 30


def test_each_documented_range_is_the_range_taken() -> None:
    """Both bounds are taken; a value just past either is refused, naming the variable."""
    checked = 0
    for name, (_, meaning) in _rows().items():
        ranges = _RANGE.findall(meaning)
        if not ranges:
            continue
        lo, hi = (_bound(b) for b in ranges[-1])
        room = {k: v for k, v in _ROOM.items() if k != name}
        for inside in (lo, hi):
            got = _settings({**room, name: str(inside)})
            assert isinstance(got, Settings), (name, str(inside), got)
        outside = [hi + 1] + ([lo / 2] if lo > 0 else [])
        for value in outside:
            got = _settings({**room, name: str(value)})
            assert isinstance(got, str), (name, str(value))
            assert got.startswith(f"{name}: "), (name, got)
        checked += 1
    assert checked > 20


def test_the_cli_line_names_every_option_of_each_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """configuration.md's **CLI** paragraph names each subcommand's options as --help lists
    them."""
    doc = _read_doc()
    for command in (["serve"], ["demo"], ["receipts", "verify"], ["receipts", "audit"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        usage = capsys.readouterr().out
        options = set(re.findall(r"\[(--[a-z-]+)", usage)) - {"--help"}
        # its synopsis: the longest of the spans that name the command
        lines = re.findall(rf"`aitbc-coordinator {' '.join(command)}(?: [^`]*)?`", doc)
        assert lines, command
        named = set(re.findall(r"--[a-z-]+", max(lines, key=len)))
        assert named == options, (command, named, options)


def test_every_option_of_each_command_says_what_it_is(
    argument_parsers: list[argparse.ArgumentParser], capsys: pytest.CaptureFixture[str]
) -> None:
    """``serve --help`` listed ``--log-level`` and ``demo --help`` ``--host`` bare, and demo's
    ``--rate`` and ``--port`` without their defaults."""
    parsers = argument_parsers
    with pytest.raises(SystemExit):
        main(["--help"])
    capsys.readouterr()
    bare = []
    pending = [parsers[0]]
    while pending:
        parser = pending.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                pending += action.choices.values()
            elif not action.help:
                bare.append((parser.prog, action.option_strings))
    assert bare == []


def test_protocol_md_lists_the_close_codes_and_error_codes_of_the_code() -> None:
    """docs/protocol.md's close-code table and its list of ``error`` codes are those of
    ``protocol.types`` (4408, the spec's application-level liveness close, is never sent: the
    transport's keepalive closes 1011, as the table says)."""
    doc = (_CONFIGURATION.parent / "protocol.md").read_text()
    table = doc.split("## Close codes", 1)[1].split("\n## ", 1)[0]
    codes = {
        int(c) for row in re.findall(r"^\| ([0-9 /]+) \|", table, re.M) for c in row.split("/")
    }
    assert codes == {int(c) for c in CloseCode} - {CloseCode.LIVENESS_LOST}
    listed = doc.split("Error codes carried by `error` frames:", 1)[1].split(".", 1)[0]
    assert set(re.findall(r"`([a-z_]+)`", listed)) == {str(c) for c in ErrorCode}


def test_an_empty_variable_is_its_default() -> None:
    """Every variable of the table set empty (a compose file's ``SQLITE_SYNCHRONOUS=${SYNC}``
    with SYNC unset) is read as unset, as the numbers and switches were, but DATABASE_URL,
    which is refused rather than run on ./coordinator.db: SQLITE_SYNCHRONOUS was refused
    ("must be NORMAL or FULL"), and /health reported ENVIRONMENT as "" (or with its spaces)."""
    names = set(_rows()) - {"DATABASE_URL"}
    for blank in ("", " "):
        assert Settings.from_env(dict.fromkeys(names, blank)) == Settings(), repr(blank)
    assert Settings.from_env({"ENVIRONMENT": " production\n"}).environment == "production"
    with pytest.raises(SettingsError, match=r"^DATABASE_URL: "):
        Settings.from_env({"DATABASE_URL": ""})


async def test_ops_md_metrics_table_names_every_series(api: Api) -> None:
    """docs/ops.md's metrics table names exactly the families /metrics exports (SQLite)."""
    doc = (_CONFIGURATION.parent / "ops.md").read_text()
    table = doc.split("| metric | type | what |", 1)[1].split("\n\n", 1)[0]
    documented = {
        name
        for cell in re.findall(r"^\| (.*?) \|", table, re.M)
        for name in re.findall(r"`(aitbc_[a-z0-9_]+)", cell)
    }
    r = await api.http.get("/metrics", headers={"X-Api-Key": ADMIN_KEY})
    assert r.status_code == 200
    exported = set(re.findall(r"^# TYPE (aitbc_[a-z0-9_]+) ", r.text, re.M))
    assert documented == exported
