"""Turn a generation that reports text pieces through a callback into a stream of pieces.

Errors that happen before the first piece (bad adapter, backend down) are raised to the router, so the
caller gets a normal JSON error with its status code; once streaming has begun they end the stream.
When the client goes away, before the first piece or during the stream, the generation task is cancelled,
which frees its place in the queue or stops its row in the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from app.api.disconnect import ClientWatch
from app.llm.base import TextCallback

T = TypeVar("T")


@dataclass
class PieceStream(Generic[T]):
    """The pieces as they come (`pieces()`), then the generation's own result (`result`)."""

    _task: asyncio.Task[T]
    _queue: asyncio.Queue[str]
    _watch: ClientWatch

    async def pieces(self) -> AsyncIterator[str]:
        try:
            while True:
                getter = asyncio.ensure_future(self._queue.get())
                await asyncio.wait({self._task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                    continue
                getter.cancel()
                while not self._queue.empty():
                    yield self._queue.get_nowait()
                return
        finally:
            if not self._task.done():  # the response stopped early: the client went away
                self._watch.cancel(self._task)

    @property
    def result(self) -> T:
        """The generation's result; raises its error. Only valid once `pieces()` is exhausted."""
        return self._task.result()


async def start_streaming(watch: ClientWatch, run: Callable[[TextCallback], Awaitable[T]]) -> PieceStream[T]:
    """Start `run(on_text)`; return once it produced its first piece or finished (raising its error).
    If the client disconnects before, the generation is cancelled and `ClientDisconnectedError` raised."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    first_piece = asyncio.Event()

    def on_text(piece: str) -> None:
        queue.put_nowait(piece)
        first_piece.set()

    task = asyncio.ensure_future(run(on_text))
    waiter = asyncio.ensure_future(first_piece.wait())
    try:
        await watch.run(asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED))
    except BaseException:  # the client went away (or this request was cancelled) while waiting
        task.cancel()
        raise
    finally:
        waiter.cancel()
    if task.done() and task.exception() is not None and queue.empty():
        raise task.exception()  # type: ignore[misc]
    return PieceStream(task, queue, watch)
