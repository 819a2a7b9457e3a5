"""The only door the firms have to the coordinator: Flower's Fleet API, and nothing else.

Flower 1.41's SuperLink serves its Fleet API (SuperNodes pulling messages and pushing replies),
its Control API (``flwr run``, ``flwr supernode register|unregister``) and its Runtime API (the
ServerApp) on one HTTPS port, and open-source Flower has no account authentication on the
Control API. So the coordinator binds the SuperLink to 127.0.0.1 and puts this gateway on the
interface the firms dial: it terminates TLS with the SuperLink's own certificate and forwards
``POST /v1/fleet/*`` - and only that - to the SuperLink over TLS on loopback. Every other path
(``/v1/control/*``, ``/v1/runtime/*``, ...) is answered ``404`` without reaching the SuperLink.

SuperNode authentication is untouched: the node's signed headers and body reach the SuperLink
byte for byte, and the SuperLink still refuses unregistered keys. While the SuperLink restarts,
the gateway answers ``503``, which SuperNodes retry.

Run as ``python -m fedcrm.coordinator.fleet_gateway --host H --port P --upstream 127.0.0.1:Q
--certfile server.crt --keyfile server.key --ca ca.crt`` (:func:`start_fleet_gateway` does).
"""

from __future__ import annotations

import argparse
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

FLEET_PREFIX = "/v1/fleet/"
#: Largest request body forwarded (a Fleet message carries one model update in chunks).
MAX_BODY = 256 * 1024 * 1024
READY = "fleet gateway listening"
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
})
NOT_SERVED = (
    "not served on the firms' address: only the Fleet API is (the Control API is the "
    "coordinator's, on its own host)"
)


def _forwarded(headers: Any) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers.items() if k.lower() not in _HOP_BY_HOP]


def create_app(*, upstream: str, ca_cert: str, timeout_s: float = 60.0) -> Starlette:
    """The gateway's ASGI app: forward Fleet calls to ``https://<upstream>``, refuse the rest."""
    context = ssl.create_default_context(cafile=ca_cert)
    state: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient(
            base_url=f"https://{upstream}", verify=context, timeout=timeout_s
        ) as client:
            state["client"] = client
            yield

    async def forward(request: Request) -> Response:
        path = request.url.path
        if request.method != "POST" or not path.startswith(FLEET_PREFIX):
            return PlainTextResponse(f"{path}: {NOT_SERVED}", status_code=404)
        length = int(request.headers.get("content-length") or 0)
        if length > MAX_BODY:
            return PlainTextResponse("request too large", status_code=413)
        body = await request.body()
        try:
            answer = await state["client"].post(
                path, content=body, headers=_forwarded(request.headers)
            )
        except httpx.TransportError:
            # the SuperLink is (re)starting: SuperNodes retry a 503
            return PlainTextResponse("the SuperLink is not answering", status_code=503)
        return Response(
            content=answer.content, status_code=answer.status_code,
            headers=dict(_forwarded(answer.headers)),
        )

    return Starlette(
        routes=[Route("/{path:path}", forward, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])],
        lifespan=lifespan,
    )


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="fedcrm's Fleet-only gateway to a SuperLink")
    parser.add_argument("--host", required=True, help="interface the firms dial")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the SuperLink, 127.0.0.1:PORT")
    parser.add_argument("--certfile", required=True, help="the SuperLink's server.crt")
    parser.add_argument("--keyfile", required=True, help="the SuperLink's server.key")
    parser.add_argument("--ca", required=True, help="the federation's ca.crt")
    args = parser.parse_args(argv)
    app = create_app(upstream=args.upstream, ca_cert=args.ca)
    print(f"{READY} on {args.host}:{args.port} -> Fleet API of {args.upstream}", flush=True)
    uvicorn.run(
        app, host=args.host, port=args.port, ssl_certfile=args.certfile,
        ssl_keyfile=args.keyfile, log_level="warning", access_log=False,
    )


if __name__ == "__main__":
    main()
