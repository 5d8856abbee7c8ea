"""Protocol v1: pure, Sans-I/O messages, codec, sessions and receipts (docs/protocol.md)."""

from __future__ import annotations

from protocol.amounts import *  # noqa: F403
from protocol.amounts import __all__ as _amounts
from protocol.client import *  # noqa: F403
from protocol.client import __all__ as _client
from protocol.codec import *  # noqa: F403
from protocol.codec import __all__ as _codec
from protocol.errors import *  # noqa: F403
from protocol.errors import __all__ as _errors
from protocol.messages import *  # noqa: F403
from protocol.messages import __all__ as _messages
from protocol.receipts import *  # noqa: F403
from protocol.receipts import __all__ as _receipts
from protocol.records import *  # noqa: F403
from protocol.records import __all__ as _records
from protocol.session import *  # noqa: F403
from protocol.session import __all__ as _session
from protocol.types import *  # noqa: F403
from protocol.types import __all__ as _types

__all__ = [
    *_amounts,
    *_client,
    *_records,
    *_codec,
    *_errors,
    *_messages,
    *_receipts,
    *_session,
    *_types,
]
