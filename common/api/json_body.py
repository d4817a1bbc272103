"""JSON request bodies, read so that their size cannot become work: parsed in a worker thread when large (the event
loop keeps answering ``/health`` meanwhile), and any list longer than the item limit refused with 413 before the
body is validated. Validating ``{"texts": [1, 1, ...]}`` with a million entries would otherwise build a million
validation errors (seconds of CPU and a gigabyte of memory) only to report five of them.

The routers' ``route_class``: FastAPI then reads JSON bodies through ``JSONBodyRequest.json``, and routes that take
the ``Request`` get the same class.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from common.config import limit_hint
from common.errors import InvalidRequestBody, TooManyItems

# Bodies larger than this are parsed in a thread (about 10 ms of parsing at most stays on the event loop).
PARSE_IN_THREAD_BYTES = 1024 * 1024


async def loads(raw: bytes | str, what: str = "the body") -> Any:
    """``json.loads`` (FastAPI's own parser, so the accepted JSON is unchanged), off the event loop when large;
    422 ``invalid_request`` for anything that is not JSON (bad syntax, bad UTF-8, nesting too deep)."""
    try:
        if len(raw) > PARSE_IN_THREAD_BYTES:
            return await asyncio.to_thread(json.loads, raw)
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise InvalidRequestBody(f"{what} is not valid JSON: {reason}") from None


def refuse_long_lists(value: Any, limit: int) -> None:
    """413 ``too_many_items`` for a list longer than the item limit, at the top of the body or one level down
    (``{"texts": [...]}``, ``{"input": [...]}``): every list these bodies hold is a list of items."""
    lists = [("body", value)] if isinstance(value, list) else []
    if isinstance(value, dict):
        lists = [(str(key)[:40], item) for key, item in value.items() if isinstance(item, list)]
    for name, items in lists:
        if len(items) > limit:
            raise TooManyItems(
                f"{len(items)} items in '{name}' in one request; the limit is "
                f"{limit_hint('max_items_per_request', limit)}"
            )


class JSONBodyRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_checked_json"):
            parsed = await loads(await self.body())
            refuse_long_lists(parsed, self.app.state.runtime.settings.max_items_per_request)  # apps of create_app
            self._checked_json = parsed
        return self._checked_json


class JSONBodyRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def with_checked_json(request: Request) -> Response:
            return await handler(JSONBodyRequest(request.scope, request.receive))

        return with_checked_json
