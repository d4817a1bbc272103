"""Sleeping to share the GPU: the idle timer (never under load, always after it), a wake on the next request that a
burst shares, vectors after a wake equal to those before, the hold (503 ``asleep`` + Retry-After, which the client
and the indexer wait out), failing wakes (503, the next request tries again), the admin routes' guard, what
/health, /info and /metrics say, the client's sleep and wake, and the settings."""

from __future__ import annotations

import asyncio
import gc
import signal
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
from fastapi.testclient import TestClient

from common.errors import Asleep
from common.memory import release_free_memory
from common.residency import Residency, SleepMode, pick_sleep_mode
from embed_client import EmbedClient, index_folder
from embed_client import main as client_main
from qwen3_embed import Qwen3Encoder, Qwen3Service, Qwen3Settings
from qwen3_embed import build_app as build_text_app
from siglip2_embed import Siglip2Encoder, Siglip2Service, Siglip2Settings
from siglip2_embed import build_app as build_image_app
from tests.helpers import (
    CPU,
    MIXED_TEXTS,
    assert_error,
    assert_same_vectors,
    free_port,
    image_bytes,
    photo_like,
    serve_in_thread,
    serving,
)
from tests.live_server import service_process, started_server

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EncoderHook = Callable[[Any], None]


def slow_restore(seconds: float) -> EncoderHook:
    """A wake that takes ``seconds`` longer (a large model): requests pile up while it runs."""

    def hook(encoder: Any) -> None:
        restore = encoder.restore_weights

        def slowly(mode: SleepMode) -> None:
            time.sleep(seconds)
            restore(mode)

        encoder.restore_weights = slowly

    return hook


def text_app(model: Path, hook: EncoderHook | None = None, **overrides: Any) -> Any:
    """The text service on the tiny model on the CPU; ``hook`` may change the encoder (its wake) after loading."""
    settings = Qwen3Settings(model=str(model), **overrides)

    def load() -> Qwen3Service:
        encoder = Qwen3Encoder(str(model), CPU, torch.float32, settings.recipe())
        encoder.embed_texts(["warm-up"])
        if hook is not None:
            hook(encoder)
        return Qwen3Service(settings, encoder, "cpu")

    return build_text_app(settings, load=load)


def image_app(model: Path, hook: EncoderHook | None = None, **overrides: Any) -> Any:
    settings = Siglip2Settings(model=str(model), **overrides)

    def load() -> Siglip2Service:
        encoder = Siglip2Encoder(str(model), CPU, torch.float32)
        encoder.embed_texts(["warm-up"])
        if hook is not None:
            hook(encoder)
        return Siglip2Service(settings, encoder, "cpu")

    return build_image_app(settings, load=load)


def state(client: TestClient | str) -> str:
    response = client.get("/health") if isinstance(client, TestClient) else requests.get(client + "/health", timeout=10)
    assert response.status_code == 200, response.text
    return str(response.json()["state"])


def wait_for_state(client: TestClient, wanted: str, timeout: float = 30.0) -> float:
    """Seconds until /health says ``wanted``."""
    started = time.monotonic()
    while state(client) != wanted:
        assert time.monotonic() - started < timeout, f"still {state(client)!r}, not {wanted!r}"
        time.sleep(0.02)
    return time.monotonic() - started


def metric(client: TestClient, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ")[1])
    return 0.0


def embed(client: TestClient, text: str) -> list[float]:
    response = client.post("/embed/text", json={"text": text})
    assert response.status_code == 200, response.text
    vector: list[float] = response.json()["embedding"]
    return vector


# --- the idle timer -------------------------------------------------------------------------------------------------


def test_the_idle_timer_never_fires_under_load_and_fires_after_it(tiny_zimage: Path) -> None:
    with serving(text_app(tiny_zimage, idle_sleep_s=0.5)) as client:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # a request every 0.1 s: never 0.5 s idle
            embed(client, "steady")
            assert state(client) == "awake"
            time.sleep(0.1)
        assert metric(client, "embed_sleeps_total") == 0
        waited = wait_for_state(client, "asleep")
        assert waited >= 0.3  # measured 0.5 s: the full idle time, counted from the last request
        assert client.get("/info").json()["sleep"]["sleeps"] == 1
        assert metric(client, 'embed_sleeps_total{reason="idle"}') == 1


def test_the_idle_timer_never_fires_while_a_request_is_on_the_model(tiny_zimage: Path) -> None:
    def slow_forward(encoder: Any) -> None:
        encode = encoder.encode  # the text batches' method

        def slowly(texts: Any) -> Any:
            time.sleep(1.5)  # three idle periods on the model
            return encode(texts)

        encoder.encode = slowly

    with serving(text_app(tiny_zimage, slow_forward, idle_sleep_s=0.5)) as client, ThreadPoolExecutor(1) as pool:
        running = pool.submit(embed, client, "slow")
        time.sleep(1.0)
        assert state(client) == "awake"
        assert len(running.result(timeout=30)) == 32
        wait_for_state(client, "asleep")


# --- waking on a request --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["unload", "offload"])
def test_vectors_after_a_wake_are_the_ones_before(tiny_zimage: Path, mode: str) -> None:
    with serving(text_app(tiny_zimage, sleep_mode=mode)) as client:
        before = [embed(client, text) for text in MIXED_TEXTS]
        for cycle in range(3):
            assert client.post("/admin/sleep").json()["state"] == "asleep"
            assert [embed(client, text) for text in MIXED_TEXTS] == before, cycle  # bit for bit
        info = client.get("/info").json()["sleep"]
        assert info["mode"] == mode and info["wakes"] == 3 and info["last_wake_s"] > 0


def test_a_model_kept_out_of_collections_is_still_freed_by_an_unload(tiny_zimage: Path) -> None:
    """The loaded model is frozen out of the garbage collector's passes (they would walk its objects every few
    hundred requests), yet an unload frees it: a model in a reference cycle (hooks and caches make them) is freed
    only by a collection that sees its objects again."""
    models: list[weakref.ref[torch.nn.Module]] = []

    def in_a_cycle(model: torch.nn.Module) -> None:
        model.__dict__["cycle"] = [model]
        models.append(weakref.ref(model))

    def keep_a_reference(encoder: Any) -> None:
        in_a_cycle(encoder.model)
        restore = encoder.restore_weights

        def restore_and_keep(mode: SleepMode) -> None:
            restore(mode)
            in_a_cycle(encoder.model)

        encoder.restore_weights = restore_and_keep

    with serving(text_app(tiny_zimage, keep_a_reference, sleep_mode="unload")) as client:
        frozen = gc.get_freeze_count()
        assert frozen > 10_000, frozen  # the libraries' and the model's objects, not a handful
        expected = embed(client, "a")
        for cycle in range(2):
            assert client.post("/admin/sleep").json()["state"] == "asleep"
            assert models[-1]() is None, cycle  # the model that served is gone, though it was frozen
            assert embed(client, "a") == expected  # woken: a new model, frozen in turn
            assert gc.get_freeze_count() > 0.5 * frozen, cycle


def test_image_vectors_after_a_wake_are_the_ones_before(tiny_siglip: Path) -> None:
    files = [image_bytes(photo_like(120, 90, seed)) for seed in range(3)]
    with serving(image_app(tiny_siglip)) as client:

        def vectors() -> list[Any]:
            texts = [embed(client, text) for text in MIXED_TEXTS[:3]]
            images = [client.post("/embed/image", files={"file": ("x", data)}).json()["embedding"] for data in files]
            return texts + images

        before = vectors()
        client.post("/admin/sleep")
        assert state(client) == "asleep"
        assert vectors() == before


def test_a_burst_on_a_sleeping_service_causes_one_wake_and_every_request_gets_its_vector(tiny_zimage: Path) -> None:
    texts = [f"text number {index}" for index in range(50)]
    app = text_app(tiny_zimage, slow_restore(1.0))
    with serve_in_thread(app) as url:

        def post(text: str) -> requests.Response:
            return requests.post(url + "/embed/text", json={"text": text}, timeout=60)

        alone = [np.asarray(post(text).json()["embedding"]) for text in texts]
        assert requests.post(url + "/admin/sleep", timeout=30).json()["state"] == "asleep"
        with ThreadPoolExecutor(len(texts)) as pool:
            answers = list(pool.map(post, texts))
        assert [answer.status_code for answer in answers] == [200] * len(texts)
        assert_same_vectors([answer.json()["embedding"] for answer in answers], alone)
        info = requests.get(url + "/info", timeout=10).json()["sleep"]
        assert info["wakes"] == 1 and info["state"] == "awake" and info["last_wake_s"] >= 1.0
        metrics = requests.get(url + "/metrics", timeout=10).text
        assert 'embed_wakes_total{reason="request"} 1.0' in metrics


def test_requests_that_arrive_while_the_model_wakes_wait_for_that_wake(tiny_zimage: Path) -> None:
    with serving(text_app(tiny_zimage, slow_restore(1.0))) as client, ThreadPoolExecutor(3) as pool:
        expected = embed(client, "a")
        client.post("/admin/sleep")
        first = pool.submit(embed, client, "a")
        wait_for_state(client, "waking")
        assert client.get("/health").status_code == 200
        later = [pool.submit(embed, client, "a") for _ in range(2)]
        assert [future.result(timeout=30) for future in (first, *later)] == [expected] * 3
        assert client.get("/info").json()["sleep"]["wakes"] == 1


def test_a_wake_that_outlasts_the_request_timeout_is_a_503_and_still_completes(tiny_zimage: Path) -> None:
    with serving(text_app(tiny_zimage, slow_restore(1.5), request_timeout_s=0.3)) as client:
        client.post("/admin/sleep")
        response = client.post("/embed/text", json={"text": "a"})
        assert_error(response, 503, "timeout")
        assert response.headers["retry-after"]
        wait_for_state(client, "awake")
        assert client.get("/info").json()["sleep"]["wakes"] == 1
        embed(client, "a")


def test_a_sleep_on_demand_waits_for_the_work_on_the_model_and_then_wakes_for_the_queue(tiny_zimage: Path) -> None:
    def slow_forward(encoder: Any) -> None:
        encode = encoder.encode  # the text batches' method

        def slowly(texts: Any) -> Any:
            time.sleep(0.5)
            return encode(texts)

        encoder.encode = slowly

    with serving(text_app(tiny_zimage, slow_forward)) as client, ThreadPoolExecutor(4) as pool:
        expected = embed(client, "a")
        running = [pool.submit(embed, client, "a") for _ in range(2)]
        time.sleep(0.2)  # on the model, or queued behind it
        sleeping = pool.submit(client.post, "/admin/sleep")
        time.sleep(0.1)
        arriving = pool.submit(embed, client, "a")  # during the sleep: waits for it, then wakes the model again
        assert [future.result(timeout=30) for future in running] == [expected] * 2
        assert sleeping.result(timeout=30).json()["state"] == "asleep"
        assert arriving.result(timeout=30) == expected
        assert state(client) == "awake"
        sleep_info = client.get("/info").json()["sleep"]
        assert sleep_info["sleeps"] == 1 and sleep_info["wakes"] == 1


def test_bad_requests_are_refused_without_waking_the_model(tiny_zimage: Path) -> None:
    with serving(text_app(tiny_zimage, max_text_chars=10)) as client:
        client.post("/admin/sleep")
        assert_error(client.post("/embed/text", json={"text": "x" * 11}), 413, "payload_too_large")
        assert state(client) == "asleep"


# --- hold -----------------------------------------------------------------------------------------------------------


def test_a_hold_answers_503_asleep_until_wake(tiny_siglip: Path) -> None:
    with serving(image_app(tiny_siglip, idle_sleep_s=0.2)) as client:
        expected = embed(client, "a")
        answer = client.post("/admin/sleep", json={"hold": True}).json()
        assert answer["state"] == "held" and answer["seconds"] >= 0
        for request in (
            lambda: client.post("/embed/text", json={"text": "a"}),
            lambda: client.post("/embed/image", files={"file": ("x", image_bytes(photo_like(20, 20)))}),
            lambda: client.post("/v1/embeddings", json={"input": "a"}),
        ):
            started = time.monotonic()
            response = request()
            assert time.monotonic() - started < 5  # at once, not after a wait
            assert_error(response, 503, "asleep")
            assert response.headers["retry-after"] == "5"
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["state"] == "held"
        assert metric(client, 'embed_model_state{state="held"}') == 1
        time.sleep(0.5)  # no idle timer while held
        assert client.post("/admin/sleep").json()["state"] == "held"  # a sleep without hold keeps the hold
        woken = client.post("/admin/wake").json()
        assert woken["state"] == "awake" and woken["seconds"] > 0
        assert embed(client, "a") == expected
        assert metric(client, 'embed_wakes_total{reason="admin"}') == 1
        assert metric(client, "embed_wake_seconds_count") == 1


def test_the_indexer_waits_out_a_hold_and_indexes_every_photo_once(tiny_siglip: Path, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    for index in range(12):
        (root / f"photo{index:02d}.png").write_bytes(image_bytes(photo_like(40, 30, index)))
    out = tmp_path / "vectors.parquet"
    with serve_in_thread(image_app(tiny_siglip, max_batch_size=4)) as url:
        # Few retries and short waits: only the hold's own waiting can carry the run over it.
        client = EmbedClient(url, max_retries=1, backoff_s=0.05, max_backoff_s=0.1)
        held: list[float] = []

        def record(seconds: float) -> None:
            held.append(seconds)
            time.sleep(seconds)

        client._sleep = record
        assert client.sleep(hold=True)["state"] == "held"
        with ThreadPoolExecutor(1) as pool:
            run = pool.submit(index_folder, root, out, client, concurrency=2, progress=False)
            deadline = time.monotonic() + 30
            while len(held) < 20:  # far more than max_retries: the run waits instead of failing
                assert time.monotonic() < deadline and not run.done(), run.result() if run.done() else held
                time.sleep(0.05)
            assert not run.done()
            assert client.wake()["state"] == "awake"
            summary = run.result(timeout=60)
    assert summary.embedded == 12 and not summary.failed
    import pyarrow.parquet as pq

    paths = pq.read_table(out).column("path").to_pylist()
    assert sorted(paths) == sorted(f"photo{index:02d}.png" for index in range(12))


# --- failing wakes --------------------------------------------------------------------------------------------------


def test_a_wake_whose_model_folder_is_gone_is_a_503_and_the_next_request_tries_again(
    tiny_zimage: Path, tmp_path: Path
) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_zimage, model)
    with serving(text_app(model, sleep_mode="unload")) as client:
        expected = embed(client, "a")
        client.post("/admin/sleep")
        model.rename(tmp_path / "moved")
        for _ in range(2):
            response = client.post("/embed/text", json={"text": "a"})
            assert_error(response, 503, "not_ready")
            assert response.headers["retry-after"] == "5"
            assert state(client) == "asleep"
        assert_error(client.post("/admin/wake"), 503, "not_ready")
        (tmp_path / "moved").rename(model)
        assert embed(client, "a") == expected
        assert client.get("/info").json()["sleep"]["wakes"] == 1


def test_a_wake_that_runs_out_of_memory_is_a_503_and_leaves_nothing_half_restored(tiny_zimage: Path) -> None:
    failures = [1]

    def full_card(encoder: Any) -> None:
        restore = encoder.restore_weights

        def restore_or_fail(mode: SleepMode) -> None:
            restore(mode)  # part of it arrived, then the card was full
            if failures:
                failures.pop()
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (simulated)")

        encoder.restore_weights = restore_or_fail

    with serving(text_app(tiny_zimage, full_card, sleep_mode="unload")) as client:
        expected = embed(client, "a")
        client.post("/admin/sleep")
        response = client.post("/embed/text", json={"text": "a"})
        assert_error(response, 503, "out_of_memory")
        assert response.headers["retry-after"] == "5"
        assert state(client) == "asleep"
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        assert not hasattr(runtime.model.encoder, "model")  # released again after the failed restore
        assert embed(client, "a") == expected
        assert runtime.status == "ok"


# --- the admin routes -----------------------------------------------------------------------------------------------


def test_the_admin_routes_need_the_key_and_refuse_cross_origin_posts(tiny_zimage: Path) -> None:
    with serving(text_app(tiny_zimage, api_key="secret", allowed_hosts=["testserver"])) as client:
        for path in ("/admin/sleep", "/admin/wake"):
            assert_error(client.post(path), 401, "invalid_api_key")
            assert_error(client.post(path, headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
            evil = {"Authorization": "Bearer secret", "Origin": "http://evil.example"}
            assert_error(client.post(path, headers=evil), 403, "cross_origin")
            rebound = {"Authorization": "Bearer secret", "Host": "evil.example"}
            assert_error(client.post(path, headers=rebound), 400, "invalid_host")
        assert state(client) == "awake"
        key = {"Authorization": "Bearer secret"}
        assert client.post("/admin/sleep", headers=key, json={"hold": True}).json()["state"] == "held"
        assert client.post("/admin/wake", headers=key).json()["state"] == "awake"


def test_the_sleep_body_is_checked(tiny_zimage: Path) -> None:
    with serving(text_app(tiny_zimage)) as client:
        assert_error(client.post("/admin/sleep", json={"hold": "yes"}), 422, "invalid_request")
        assert_error(client.post("/admin/sleep", json={"hodl": True}), 422, "invalid_request")
        assert_error(
            client.post("/admin/sleep", content=b"{", headers={"Content-Type": "application/json"}),
            422,
            "invalid_request",
        )
        assert state(client) == "awake"


def test_the_client_and_its_command_line_sleep_and_wake(tiny_zimage: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with serve_in_thread(text_app(tiny_zimage)) as url, EmbedClient(url) as client:
        expected = client.embed_texts(["a"])
        assert client.sleep()["state"] == "asleep"
        np.testing.assert_array_equal(client.embed_texts(["a"]), expected)  # a request wakes it
        assert client_main(["sleep", "--url", url, "--hold"]) == 0
        assert f"{url}: held" in capsys.readouterr().out
        assert state(url) == "held"
        assert client_main(["wake", "--url", url]) == 0
        assert f"{url}: awake" in capsys.readouterr().out
        assert client.health()["state"] == "awake"
    assert client_main(["wake", "--url", url]) == 1  # the service is gone
    assert "error:" in capsys.readouterr().err


# --- settings and the state machine alone ---------------------------------------------------------------------------


def test_the_settings_come_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch, tiny_zimage: Path) -> None:
    monkeypatch.setenv("EMBED_IDLE_SLEEP_S", "7.5")
    monkeypatch.setenv("EMBED_SLEEP_MODE", "offload")
    settings = Qwen3Settings(model=str(tiny_zimage))
    assert settings.idle_sleep_s == 7.5 and settings.sleep_mode == "offload"
    assert Qwen3Settings(model=str(tiny_zimage), sleep_mode="unload").sleep_mode == "unload"
    monkeypatch.delenv("EMBED_SLEEP_MODE")
    assert Siglip2Settings().sleep_mode == "auto"
    assert pick_sleep_mode("auto", torch.device("cpu")) == "unload"
    assert pick_sleep_mode("auto", torch.device("cuda", 0)) == "offload"
    assert pick_sleep_mode("offload", torch.device("cpu")) == "offload"
    with serving(text_app(tiny_zimage)) as client:
        info = client.get("/info").json()["sleep"]
        assert info == {
            "state": "awake",
            "mode": "unload",
            "idle_sleep_s": 7.5,
            "last_wake_s": None,
            "sleeps": 0,
            "wakes": 0,
        }


class CountingWeights:
    """A model's weights as the residency sees them, counting releases and restores."""

    def __init__(self, restore_s: float = 0.0) -> None:
        self.resident = True
        self.restores = 0
        self.restore_s = restore_s

    def release_weights(self, mode: SleepMode) -> None:
        self.resident = False

    def restore_weights(self, mode: SleepMode) -> None:
        time.sleep(self.restore_s)
        self.restores += 1
        self.resident = True


def test_the_state_machine_alone() -> None:
    async def scenario() -> None:
        weights = CountingWeights(restore_s=0.2)
        with ThreadPoolExecutor(1) as worker:
            residency = Residency(weights, worker, mode="unload", idle_sleep_s=0, timeout_s=10)
            residency.start()
            await residency.sleep("admin")
            assert residency.state == "asleep" and not weights.resident

            async def work() -> bool:
                async with residency.in_use():
                    return weights.resident

            assert all(await asyncio.gather(*(work() for _ in range(100))))
            assert weights.restores == 1 and residency.wakes == 1
            await residency.sleep("admin", hold=True)
            with pytest.raises(Asleep):
                await work()
            assert (await residency.wake()).state == "awake" and weights.restores == 2
            await residency.stop()

    asyncio.run(scenario())


def test_a_stop_while_waking_lets_the_wake_finish(tiny_zimage: Path) -> None:
    """What a stop signal does while a (slow) wake runs: the request that started it is answered, and the server
    stops cleanly."""
    app = text_app(tiny_zimage, slow_restore(1.5), port=free_port())
    with started_server(app, app.state.runtime.settings) as (url, server), ThreadPoolExecutor(1) as pool:
        requests.post(url + "/admin/sleep", timeout=30)
        waking = pool.submit(requests.post, url + "/embed/text", json={"text": "a"}, timeout=60)
        deadline = time.monotonic() + 10
        while state(url) != "waking":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        server.should_exit = True  # what SIGTERM does
        assert waking.result(timeout=30).status_code in (200, 503)
    # started_server asserts that the server's thread ended


# --- memory given back, stopping, Ray Serve ----------------------------------------------------------------------


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.slow
def test_unload_gives_the_weights_memory_back_to_the_system(tmp_path: Path) -> None:
    """On the CPU, an unloaded model's RSS goes back to the system (glibc would keep it in its arenas), and
    sleep/wake cycles do not make the process grow."""
    from common.tiny_models import build_tiny_siglip

    model = build_tiny_siglip(tmp_path / "siglip-177mb", hidden_size=1024)  # 44 M parameters, 177 MB in float32
    release_free_memory()
    before = rss_bytes()
    encoder = Siglip2Encoder(str(model), CPU, torch.float32)
    weights = sum(p.numel() * p.element_size() for p in encoder.model.parameters())
    assert weights > 150_000_000
    pixels = [np.full((encoder.input_height, encoder.input_width, 3), 128, np.uint8)]

    def vectors() -> tuple[np.ndarray, np.ndarray]:
        # Both towers: a float32 file's weights are mapped from it, and count in the RSS once they are read.
        return encoder.embed_texts(["a photo of a cat"]), encoder.embed_images(pixels)

    expected = vectors()
    loaded = rss_bytes()
    assert loaded - before > 0.8 * weights, (before, loaded)
    asleep = []
    for _ in range(5):
        encoder.release_weights("unload")
        asleep.append(rss_bytes())
        encoder.restore_weights("unload")
        for got, reference in zip(vectors(), expected, strict=True):
            np.testing.assert_array_equal(got, reference)
    assert loaded - asleep[0] > 0.8 * weights, (before, loaded, asleep)
    assert asleep[0] - before < 0.15 * weights, (before, loaded, asleep)  # back near where it was before loading
    assert max(asleep) - asleep[0] < 0.1 * weights, asleep  # no growth from cycle to cycle


@pytest.mark.slow
@pytest.mark.parametrize("hold", [False, True])
def test_sigterm_while_asleep_or_held_exits_cleanly(tiny_zimage: Path, tmp_path: Path, hold: bool) -> None:
    log = tmp_path / "server.log"
    with service_process("qwen3_embed.py", tiny_zimage, log, "--idle-sleep-s", "0.5") as (process, url):
        deadline = time.monotonic() + 30
        while state(url) != "asleep":  # the flag reached the service
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        if hold:
            assert requests.post(url + "/admin/sleep", json={"hold": True}, timeout=30).json()["state"] == "held"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
    text = log.read_text()
    assert "Traceback" not in text and "model asleep (idle, unload)" in text, text


def test_ray_serve_refuses_the_admin_routes_and_says_why(tiny_zimage: Path) -> None:
    from cluster.serve import refuse_admin_routes

    app = text_app(tiny_zimage, api_key="secret")
    refuse_admin_routes(app)
    with serving(app) as client:
        assert_error(client.post("/admin/sleep"), 401, "invalid_api_key")  # the guard still comes first
        for path in ("/admin/sleep", "/admin/wake"):
            error = assert_error(
                client.post(path, headers={"Authorization": "Bearer secret"}), 501, "not_supported_under_serve"
            )
            assert "min_replicas: 0" in error["message"]
        assert state(client) == "awake"
