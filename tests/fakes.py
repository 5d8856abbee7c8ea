"""Test doubles: small pairs and subclasses of the real thing, never ``Mock`` (style.md 4.7)."""

from __future__ import annotations

from protocol.client import MinerClient
from protocol.messages import MinerToServer, ServerToMiner
from protocol.session import DEFAULT_MAX_FRAME, MinerSession
from protocol.types import JSONObject


class SessionPair:
    """A ``MinerClient`` wired to a server-side ``MinerSession`` by a synchronous fake link.

    The test plays the server: it reads what the miner sent with :meth:`to_server` and answers
    with :meth:`server_send`. Every frame crosses the link as encoded bytes, so the codec is
    exercised in both directions (h11's ``ConnectionPair``).
    """

    def __init__(
        self,
        *,
        capabilities: JSONObject | None = None,
        miner_id: str | None = "gpu-box-7",
        concurrency: int = 1,
        region: str | None = None,
        authenticated: bool = True,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self.client = MinerClient(
            capabilities={} if capabilities is None else capabilities,
            miner_id=miner_id,
            concurrency=concurrency,
            region=region,
        )
        self.max_frame = max_frame
        self.session = MinerSession(authenticated=authenticated, max_frame=max_frame)
        self.wire_to_server: list[bytes] = []
        self.wire_to_client: list[bytes] = []

    def to_server(self) -> list[MinerToServer]:
        """Deliver everything the miner queued; return what the session admitted."""
        for frame in self.client.data_to_send():
            self.wire_to_server.append(frame)
            self.session.receive_data(frame)
        return self.session.events_received()

    def server_send(self, *msgs: object) -> list[ServerToMiner]:
        """Queue ``msgs`` on the session, deliver them, return what the miner decoded."""
        for msg in msgs:
            self.session.send(msg)
        return self.to_client()

    def to_client(self) -> list[ServerToMiner]:
        """Deliver everything the session queued; return the miner's events."""
        for frame in self.session.data_to_send():
            self.wire_to_client.append(frame)
            self.client.receive_data(frame)
        return self.client.events_received()

    def reconnect(self, *, authenticated: bool = True) -> None:
        """Drop the link and give the same miner a fresh server session (a new socket)."""
        self.client.data_to_send()
        self.session = MinerSession(authenticated=authenticated, max_frame=self.max_frame)
