"""The Fleet gateway: Fleet API calls pass unchanged (signature headers included), everything else is refused."""

from __future__ import annotations

import httpx
from starlette.testclient import TestClient

from fedtune.server.gateway import make_gateway


def test_only_the_fleet_api_is_forwarded() -> None:
    seen: list[httpx.Request] = []

    def superlink(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"\x08\x01", headers={"content-type": "application/protobuf"})

    app = make_gateway("127.0.0.1:1", ca_file=None, transport=httpx.MockTransport(superlink))
    with TestClient(app) as client:
        reply = client.post(
            "/v1/fleet/pull-messages",
            content=b"\x01\x02",
            headers={"content-type": "application/protobuf", "flwr-public-key": "abc", "flwr-signature": "sig"},
        )
        assert reply.status_code == 200 and reply.content == b"\x08\x01"
        assert len(seen) == 1 and seen[0].url.path == "/v1/fleet/pull-messages" and seen[0].content == b"\x01\x02"
        assert seen[0].headers["flwr-public-key"] == "abc" and seen[0].headers["flwr-signature"] == "sig"
        for method, path in (
            ("POST", "/v1/control/register-node"),
            ("POST", "/v1/control/start-run"),
            ("POST", "/v1/runtime/pull-task-input"),
            ("GET", "/v1/fleet/pull-messages"),
            ("GET", "/docs"),
        ):
            assert client.request(method, path).status_code == 404, path
    assert len(seen) == 1  # nothing but the Fleet call reached the SuperLink


def test_an_unreachable_superlink_is_a_503() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with TestClient(make_gateway("127.0.0.1:1", ca_file=None, transport=httpx.MockTransport(down))) as client:
        assert client.post("/v1/fleet/send-node-heartbeat", content=b"").status_code == 503
