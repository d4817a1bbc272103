"""The HTTP client: ``EmbedClient``, the errors it raises, and the pure helpers it is built on (request splitting,
data URIs, vector decoding, ``Retry-After``). Needs only requests and numpy, so a program that embeds a few images
does not install the indexer's pyarrow and tqdm."""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import requests

from embed_client.formats import is_image_data_uri, sniff_image_type
from embed_client.token_states import read_token_states

# Named for the package, not the module: one setting covers client and indexer, and log lines read the same.
logger = logging.getLogger("embed_client")

# Worth retrying: the queue is full (429), the model is loading or a request timed out (503), a proxy in between
# lost the backend (502, 504), or a server error (500), which is what a request in flight on a Ray Serve replica
# that dies gets. Embedding is idempotent, so a retry is safe. Anything else will fail the same way again.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# A 500 is retried at most this many times (with the same backoff): one that an item causes every time must not
# cost the indexer a long wait per chunk before it looks for the item.
SERVER_ERROR_RETRIES = 2
# How long a request keeps waiting, by default, while the service's model is held asleep (503 "asleep": its GPU is
# lent to an image generator): such answers are waited out without counting as retries, up to this long in all.
DEFAULT_MAX_HOLD_S = 3600.0
# When /info cannot tell (an older or foreign server), stay modest.
DEFAULT_MAX_ITEMS = 32
# Keep request bodies below the server's body limit with room for JSON around the items.
BODY_SAFETY = 0.9

ImageInput = str | os.PathLike[str] | bytes
# What ``WrongService`` says a service lacks when it has no /embed/tokens (the image service, an older text service).
TOKEN_STATES = "token states"


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


class EmbedClientError(Exception):
    """Base class of everything this package raises."""


class ServiceUnreachable(EmbedClientError):
    """No connection (after retries), or the service did not become ready in time."""


class WrongService(EmbedClientError):
    """The service does not embed this kind of input (images sent to the text-only service): raised before anything
    is sent, instead of vectors of the wrong kind. ``modalities`` is what the service's ``/info`` says it embeds."""

    def __init__(self, url: str, model: str, modalities: Sequence[str], wanted: str, point: str) -> None:
        self.url = url
        self.model = model
        self.modalities = list(modalities)
        self.wanted = wanted
        if wanted == "image" and self.modalities == ["text"]:
            message = f"{url} is a text-only service ({model}); point {point} at the image service, port 6010"
        elif wanted == TOKEN_STATES:
            message = (
                f"{url} ({model}) hands out no per-token states (POST /embed/tokens); point {point} at the text "
                "service, port 6011"
            )
        else:
            message = (
                f"{url} ({model}) embeds {' and '.join(self.modalities) or 'nothing'}, not {wanted}s; "
                f"point {point} at a service that does"
            )
        super().__init__(message)


class ServiceError(EmbedClientError):
    """The service answered with an error; carries its ``{"error": {"message", "type", "code"}}`` envelope."""

    def __init__(
        self, status: int, message: str, type_: str = "", code: str = "", request_id: str | None = None
    ) -> None:
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.request_id = request_id
        where = f", request id {request_id}" if request_id else ""
        super().__init__(f"HTTP {status} {code or type_ or 'error'}: {message}{where}")

    @classmethod
    def from_response(cls, response: requests.Response) -> ServiceError:
        request_id = response.headers.get("X-Request-ID")
        try:
            error = response.json()["error"]
            return cls(response.status_code, str(error["message"]), str(error["type"]), str(error["code"]), request_id)
        except (ValueError, KeyError, TypeError):
            # Not our envelope (a proxy's error page, say): keep a short excerpt of the body.
            return cls(response.status_code, response.text[:200].strip() or response.reason, request_id=request_id)


# ---------------------------------------------------------------------------------------------------------------
# Small pure helpers
# ---------------------------------------------------------------------------------------------------------------


def image_data_uri(data: bytes) -> str:
    # The server decodes by content, not by this label: an unrecognised format still goes as an image, and the
    # server's answer says whether it can read it.
    media_type = sniff_image_type(data) or "image/octet-stream"
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def read_image(item: ImageInput) -> bytes:
    return item if isinstance(item, bytes) else Path(item).read_bytes()


def decode_vector(embedding: str | list[float]) -> np.ndarray:
    """A base64 little-endian float32 string, or a plain list (a server that ignored encoding_format)."""
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4").astype(np.float32)
    return np.asarray(embedding, dtype=np.float32)


def split_requests(sizes: Sequence[int], max_items: int, max_bytes: int) -> list[range]:
    """Consecutive index ranges with at most ``max_items`` items and (unless one item alone is larger) at most
    ``max_bytes`` bytes each."""
    ranges: list[range] = []
    start, total = 0, 0
    for index, size in enumerate(sizes):
        if index > start and (index - start >= max_items or total + size > max_bytes):
            ranges.append(range(start, index))
            start, total = index, 0
        total += size
    if start < len(sizes):
        ranges.append(range(start, len(sizes)))
    return ranges


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _is_held_asleep(response: requests.Response) -> bool:
    """A 503 whose error code is ``asleep``: the model is held asleep on demand."""
    if response.status_code != 503:
        return False
    try:
        return bool(response.json()["error"]["code"] == "asleep")
    except (ValueError, KeyError, TypeError):
        return False


def _reason(exc: requests.RequestException) -> str:
    """The last part of requests' nested urllib3 message, e.g. ``[Errno 111] Connection refused``."""
    cause = getattr(exc.args[0], "reason", exc) if exc.args else exc
    return str(cause).rsplit("): ", 1)[-1] or type(exc).__name__


# ---------------------------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------------------------


class EmbedClient:
    """Blocking client for one service (6010 images + SigLIP text, or 6011 Qwen3 text). Thread-safe: each thread
    gets its own ``requests.Session`` (connection reuse without sharing a session across threads)."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:6010",
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        max_hold_s: float = DEFAULT_MAX_HOLD_S,
        admin_key: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        # For sleep and wake, where the service has an admin key of its own (else the API key is sent there too).
        self.admin_key = admin_key
        # A short connect timeout: an absent server should fail fast; reading may take a full batch queue.
        self.timeout = (min(10.0, timeout), timeout)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_hold_s = max_hold_s
        self.requests_sent = 0  # successful POSTs (embedding requests), for tests and statistics
        self._sleep: Callable[[float], None] = time.sleep
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._info: dict[str, Any] | None = None
        # None until the first embedding request tells whether the server has /v1/embeddings.
        self._openai_route: bool | None = None

    def __enter__(self) -> EmbedClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    # -- public API ---------------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``GET /health`` as it is, 503 bodies included (``{"status": "loading"}``): a probe, not retried on 503."""
        response = self._request("GET", "/health", retry_statuses=frozenset())
        try:
            body: dict[str, Any] = response.json()
        except ValueError:
            raise ServiceError.from_response(response) from None
        return body

    def wait_until_ready(self, timeout: float = 300.0, poll_s: float = 0.5) -> dict[str, Any]:
        """Poll ``/health`` until the model serves (it answers 503 while loading); returns the health body."""
        deadline = time.monotonic() + timeout
        while True:
            body = self.health()
            status = body.get("status")
            if status == "ok":
                return body
            if status not in ("loading", None) or time.monotonic() >= deadline:
                raise ServiceUnreachable(f"{self.url} is not ready (status {status!r}) after {timeout:.0f} s")
            self._sleep(poll_s)

    def info(self, refresh: bool = False) -> dict[str, Any]:
        """``GET /info``: model, version, dimension, batching and limits. Cached once the model is loaded."""
        if self._info is None or refresh:
            body = self._json("GET", "/info")
            if body.get("status") != "ok":
                return body  # still loading: do not cache a body without model and dimension
            self._info = body
        return self._info

    @property
    def max_items_per_request(self) -> int:
        return int(self.info().get("limits", {}).get("max_items_per_request", DEFAULT_MAX_ITEMS))

    @property
    def max_batch_size(self) -> int:
        """Items per forward pass on the server: the chunk that keeps its batcher full without queueing."""
        return int(self.info().get("batching", {}).get("max_batch_size", self.max_items_per_request))

    def require(self, modality: str, point: str = "the client") -> None:
        """Raise ``WrongService`` unless the service embeds ``modality`` ("image" or "text") by its ``/info``; a
        service that is still loading is waited for (as a 503 is). A server whose ``/info`` does not list its
        modalities (an older one) is assumed to take it. ``point`` names what to change in the message."""
        info = self.info()
        if info.get("status") == "loading":
            # /health answers 503 (Retry-After) until the model has loaded: _request retries it like any 503.
            self._request("GET", "/health")
            info = self.info(refresh=True)
            if info.get("status") == "loading":
                raise ServiceUnreachable(f"{self.url} is still loading its model; try again later")
        modalities = info.get("modalities")
        if isinstance(modalities, list) and modality not in modalities:
            raise WrongService(self.url, str(info.get("model", "unknown model")), modalities, modality, point)

    def sleep(self, hold: bool = False) -> dict[str, Any]:
        """``POST /admin/sleep``: the service frees its model's memory (GPU or RAM) now, once the requests already
        queued are done; ``hold``: and answers embedding requests with 503 ``asleep`` (which this client and the
        indexer wait out) until ``wake``. Returns ``{"state", "seconds"}``."""
        return self._admin("/admin/sleep", {"hold": hold})

    def wake(self) -> dict[str, Any]:
        """``POST /admin/wake``: ends a hold and loads the model back; returns ``{"state", "seconds"}`` once it
        serves."""
        return self._admin("/admin/wake", None)

    def _admin(self, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.admin_key}"} if self.admin_key else None
        response = self._request("POST", path, body, headers=headers)
        if not response.ok:
            raise ServiceError.from_response(response)
        result: dict[str, Any] = response.json()
        return result

    def embed_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Image files (paths) or encoded bytes -> ``(n, dimension)`` float32, in input order. ``WrongService``
        before anything is read or sent when the service does not embed images (the text-only service would read
        the images' data URIs as text and answer with vectors that mean nothing)."""
        self.require("image")
        return self._embed([image_data_uri(read_image(item)) for item in images], images=True)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> ``(n, dimension)`` float32, in input order."""
        return self._embed(list(texts), images=False)

    def embed_tokens(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Texts -> per text the text service's per-token states, ``[tokens, dimension]`` float32, in input order
        (``POST /embed/tokens``: the recipe's hidden layer for every real token of the templated, truncated text,
        not pooled; with the default recipe what Z-Image's pipeline conditions on, see ``embed_client.zimage``).
        Sent in requests whose answers stay under the service's size bound; received in the model's dtype
        (bfloat16 on CUDA: half the bytes, and exact as float32). ``WrongService`` for a service without them."""
        texts = list(texts)
        if not texts:
            return []
        info = self.info()
        limits = info.get("limits", {})
        recipe = info.get("recipe") or {}
        if "max_token_states_bytes" not in limits or "max_length" not in recipe:
            raise WrongService(
                self.url, str(info.get("model", "unknown model")), info.get("modalities") or [], TOKEN_STATES, "it"
            )
        # The largest answer a text can have (max_length tokens of float32 values) decides how many go together.
        largest = int(recipe["max_length"]) * int(info["dimension"]) * 4
        per_request = max(1, min(self.max_items_per_request, int(limits["max_token_states_bytes"]) // largest))
        sizes = [len(json.dumps(text)) + 2 for text in texts]
        max_bytes = int(limits.get("max_body_bytes", 32 * 1024 * 1024) * BODY_SAFETY)
        states: list[np.ndarray] = []
        for part in split_requests(sizes, per_request, max_bytes):
            response = self._request("POST", "/embed/tokens", {"texts": texts[part.start : part.stop]})
            if not response.ok:
                raise ServiceError.from_response(response)
            with self._lock:
                self.requests_sent += 1
            states += read_token_states(response.content).states
        return states

    # -- embedding ----------------------------------------------------------------------------------------------

    def _embed(self, inputs: list[str], images: bool) -> np.ndarray:
        if not inputs:
            return np.zeros((0, int(self.info().get("dimension", 0))), dtype=np.float32)
        # Body bytes of each item as JSON sends it (escapes included), plus its quotes and comma.
        sizes = [len(text) + 4 if images else len(json.dumps(text)) + 2 for text in inputs]
        max_bytes = int(self.info().get("limits", {}).get("max_body_bytes", 32 * 1024 * 1024) * BODY_SAFETY)
        ranges = split_requests(sizes, self.max_items_per_request, max_bytes)
        return np.concatenate([self._embed_request(inputs[r.start : r.stop], images) for r in ranges])

    def _embed_request(self, inputs: list[str], images: bool) -> np.ndarray:
        # On 6010 /v1/embeddings reads a text that starts with "data:image/" as an image: such texts take the
        # native route, which never does.
        text_looks_like_image = not images and any(is_image_data_uri(text) for text in inputs)
        if self._openai_route is not False and not text_looks_like_image:
            response = self._request("POST", "/v1/embeddings", {"input": inputs, "encoding_format": "base64"})
            if response.status_code == 404 and self._openai_route is None:
                logger.info("%s has no /v1/embeddings; using the native routes", self.url)
                self._openai_route = False
            else:
                body = self._checked(response)
                self._openai_route = True
                return self._vectors_from_openai(body, len(inputs))
        path, body = ("/embed/images", {"images_base64": inputs}) if images else ("/embed/texts", {"texts": inputs})
        vectors = np.asarray(self._json("POST", path, body)["embeddings"], dtype=np.float32)
        return vectors.reshape(len(inputs), -1)

    @staticmethod
    def _vectors_from_openai(body: dict[str, Any], count: int) -> np.ndarray:
        data = sorted(body["data"], key=lambda item: item["index"])
        if len(data) != count:
            raise EmbedClientError(f"asked for {count} vectors, got {len(data)}")
        return np.stack([decode_vector(item["embedding"]) for item in data])

    # -- HTTP ---------------------------------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            if self.api_key:
                session.headers["Authorization"] = f"Bearer {self.api_key}"
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def _json(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        return self._checked(self._request(method, path, body))

    def _checked(self, response: requests.Response) -> dict[str, Any]:
        if not response.ok:
            raise ServiceError.from_response(response)
        if response.request.method == "POST":
            with self._lock:
                self.requests_sent += 1
        result: dict[str, Any] = response.json()
        return result

    def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        retry_statuses: frozenset[int] = RETRY_STATUSES,
        headers: dict[str, str] | None = None,
    ) -> requests.Response:
        """One call, retried on connection errors and ``retry_statuses``; the last answer is returned as it is. A
        model held asleep is waited for up to ``max_hold_s`` on top, without counting as retries: the hold ends when
        the program that borrowed the GPU is done."""
        attempt = 0
        held_since: float | None = None
        while True:
            try:
                response = self._session().request(
                    method, self.url + path, json=body, headers=headers, timeout=self.timeout
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt >= self.max_retries:
                    raise ServiceUnreachable(f"cannot reach {self.url}{path}: {_reason(exc)}") from exc
                delay, why = self._backoff(attempt), type(exc).__name__
            else:
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                if response.status_code in retry_statuses and _is_held_asleep(response):
                    held_since = time.monotonic() if held_since is None else held_since
                    if time.monotonic() - held_since < self.max_hold_s:
                        delay = self._backoff(0) if retry_after is None else min(retry_after, self.max_backoff_s)
                        logger.info("%s %s: the model is held asleep, waiting %.2f s", method, path, delay)
                        self._sleep(delay)
                        continue
                retries = (
                    min(self.max_retries, SERVER_ERROR_RETRIES) if response.status_code == 500 else self.max_retries
                )
                if response.status_code not in retry_statuses or attempt >= retries:
                    return response
                delay = self._backoff(attempt) if retry_after is None else min(retry_after, self.max_backoff_s)
                why = f"HTTP {response.status_code}"
            logger.info("%s %s: %s, retry %d in %.2f s", method, path, why, attempt + 1, delay)
            self._sleep(delay)
            attempt += 1

    def _backoff(self, attempt: int) -> float:
        """Exponential with "equal jitter": clients that failed together do not come back together."""
        ceiling = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)
