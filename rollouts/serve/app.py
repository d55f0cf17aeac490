"""`rollouts serve --model DIR`: the Tinker API over HTTP, so the official `tinker` SDK (and code
built on it) trains and samples a local model.

    rollouts serve --model ./my-model [--host 127.0.0.1] [--port 8000] [--api-key tml-...]
    # then, in Python:  tinker.ServiceClient(base_url="http://127.0.0.1:8000", api_key="tml-x")

Starlette routes the requests and uvicorn serves them: a small, well-kept ASGI pair whose
handlers are plain coroutines, so a long-polled `retrieve_future` is an `await`, and training runs
on each model's backend thread while the event loop keeps answering. Every path is under
`/api/v1/`; JSON bodies go in and out except where the Tinker API uses protobuf (a
`forward_backward` request, and the results of `forward_backward` and `asample`). The state and
its semantics live in `rollouts.serve.state`; this module is the HTTP face.

Safety: the server binds to 127.0.0.1 unless `--host` says otherwise; with `--api-key` every
request must carry it in `X-API-Key`; a body over `--max-request-mb` is refused (413); a model
with more than `--queue-limit` calls waiting is refused (429); a malformed request gets a 4xx
with a message and never reaches a model.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from rollouts.serve.state import ServeError, ServerState
from rollouts.serve.wire import TINKER_INSTALL_HINT, WireError, decode_forward_backward

__all__ = ["build_app", "serve_command"]

_log = logging.getLogger("rollouts.serve")
PROTOBUF = "application/x-protobuf"
POLL_HOLD_S = 25.0  # a pending retrieve_future is held this long (the client waits 45 s)
CLIENT_CONFIG = {
    "pjwt_auth_enabled": False,
    "use_pyqwest_transport": False,
    "proto_compress_fwdbwd": False,
    "parallel_fwdbwd_chunks": False,
}


def _starlette() -> Any:
    try:
        import starlette.applications
        import starlette.responses
        import starlette.routing
    except ImportError as error:
        raise ImportError(TINKER_INSTALL_HINT) from error
    return starlette


def build_app(state: ServerState, api_key: str = "", max_request_bytes: int = 64 << 20) -> Any:
    """The ASGI application serving `state`."""
    starlette = _starlette()
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    def json_response(payload: Any, status: int = 200) -> Any:
        return JSONResponse(payload, status_code=status)

    def handler(body_kind: str, answer: Callable[..., Awaitable[Any] | Any]) -> Any:
        async def endpoint(request: Any) -> Any:
            given = request.headers.get("x-api-key", "")
            if api_key and not hmac.compare_digest(given.encode(), api_key.encode()):
                return json_response({"detail": "missing or wrong X-API-Key"}, 401)
            try:
                body = await _read_body(request, max_request_bytes)
                if body_kind == "json":
                    body = _json_object(body)
                result = answer(body, request) if body_kind != "none" else answer(request)
                if asyncio.iscoroutine(result):
                    result = await result
            except ServeError as error:
                return json_response({"detail": str(error)}, error.status)
            except (WireError, ValueError, TypeError, AttributeError, KeyError) as error:
                # A client's malformed request (a 5xx would make the SDK retry it for minutes).
                return json_response({"detail": f"{type(error).__name__}: {error}"}, 400)
            except Exception as error:  # never crash the server on one request
                _log.exception("request %s failed", request.url.path)
                return json_response({"detail": f"{type(error).__name__}: {error}"}, 500)
            return result if isinstance(result, Response) else json_response(result)

        return endpoint

    async def retrieve(body: dict[str, Any], _request: Any) -> Any:
        result = await state.futures.wait(body.get("request_id"), POLL_HOLD_S)
        if result is None:
            return {"type": "try_again", "request_id": body["request_id"], "queue_state": "active"}
        kind, payload = result
        if kind == "proto":
            return Response(payload, media_type=PROTOBUF)
        if kind == "error":
            message, category = payload
            return {"error": message, "category": category}
        return payload

    def future(request_id: str) -> dict[str, Any]:
        return {"request_id": request_id}

    def forward_backward(body: bytes, request: Any) -> Any:
        if "zstd" in request.headers.get("content-encoding", ""):
            import zstandard

            try:
                body = zstandard.ZstdDecompressor().decompress(
                    body, max_output_size=max_request_bytes
                )
            except zstandard.ZstdError as error:
                raise ServeError(
                    f"forward_backward: the zstd body does not decompress: {error}"
                ) from None
        return future(state.forward_backward(decode_forward_backward(body)))

    def sample(body: dict[str, Any], _request: Any) -> Any:
        request_id, sequence_ids = state.sample(body)
        return {"request_id": request_id, "sample_sequence_ids": sequence_ids}

    async def finish(request: Any) -> Any:
        await state.finish_session(request.path_params["session_id"])
        return {}

    def ok(payload: dict[str, Any]) -> Callable[..., dict[str, Any]]:
        return lambda _body, _request: payload

    routes = {
        "client/config": ("json", ok(CLIENT_CONFIG)),
        "client/dynamic_config": ("json", ok({})),
        "create_session": ("json", lambda b, _r: state.create_session(b)),
        "session_heartbeat": ("json", ok({"type": "session_heartbeat"})),
        "telemetry": ("json", ok({"status": "accepted"})),
        "healthz": ("none", lambda _r: {"status": "ok"}),
        "create_model": ("json", lambda b, _r: future(state.create_model(b))),
        "get_info": ("json", lambda b, _r: state.info(b.get("model_id"))),
        "forward_backward": ("bytes", forward_backward),
        "optim_step": ("json", lambda b, _r: future(state.optim_step(b))),
        "save_weights": ("json", lambda b, _r: future(state.save_weights(b))),
        "load_weights": ("json", lambda b, _r: future(state.load_weights(b))),
        "save_weights_for_sampler": (
            "json",
            lambda b, _r: future(state.save_weights_for_sampler(b)),
        ),
        "create_sampling_session": ("json", lambda b, _r: state.create_sampling_session(b)),
        "asample": ("json", sample),
        "retrieve_future": ("json", retrieve),
    }
    table = [
        Route(f"/api/v1/{path}", handler(kind, answer), methods=["GET", "POST"])
        for path, (kind, answer) in routes.items()
    ]
    table += [
        Route("/api/v1/sessions/{session_id}/finish", handler("none", finish), methods=["POST"]),
        Route("/api/v1/samplers/{sampler:path}",
              handler("none", lambda r: state.sampler_info(r.path_params["sampler"])),
              methods=["GET"]),
    ]  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        yield
        await state.close()  # the models' backends and the sampling engine stop with the server

    return starlette.applications.Starlette(routes=table, lifespan=lifespan)


async def _read_body(request: Any, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServeError(f"the body has {declared} bytes; at most {limit} are taken", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServeError(f"the body is over {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _json_object(body: bytes) -> dict[str, Any]:
    if not body:
        return {}
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ServeError(f"the body is not JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise ServeError(f"the body is JSON {type(parsed).__name__}; expected an object")
    return parsed


def serve_command(args: Any) -> None:
    """`rollouts serve`: bind, print the address, serve until interrupted."""
    import uvicorn

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir}: no config.json (a Hugging Face model dir)")
    if args.api_key and not args.api_key.startswith("tml-"):
        raise ValueError(f"--api-key {args.api_key[:8]}...: the tinker SDK sends only keys that "
                         "start with 'tml-'")  # fmt: skip
    if args.threads:  # the process's intra-op threads, once: every model shares them
        import torch

        torch.set_num_threads(args.threads)
    state = ServerState(
        str(model_dir), args.model_name or str(model_dir), Path(args.root),
        device_type=args.device, queue_limit=args.queue_limit,
    )  # fmt: skip
    app = build_app(state, api_key=args.api_key, max_request_bytes=args.max_request_mb << 20)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as error:
        sock.close()
        raise OSError(
            f"cannot listen on {args.host}:{args.port}: {error.strerror}; pick another --port "
            "(0: any free one) or --host"
        ) from None
    host, port = sock.getsockname()[:2]
    print(f"rollouts serve: {state.model_name!r} at http://{host}:{port} (root {args.root})",
          flush=True)  # fmt: skip
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


def add_serve_arguments(parser: Any) -> None:
    parser.add_argument("--model", required=True, help="a Hugging Face model directory")
    parser.add_argument("--model-name", default="", help="the base_model name clients use")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--api-key", default="", help="refuse requests without it (tml-...)")
    parser.add_argument("--root", default="rollouts-serve", help="where saved states live")
    parser.add_argument("--queue-limit", type=int, default=64, help="calls waiting per model")
    parser.add_argument("--max-request-mb", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
