"""Stop a request's generation as soon as its client hangs up, so the slot goes to someone still waiting.

Starlette notices a departed client only while it sends a streamed response. Before that (all of a
non-streamed answer; a streamed one until its first piece: queued for a slot, queued in the engine, in
prefill) nobody reads the request's ASGI receive channel, so the generation would run to its end for
nobody. `ClientWatch` reads the channel while the route waits: uvicorn answers `http.disconnect` there as
soon as the connection is lost. Cancelling the generation's task frees its place in the generation queue
or, through the backend, its row in the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request

from app.errors import AppError

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ClientDisconnectedError(AppError):
    """The client went away before its answer. Nobody receives the response; 499 is nginx's code for it."""

    status_code = 499
    code = "client_closed_request"


class ClientWatch:
    """Watches one request's client from the moment the route starts."""

    def __init__(self, request: Request) -> None:
        self._request = request
        self._started = time.monotonic()

    async def run(self, work: Awaitable[T]) -> T:
        """Await `work`; if the client disconnects first, cancel it and raise `ClientDisconnectedError`."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_disconnected(self._request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # this request itself is cancelled (server shutdown)
            task.cancel()
            raise
        finally:
            gone.cancel()
        if not task.done():
            self.cancel(task)
            raise ClientDisconnectedError("the client disconnected before its answer was ready")
        return task.result()

    def cancel(self, task: asyncio.Future[Any]) -> None:
        """Cancel the departed client's generation and log it."""
        task.cancel()
        logger.info(
            "%s %s: the client disconnected; its generation was cancelled after %.1f s",
            self._request.method, self._request.url.path, time.monotonic() - self._started,
        )


#: A route parameter of this type gets a `ClientWatch` of its own request.
Watch = Annotated[ClientWatch, Depends()]


async def _disconnected(request: Request) -> None:
    """Return when the client has gone. The body was read before the route ran, so the channel's next
    message is `http.disconnect`: the server blocks on `receive()` until the connection is lost (or the
    response is complete, and then this task has been cancelled already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
