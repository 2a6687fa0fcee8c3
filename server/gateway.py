"""A Fleet-only front door for the SuperLink: clients can reach the Fleet API and nothing else.

Flower 1.41 serves the Fleet API (SuperNodes), the Control API (``flwr`` CLI: register SuperNodes,
start and stop runs) and the Runtime API (ServerApp) on one HTTP port, and the open-source Control
API has no account authentication. Exposed to the network, anyone who reaches that port could
register their own SuperNode key, which would defeat SuperNode authentication, or submit a run.

``fedtune server`` therefore binds the SuperLink to 127.0.0.1 and exposes only this gateway: it
terminates TLS with the server certificate, forwards ``POST /v1/fleet/...`` requests unchanged
(headers included, so SuperNode signatures are checked by the SuperLink itself) to the SuperLink
over TLS on the loopback interface, and answers everything else with 404.

Run as ``python -m fedtune.server.gateway --listen HOST:PORT --upstream 127.0.0.1:PORT ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import ssl
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

__all__ = ["make_gateway", "main", "FLEET_PREFIX"]

log = logging.getLogger("fedtune.gateway")

FLEET_PREFIX = "/v1/fleet/"
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


def make_gateway(upstream: str, *, ca_file: str | None, timeout: float = 120.0, transport: Any = None):  # type: ignore[no-untyped-def]
    """The ASGI app forwarding Fleet API calls to ``upstream`` (``HOST:PORT``; https unless ``ca_file`` is None).

    ``transport`` replaces the network (an ``httpx`` transport, for tests).
    """
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    scheme = "https" if ca_file else "http"
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else False
    client = httpx.AsyncClient(base_url=f"{scheme}://{upstream}", verify=verify, timeout=timeout, transport=transport)

    async def forward(request: Request) -> Response:
        path = request.url.path
        if request.method != "POST" or not path.startswith(FLEET_PREFIX):
            log.warning(
                "refused %s %s from %s (only the Fleet API is exposed)",
                request.method,
                path,
                request.client.host if request.client else "?",
            )
            return PlainTextResponse("not found: this port only serves the Flower Fleet API\n", status_code=404)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        try:
            upstream_response = await client.post(
                path, content=await request.body(), headers=headers, params=request.query_params
            )
        except httpx.HTTPError as err:
            log.error("SuperLink unreachable for %s: %s", path, err)
            return PlainTextResponse("SuperLink unavailable\n", status_code=503)
        out_headers = {
            k: v for k, v in upstream_response.headers.items() if k.lower() not in _HOP_BY_HOP | {"content-encoding"}
        }
        return Response(upstream_response.content, status_code=upstream_response.status_code, headers=out_headers)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    return Starlette(
        routes=[Route("/{path:path}", forward, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"])],
        lifespan=lifespan,
    )


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the gateway until terminated."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m fedtune.server.gateway", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to serve on")
    parser.add_argument("--upstream", required=True, help="the SuperLink's HOST:PORT (loopback)")
    parser.add_argument("--certfile", help="server certificate (PEM); omit with --insecure")
    parser.add_argument("--keyfile", help="server private key (PEM)")
    parser.add_argument("--ca-file", help="CA certificate to verify the SuperLink with")
    parser.add_argument("--insecure", action="store_true", help="plain HTTP on both sides (local experiments only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.insecure and not (args.certfile and args.keyfile and args.ca_file):
        parser.error("--certfile, --keyfile and --ca-file are required unless --insecure")
    host, port = _split(args.listen)
    app = make_gateway(args.upstream, ca_file=None if args.insecure else args.ca_file)
    log.info(
        "Fleet gateway on %s://%s:%d -> SuperLink %s", "http" if args.insecure else "https", host, port, args.upstream
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        ssl_certfile=None if args.insecure else args.certfile,
        ssl_keyfile=None if args.insecure else args.keyfile,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
