"""Who may do what: the admin key (only it can put the model to sleep or hold it once set; the embedding key gets
403 there), keys read from files (``*_FILE``, as Docker and compose secrets deliver them), the warning when the
embedding key also sleeps the model, and a request from this machine naming this machine passing the Host check
whatever ``allowed_hosts`` says (the container's health probe)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from fastapi.testclient import TestClient

from common.config import load_settings
from common.server import warn_about_keys
from embed_client import EmbedClient, ServiceError
from embed_client import main as client_main
from qwen3_embed import Qwen3Settings
from tests.helpers import assert_error, ready_client, serve_in_thread, serving, text_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")

API, ADMIN = "embedding-key", "admin-key"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed(tiny_zimage: Path) -> Iterator[TestClient]:
    yield from ready_client(text_app(tiny_zimage, api_key=API, admin_key=ADMIN))


def test_only_the_admin_key_sleeps_and_wakes_the_model(keyed: TestClient) -> None:
    assert_error(keyed.post("/admin/sleep", headers=bearer(API)), 403, "admin_key_required")
    assert_error(keyed.post("/admin/wake", headers=bearer(API)), 403, "admin_key_required")
    assert_error(keyed.post("/admin/sleep"), 401, "invalid_api_key")
    assert_error(keyed.post("/admin/sleep", headers=bearer("wrong")), 401, "invalid_api_key")
    assert keyed.post("/admin/sleep", json={"hold": True}, headers=bearer(ADMIN)).json()["state"] == "held"
    assert keyed.post("/admin/wake", headers=bearer(ADMIN)).json()["state"] == "awake"


def test_the_admin_key_is_not_an_embedding_key(keyed: TestClient) -> None:
    assert keyed.post("/embed/text", json={"text": "a"}, headers=bearer(API)).status_code == 200
    assert_error(keyed.post("/embed/text", json={"text": "a"}, headers=bearer(ADMIN)), 401, "invalid_api_key")


def test_an_admin_key_alone_leaves_embedding_open(tiny_zimage: Path) -> None:
    with serving(text_app(tiny_zimage, admin_key=ADMIN)) as client:
        assert client.post("/embed/text", json={"text": "a"}).status_code == 200
        assert_error(client.post("/admin/sleep"), 401, "invalid_api_key")
        assert client.post("/admin/sleep", headers=bearer(ADMIN)).status_code == 200


def test_the_start_says_who_may_sleep_the_model(caplog: pytest.LogCaptureFixture, tiny_zimage: Path) -> None:
    cases: list[tuple[dict[str, Any], str | None]] = [
        ({"api_key": API}, "EMBED_API_KEY also lets every embedding client"),
        ({}, "any process that can reach"),
        ({"api_key": API, "admin_key": ADMIN}, None),
    ]
    for keys, said in cases:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            warn_about_keys(Qwen3Settings(model=str(tiny_zimage), **keys))
        if said is None:
            assert "sleep" not in caplog.text
        else:
            assert said in caplog.text and "EMBED_ADMIN_KEY" in caplog.text


def test_keys_are_read_from_files(tmp_path: Path, tiny_zimage: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``EMBED_API_KEY_FILE`` / ``--admin-key-file``: the key is the file's content without its final newline (a
    secret file as compose writes it); the key itself never needs to be in the environment."""
    (tmp_path / "api").write_text(API + "\n")
    (tmp_path / "admin").write_text(ADMIN)
    monkeypatch.setenv("EMBED_API_KEY_FILE", str(tmp_path / "api"))
    settings = load_settings(Qwen3Settings, ["--model", str(tiny_zimage), "--admin-key-file", str(tmp_path / "admin")])
    assert settings.api_key is not None and settings.api_key.get_secret_value() == API
    assert settings.admin_key is not None and settings.admin_key.get_secret_value() == ADMIN
    monkeypatch.setenv("QWEN3_ADMIN_KEY_FILE", str(tmp_path / "admin"))
    assert load_settings(Qwen3Settings, ["--model", str(tiny_zimage)]).admin_key is not None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--api-key", "k", "--api-key-file", "{dir}/api"], "api_key and api_key_file: give one"),
        (["--api-key-file", "{dir}/missing"], "api_key_file: cannot read"),
        (["--admin-key-file", "{dir}/empty"], "admin_key_file: {dir}/empty is empty"),
    ],
)
def test_a_bad_key_file_stops_the_start_with_one_line(
    tmp_path: Path, tiny_zimage: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    (tmp_path / "api").write_text(API)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SystemExit) as stopped:
        load_settings(Qwen3Settings, ["--model", str(tiny_zimage), *(a.format(dir=tmp_path) for a in args)])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert message.format(dir=tmp_path) in error and error.count("\n") == 1


def test_the_client_and_its_command_line_use_the_admin_key(
    tiny_zimage: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with serve_in_thread(text_app(tiny_zimage, api_key=API, admin_key=ADMIN)) as url:
        with EmbedClient(url, api_key=API) as client, pytest.raises(ServiceError) as refused:
            client.sleep()
        assert refused.value.status == 403 and refused.value.code == "admin_key_required"
        with EmbedClient(url, api_key=API, admin_key=ADMIN) as client:
            assert client.sleep(hold=True)["state"] == "held"
            assert client.wake()["state"] == "awake"
            assert client.embed_texts(["a"]).shape == (1, 32)
        (tmp_path / "admin").write_text(ADMIN + "\n")
        monkeypatch.setenv("EMBED_ADMIN_KEY_FILE", str(tmp_path / "admin"))
        assert client_main(["sleep", "--url", url]) == 0
        assert client_main(["wake", "--url", url, "--admin-key", ADMIN]) == 0
        monkeypatch.delenv("EMBED_ADMIN_KEY_FILE")
        monkeypatch.setenv("EMBED_API_KEY", API)
        assert client_main(["sleep", "--url", url]) == 1
        assert "admin_key_required" in capsys.readouterr().err


def test_this_machine_naming_itself_passes_the_host_check(tiny_zimage: Path) -> None:
    """With ``allowed_hosts`` set (the advice off loopback), a request that comes from this machine and names it
    (127.0.0.1, localhost, ::1: what a container's health probe sends) still passes; another name does not."""
    with serve_in_thread(text_app(tiny_zimage, allowed_hosts=["embed.example.com"])) as url:
        port = url.rsplit(":", 1)[1]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
            assert requests.get(url + "/health", headers={"Host": host}, timeout=10).status_code == 200, host
        assert requests.get(url + "/health", headers={"Host": "embed.example.com"}, timeout=10).status_code == 200
        refused = requests.get(url + "/health", headers={"Host": "evil.example"}, timeout=10)
        assert_error(refused, 400, "invalid_host")
