"""asyncio client: the same calls as ``Client`` over ``grpc.aio``."""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Sequence

import grpc

from m2cache_client.client import (ClientBase, Completion, Progress, Token, backoff_s, give_up,
                                   resumed)


class AsyncClient(ClientBase):
    """``async with AsyncClient([...]) as c: await c.generate(...)`` / ``async for t in c.stream(...)``.
    Same arguments as ``Client``."""

    def __init__(self, targets: str | Sequence[str], **kwargs):
        super().__init__(targets, channels=grpc.aio, **kwargs)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels))

    async def stream(self, prompt: str | None = None, *, prompt_token_ids: Sequence[int] | None = None,
                     messages: Sequence[dict] | None = None,
                     max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 0.0, top_k: int = 0,
                     seed: int | None = None, stop: Sequence[str] = (), full_precision: bool = False,
                     timeout_s: float | None = None, progress_out: Progress | None = None) -> AsyncIterator[Token]:
        request, progress, end = self._begin(prompt, prompt_token_ids, messages, max_new_tokens, temperature, top_p,
                                             top_k, seed, stop, full_precision, timeout_s, progress_out)
        for attempt in range(self.retries + 1):
            stub = self._stubs[next(self._next) % len(self._stubs)]
            try:
                call = stub.Generate(resumed(request, progress), timeout=max(end - time.monotonic(), 0.001),
                                     metadata=self.metadata)
                try:
                    async for msg in call:
                        token = progress.absorb(msg)
                        if token is not None:
                            yield token
                finally:
                    call.cancel()  # cancelled task or abandoned iterator: end the RPC, free the worker's slot
                return
            except grpc.RpcError as err:
                typed = give_up(err, attempt, self.retries, end)
                if typed is not None:
                    raise typed from None
                await asyncio.sleep(backoff_s(self.backoff_s, attempt, end))

    async def generate(self, prompt: str | None = None, **kwargs) -> Completion:
        progress = Progress()
        parts = [t.text async for t in self.stream(prompt, progress_out=progress, **kwargs)]
        stats = progress.stats
        return Completion("".join(parts), progress.token_ids, progress.prompt_ids,
                          stats.finish_reason if stats else "", stats)
