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

# Request limits checked before any tokenizing: a prompt's text is bounded (the
# context length bounds its tokens later), and so are the stop strings and messages.
MAX_PROMPT_CHARS = 1 << 20
MAX_STOP = 16
MAX_STOP_CHARS = 256
MAX_MESSAGES = 1024
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def validate_request(req: worker_pb2.GenerateRequest) -> None:
    """Refuse what no worker could serve, with INVALID_ARGUMENT naming the field."""
    if req.max_new_tokens == 0:
        raise InvalidArgument("max_new_tokens must be >= 1")
    sources = sum(map(bool, (req.prompt, req.prompt_token_ids, req.messages)))
    if sources == 0:
        raise InvalidArgument("empty prompt: give prompt, prompt_token_ids or messages")
    if sources > 1:
        raise InvalidArgument("give only one of prompt, prompt_token_ids or messages")
    text = len(req.prompt) + sum(len(m.content) for m in req.messages)
    if text > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"prompt of {text} characters is over the {MAX_PROMPT_CHARS}-character limit")
    if len(req.messages) > MAX_MESSAGES:
        raise InvalidArgument(f"{len(req.messages)} messages is over the limit of {MAX_MESSAGES}")
    if any(m.role not in CHAT_ROLES for m in req.messages):
        raise InvalidArgument(f"message roles must be one of {', '.join(CHAT_ROLES)}")
    if len(req.stop) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in req.stop):
        raise InvalidArgument(f"stop: at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters")


def request_from_proto(req: worker_pb2.GenerateRequest, runtime: WorkerRuntime) -> Request:
    if req.model and req.model != runtime.model_name:
        raise NotFound(f"unknown model {req.model!r}; this worker serves {runtime.model_name!r}")
    validate_request(req)
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
    log.info("worker %s serving %s on port %d (device %s, HBM cache budget %.0f%% of the FFN bytes, window %d, "
             "DRAM tier %s, rank mode %s)", config.worker_id, config.model, port, config.device,
             config.cache_fraction * 100, config.window, config.dram_target, config.rank_mode)
    grpc_util.serve_until_signal(server, config.grace_s, on_stop=runtime.close)
