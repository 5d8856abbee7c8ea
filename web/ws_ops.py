"""``/v1/admin/ws``: the ops stream (docs/protocol.md "Ops socket", docs/ops.md).

An admin credential, at the handshake or as the first ``auth`` frame (browsers), gets a
``snapshot``, the recent job events, then ``ops.delta`` frames (at most every 250 ms) and live
``job.event`` frames. The socket takes no requests: actions go through the admin REST routes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from protocol.codec import encode, message_type
from protocol.messages import Auth, ClientHello
from protocol.session import ClientSession
from protocol.types import PROTOCOL_VERSION, ErrorCode
from web.auth import Role
from web.connection import Connection

if TYPE_CHECKING:
    from starlette.websockets import WebSocket


__all__ = ["OpsConnection", "ops_endpoint"]


class OpsConnection(Connection):
    role = Role.ADMIN
    # A page with 1,000 miners and a busy log: more room before it counts as too slow.
    outbox_limits: ClassVar[dict[str, int]] = {"soft_limit": 1024, "hard_limit": 16384}

    def make_session(self, *, authenticated: bool) -> ClientSession:
        # The client socket's framing and auth rules. There is no hello exchange here: once
        # authenticated, the session is opened with an implicit hello (see ``_open``).
        session = ClientSession(
            authenticated=authenticated, max_frame=self.core.settings.max_frame_bytes
        )
        if authenticated:
            _open(session)
        return session

    def on_authenticated(self) -> None:
        # A wallet session's socket (ADMIN_WALLET_ADDRESSES) ends with the session. It takes no
        # messages, so the check at each message never comes: the feed checks before it sends.
        assert self.principal is not None
        wallet = self.principal.user_id is not None
        self.core.ops.add(self.outbox, signed_in=self.signed_in if wallet else None)

    async def handle(self, msg: Any, session: ClientSession) -> None:
        match msg:
            case Auth():
                self.authenticate(msg.token, session, msg.id)
                if self.principal is not None:
                    _open(session)
            case _:
                self.error(
                    ErrorCode.INVALID,
                    "the ops socket takes no requests; use the admin REST routes",
                    request_id=getattr(msg, "id", None),
                    ref=message_type(msg),
                )

    def on_closed(self) -> None:
        self.core.ops.discard(self.outbox)


def _open(session: ClientSession) -> None:
    """Feed the implicit hello, so any later frame is handled (and refused) as a request."""
    session.receive_data(encode(ClientHello(protocol=PROTOCOL_VERSION)))
    session.events_received()


async def ops_endpoint(websocket: WebSocket) -> None:
    await OpsConnection(websocket.app.state.core, websocket).run()
