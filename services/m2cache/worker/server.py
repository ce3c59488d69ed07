"""Worker gRPC service: thin proto <-> domain translation over the Engine."""
from __future__ import annotations

import logging
import queue

from m2cache import grpc_util
from m2cache.errors import InvalidArgument, NotFound
from m2cache.model.generate import Sampling
from m2cache.metrics import start_metrics_server
from m2cache.worker.config import WorkerConfig
from m2cache.worker.metrics import worker_registry
from m2cache.worker.engine import Request
from m2cache.worker.runtime import WorkerRuntime
from m2cache_client.pb import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = "m2cache.v1.Worker"


def request_from_proto(req: worker_pb2.GenerateRequest, runtime: WorkerRuntime) -> Request:
    if req.model and req.model != runtime.model_name:
        raise NotFound(f"unknown model {req.model!r}; this worker serves {runtime.model_name!r}")
    s = req.sampling
    sampling = Sampling(
        temperature=s.temperature, top_k=s.top_k or None,
        top_p=None if s.top_p in (0.0, 1.0) else s.top_p,  # 0 and 1 both mean off
        seed=s.seed if s.has_seed else None,
    )
    if req.prompt_token_ids:
        ids = list(req.prompt_token_ids)
    elif req.messages:
        ids = runtime.encode_chat([{"role": m.role, "content": m.content} for m in req.messages])
    else:
        ids = runtime.encode(req.prompt)
    return Request(tuple(ids), req.max_new_tokens, sampling, tuple(req.stop), req.full_precision)


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, runtime: WorkerRuntime):
        self.runtime = runtime

    def Generate(self, request, context):
        """Stream tokens as they are sampled; the last message carries stats."""
        if request.max_new_tokens == 0:
            raise InvalidArgument("max_new_tokens must be >= 1")
        seq = self.runtime.submit(request_from_proto(request, self.runtime))
        context.add_callback(seq.cancel)  # client gone or deadline: stop decoding it
        before = self.runtime.snapshot()
        first = True
        while True:
            try:
                event = seq.events.get(timeout=0.5)
            except queue.Empty:
                if not context.is_active():
                    seq.cancel()
                    return
                continue
            if event.kind == "token":
                prompt = seq.request.prompt_ids if first else ()
                first = False
                yield worker_pb2.GenerateResponse(token_id=event.token_id, text=event.text, prompt_token_ids=prompt)
            elif event.kind == "error":
                raise event.error
            else:
                yield worker_pb2.GenerateResponse(text=event.text, stats=self.runtime.stats_for(seq, before))
                return

    def GetStats(self, request, context):
        return self.runtime.worker_stats()


def create_server(config: WorkerConfig, runtime: WorkerRuntime | None = None):
    """(server, port, runtime): a real server on ``config.address`` (port 0 = any)."""
    runtime = runtime or WorkerRuntime.connect(config)
    server, port, health = grpc_util.create_server(
        config.address, [(worker_pb2_grpc.add_WorkerServicer_to_server, WorkerServicer(runtime))], [SERVICE_NAME],
        max_workers=config.max_batch + config.max_queue + 8,
    )
    return server, port, runtime


def serve(config: WorkerConfig) -> None:
    server, port, runtime = create_server(config)
    start_metrics_server(config.metrics_port, worker_registry(runtime))
    log.info("worker %s serving %s on port %d", config.worker_id, config.model, port)
    grpc_util.serve_until_signal(server, config.grace_s, on_stop=runtime.close)
