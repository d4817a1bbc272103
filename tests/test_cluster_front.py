"""The front door of the Serve deployment (cluster/front/), the pieces that need no Ray: what the config files ask
of the cluster, the config Serve gets, ``/health`` from what Serve's controller says, the permanent failures found in
what Serve says (cluster/permanent.py, cluster/startup_watch.py) and ``--tiny``'s models. The front door itself, on a
local Ray, is tested in test_cluster_serve.py and test_cluster_local.py."""

from __future__ import annotations

import asyncio
import pickle
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from ray.exceptions import RayTaskError

from cluster.front.config import (
    PROXY_ENV,
    REPLICA_ENV,
    front_door_settings,
    fronted_apps,
    serve_config_behind,
    with_models,
)
from cluster.front.health import DeploymentStatus, HealthWhileNoReplicaRuns, ServeStatus
from cluster.front.resources import ResourceAsk, missing_resources, resource_asks
from cluster.permanent import PermanentFailure, permanent_reason
from cluster.startup_watch import StartupWatch
from common.loading import BrokenWeights, ModelNotFound, WrongModel

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    name: yaml.safe_load((ROOT / "cluster" / name).read_text())
    for name in ("serve_config.yaml", "serve_config_cpu.yaml")
}


def test_the_gpu_config_names_the_gpus_it_needs_and_the_cpu_config_fits_a_laptop() -> None:
    laptop = {"CPU": 2.0}
    message = missing_resources(resource_asks(CONFIGS["serve_config.yaml"]), laptop, "cluster/serve_config.yaml")
    assert message is not None
    assert "asks for 0.9 GPUs (siglip2: 1 x 0.3 GPU, qwen3: 1 x 0.6 GPU) and the Ray cluster has 0" in message
    assert "3 CPUs" in message and "python -m cluster.front cluster/serve_config_cpu.yaml" in message
    assert missing_resources(resource_asks(CONFIGS["serve_config_cpu.yaml"]), laptop, "cpu") is None
    assert missing_resources(resource_asks(CONFIGS["serve_config.yaml"]), {"CPU": 4, "GPU": 1}, "gpu") is None
    # the same applications, under the same prefixes, in both files
    prefixes = [[(a["name"], a["route_prefix"], a["import_path"]) for a in c["applications"]] for c in CONFIGS.values()]
    assert prefixes[0] == prefixes[1]


def test_replicas_are_counted_as_serve_starts_them() -> None:
    config = {
        "applications": [
            {"name": "a", "deployments": [{"autoscaling_config": {"min_replicas": 2, "max_replicas": 8}}]},
            {"name": "b", "deployments": [{"num_replicas": 3, "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 1}}]},
            {"name": "c"},  # Serve's defaults: one replica, one CPU
        ]
    }
    assert resource_asks(config) == [
        ResourceAsk("a", 2, 1.0, 0.0),
        ResourceAsk("b", 3, 0.5, 1.0),
        ResourceAsk("c", 1, 1.0, 0.0),
    ]


def test_settings_are_read_as_the_builders_read_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBED_API_KEY", "k")
    config = {
        "applications": [
            {
                "name": "s",
                "route_prefix": "/s/",
                "import_path": "cluster.serve:siglip2_app",
                "args": {"max-connections": 50},
            },
            {
                "name": "q",
                "route_prefix": "/q",
                "import_path": "cluster.serve:qwen3_app",
                "args": {"header_timeout_s": 3},
            },
        ]
    }
    apps = fronted_apps(config)
    assert [(a.name, a.route_prefix, a.service) for a in apps] == [("s", "/s", "siglip2"), ("q", "/q", "qwen3")]
    assert all(a.settings.api_key is not None and a.settings.api_key.get_secret_value() == "k" for a in apps)
    # connection settings are the server's: the largest any application sets
    server = front_door_settings(apps, "0.0.0.0", 8000)
    assert (server.host, server.port, server.max_connections, server.header_timeout_s) == ("0.0.0.0", 8000, 1000, 10.0)
    with pytest.raises(ValueError, match="unknown setting 'max_batch_sise'"):
        fronted_apps({"applications": [{"import_path": "cluster.serve:qwen3_app", "args": {"max_batch_sise": 1}}]})
    with pytest.raises(ValueError, match="knows only this project's applications"):
        fronted_apps({"applications": [{"import_path": "my.module:app"}]})


def test_serve_gets_its_proxy_on_loopback() -> None:
    config = CONFIGS["serve_config.yaml"]
    behind = serve_config_behind(config, 8001, "127.0.0.1")
    assert behind["http_options"] == {"host": "127.0.0.1", "port": 8001}
    # Serve's controller and the proxies it starts get glibc's fixed mmap threshold; the replicas, which inherit the
    # controller's environment, glibc's default back, and nothing else of theirs changes
    assert behind["controller_options"] == {"runtime_env": {"env_vars": PROXY_ENV}}
    assert [app.pop("runtime_env") for app in behind["applications"]] == [{"env_vars": REPLICA_ENV}] * 2
    assert behind["applications"] == config["applications"]
    # what a config sets itself is kept, beside the rest of its runtime_env
    own = {
        "controller_options": {"runtime_env": {"env_vars": {"GLIBC_TUNABLES": "mine", "A": "1"}}},
        "applications": [{"runtime_env": {"working_dir": ".", "env_vars": {"B": "2"}}}],
    }
    behind = serve_config_behind(own, 8001, "127.0.0.1")
    assert behind["controller_options"] == own["controller_options"]
    assert behind["applications"][0]["runtime_env"] == {"working_dir": ".", "env_vars": {**REPLICA_ENV, "B": "2"}}
    # Behind a front door on another address, the replicas see only the front door's loopback connections: the
    # names the front door accepted must pass there too, unless the config lists its own.
    elsewhere = serve_config_behind(config, 8001, "0.0.0.0")
    assert [app["args"]["allowed_hosts"] for app in elsewhere["applications"]] == [["*"], ["*"]]
    assert config["applications"][0]["args"] == {}  # the caller's config is left as it was
    listed = {"applications": [{"args": {"allowed-hosts": ["embed.example.com"]}}]}
    assert serve_config_behind(listed, 8001, "0.0.0.0")["applications"][0]["args"] == {
        "allowed-hosts": ["embed.example.com"]
    }


class ScriptedController:
    """Stands in for Serve's controller (the Ray tests ask the real one)."""

    def __init__(self, answer: DeploymentStatus | Exception) -> None:
        self.answer = answer
        self.asked = 0

    def __call__(self) -> dict[str, dict[str, DeploymentStatus]]:
        self.asked += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return {"siglip2": {"siglip2": self.answer}}


def health_client(controller: ScriptedController) -> TestClient:
    app = FastAPI()
    app.get("/health")(lambda: {"status": "ok"})
    gate = HealthWhileNoReplicaRuns(app, application="siglip2", deployment="siglip2", status=ServeStatus(controller))
    return TestClient(gate, root_path="/siglip2")


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (("DEPLOYING", {"STARTING": 2}), {"status": "loading", "replicas": {"STARTING": 2}}),
        (("UPDATING", {}), {"status": "loading", "replicas": {}}),
        (("DEPLOY_FAILED", {}), {"status": "unhealthy", "replicas": {}}),
        (("UNHEALTHY", {"STARTING": 1}), {"status": "unhealthy", "replicas": {"STARTING": 1}}),
    ],
)
def test_health_is_503_while_no_replica_runs(answer: DeploymentStatus, expected: dict[str, Any]) -> None:
    response = health_client(ScriptedController(answer)).get("/siglip2/health")
    assert (response.status_code, response.json(), response.headers["retry-after"]) == (503, expected, "5")


@pytest.mark.parametrize(
    "answer",
    [
        ("UNHEALTHY", {"RUNNING": 1, "STARTING": 1}),  # one replica of two was lost: the other serves
        ("UPDATING", {"RUNNING": 1, "STARTING": 1}),
        ("HEALTHY", {"RUNNING": 2}),
        ("UPSCALING", {"RUNNING": 2, "STARTING": 1}),
        RuntimeError("the controller is restarting"),  # a replica answers for itself
    ],
)
def test_health_is_a_replicas_own_while_one_runs(
    answer: DeploymentStatus | Exception, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cluster.front.health.STATUS_TTL_S", 60.0)  # a loaded machine may take a second for 20 requests
    controller = ScriptedController(answer)
    client = health_client(controller)
    for _ in range(20):
        response = client.get("/siglip2/health")
        assert (response.status_code, response.json()) == (200, {"status": "ok"})
    assert controller.asked == 1  # once per STATUS_TTL_S, failures included


def test_health_does_not_wait_on_a_controller_that_never_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """serve.status() waits on a controller that is down or restarting without a timeout of its own; load balancers'
    probes must not pile up behind it (each would hold one of the front door's connections). After STATUS_TIMEOUT_S
    the status is unknown, and a replica answers for itself, as when the controller fails."""
    monkeypatch.setattr("cluster.front.health.STATUS_TIMEOUT_S", 0.5)
    released = threading.Event()

    def silent_controller() -> dict[str, dict[str, DeploymentStatus]]:
        released.wait(60)
        return {}

    async def ask() -> tuple[DeploymentStatus | None, float]:
        started = time.monotonic()
        try:
            return await ServeStatus(silent_controller).deployment("siglip2", "siglip2"), time.monotonic() - started
        finally:
            released.set()  # asyncio.run waits for the controller's thread

    answer, seconds = asyncio.run(ask())
    assert answer is None and seconds < 10


# What Serve's status said of a replica whose model was not found (Ray 2.60; the middle of the traceback cut).
SERVE_MESSAGE = """A replica failed to start with exception. Retrying 2 more time(s). Error:
\x1b[36mray::ServeReplica:siglip2:siglip2.initialize_and_get_metadata()\x1b[39m (pid=20104, ip=192.0.2.2, actor_id=b2a5)
  File "/venv/lib/python3.11/site-packages/ray/serve/_private/replica.py", line 1928, in initialize
    raise RuntimeError(traceback.format_exc()) from None
RuntimeError: Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/ray/serve/_private/replica.py", line 1926, in initialize
    await self.check_health()
  File "/repo/cluster/serve.py", line 222, in check_health
    raise PermanentFailure.of(str(self.load_error))
cluster.permanent.PermanentFailure: cannot start, and trying again would fail the same way: Model not found: '/m' is \
not a local folder. Download it first, for example:

    huggingface-cli download google/siglip2-so400m-patch16-512 --local-dir /mnt/hdd/models/siglip2-so400m-patch16-512

then start the service with --model PATH (or the environment variable named in --help).
"""
# ... and of one whose load failed in a way a retry may not meet (out of memory while loading).
TRANSIENT_MESSAGE = """A replica failed to start with exception. Retrying 2 more time(s). Error:
RuntimeError: Traceback (most recent call last):
  File "/repo/cluster/serve.py", line 223, in check_health
    raise RuntimeError(f"the model did not load: {self.load_error}")
RuntimeError: the model did not load: CUDA out of memory. Tried to allocate 2.00 GiB
"""


def test_a_permanent_failure_is_found_in_the_text_ray_passes_on() -> None:
    reason = permanent_reason(SERVE_MESSAGE)
    assert reason is not None and reason.startswith("Model not found: '/m' is not a local folder. Download it first")
    assert reason.endswith("(or the environment variable named in --help).")
    assert permanent_reason(TRANSIENT_MESSAGE) is None and permanent_reason("") is None
    # an error of this process, a Ray task's (whose cause Ray keeps) and one of its causes
    assert permanent_reason(ModelNotFound("Model not found: 'x'")) == "Model not found: 'x'"
    assert (
        permanent_reason(RayTaskError("read_image_spec", "Traceback ...", WrongModel("a clip model"))) == "a clip model"
    )
    try:
        try:
            raise BrokenWeights("model.safetensors is truncated")
        except BrokenWeights as exc:
            raise RuntimeError("the job failed") from exc
    except RuntimeError as chained:
        assert permanent_reason(chained) == "model.safetensors is truncated"
    assert permanent_reason(RuntimeError("CUDA out of memory")) is None
    # the error crosses Ray's processes pickled: its reason comes back whole
    marked = PermanentFailure.of("Model not found: 'x'")
    assert pickle.loads(pickle.dumps(marked)).reason == "Model not found: 'x'" == permanent_reason(marked)


class ScriptedDeployments:
    def __init__(self, *answers: dict[str, dict[str, tuple[str, str]]] | Exception) -> None:
        self.answers = list(answers)

    def __call__(self) -> dict[str, dict[str, tuple[str, str]]]:
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def watch(ask: ScriptedDeployments) -> list[tuple[str, str]]:
    failures: list[tuple[str, str]] = []
    startup = StartupWatch(["siglip2", "qwen3"], lambda app, reason: failures.append((app, reason)), ask, 0.01)
    startup.start()
    startup._thread.join(timeout=30)
    assert not startup._thread.is_alive()
    return failures


def test_the_startup_watch_stops_the_front_door_at_the_first_permanent_failure() -> None:
    loading = {"siglip2": {"siglip2": ("UPDATING", "")}}  # qwen3 not registered yet
    failing = {"siglip2": {"siglip2": ("UPDATING", SERVE_MESSAGE)}, "qwen3": {"qwen3": ("UPDATING", "")}}
    failures = watch(ScriptedDeployments(RuntimeError("the controller is starting"), loading, failing))
    assert [(app, reason.split(" is not")[0]) for app, reason in failures] == [("siglip2", "Model not found: '/m'")]


def test_the_startup_watch_ends_once_every_application_ran_and_waits_on_transient_failures() -> None:
    retrying = {"siglip2": {"siglip2": ("UPDATING", TRANSIENT_MESSAGE)}, "qwen3": {"qwen3": ("HEALTHY", "")}}
    running = {"siglip2": {"siglip2": ("HEALTHY", "")}, "qwen3": {"qwen3": ("HEALTHY", "")}}
    # once both ran, a later failure is a replica lost, which Serve replaces: the watch has ended before it
    assert watch(ScriptedDeployments(retrying, running, {"siglip2": {"siglip2": ("UPDATING", SERVE_MESSAGE)}})) == []


def test_tiny_models_replace_the_applications_models_in_any_spelling() -> None:
    config: dict[str, Any] = {
        "applications": [
            {"import_path": "cluster.serve:siglip2_app", "args": {"--model": "/real/siglip2", "device": "cpu"}},
            {"import_path": "cluster.serve:qwen3_app"},
            {"import_path": "my.module:app", "args": {"model": "mine"}},
        ]
    }
    folders = {"siglip2": Path("/tiny/siglip"), "qwen3": Path("/tiny/zimage")}
    changed = with_models(config, folders)
    assert [app.get("args") for app in changed["applications"]] == [
        {"device": "cpu", "model": "/tiny/siglip"},
        {"model": "/tiny/zimage"},
        {"model": "mine"},  # not this project's: the front door refuses it later, as it is
    ]
    assert config["applications"][0]["args"]["--model"] == "/real/siglip2"  # the caller's config as it was
