"""Client-side Sans-I/O mirror of a miner session; ``examples/`` and the tests drive it.

Rule: like the server session, no I/O and no clock. Call a command method (``hello``,
``accept``, ``result`` ...), then write ``data_to_send()``; feed every frame received to
``receive_data`` and handle ``events_received()``.

A frame of a type this client does not know is skipped and counted (``unknown_types``): a newer
coordinator may send messages an older miner has no use for, as it ignores unknown fields.
Any other bad frame raises ``RemoteProtocolError`` with the close code to send.
"""

from __future__ import annotations

from itertools import count
from typing import TYPE_CHECKING

from protocol.codec import decode_server_to_miner, encode
from protocol.errors import InvalidState, UnknownMessageType
from protocol.messages import (
    Ack,
    Error,
    Heartbeat,
    Hello,
    JobAccept,
    JobAssign,
    JobCancel,
    JobFail,
    JobProgress,
    JobReject,
    JobResult,
    ServerToMiner,
    Status,
    Welcome,
)
from protocol.receipts import key_id_for, sign_result
from protocol.types import PROTOCOL_VERSION, JSONObject

if TYPE_CHECKING:
    from protocol.receipts import SigningKey

__all__ = ["MinerClient"]


class MinerClient:
    """Tracks the handshake, the session id for resume, and the jobs this miner holds."""

    def __init__(
        self,
        *,
        capabilities: JSONObject,
        miner_id: str | None = None,
        concurrency: int = 1,
        region: str | None = None,
        result_key: SigningKey | None = None,
    ) -> None:
        """``result_key``: when given, the hello registers its public key and every result is
        co-signed with it (the receipt then carries the miner's attestation)."""
        self.capabilities = capabilities
        self.result_key = result_key
        self.miner_id = miner_id
        self.concurrency = concurrency
        self.region = region
        self.session_id: str | None = None
        self.welcome: Welcome | None = None
        self.jobs: dict[str, JobAssign] = {}
        self._ids = count(1)
        self._out: list[bytes] = []
        self._events: list[ServerToMiner] = []
        self.unknown_types = 0  # frames skipped because their type is not known here

    def hello(self, *, resume: bool = True) -> None:
        """Queue the hello; with ``resume`` and a known session id, ask to resume it."""
        self.welcome = None
        self._send(
            Hello(
                protocol=PROTOCOL_VERSION,
                miner_id=self.miner_id,
                capabilities=self.capabilities,
                concurrency=self.concurrency,
                region=self.region,
                resume_session=self.session_id if resume else None,
                result_key=None
                if self.result_key is None
                else key_id_for(self.result_key.public_key()),
            )
        )

    def receive_data(self, data: str | bytes) -> None:
        try:
            msg = decode_server_to_miner(data)
        except UnknownMessageType:
            self.unknown_types += 1
            return
        match msg:
            case Welcome():
                self.welcome = msg
                self.session_id = msg.session_id
                self.miner_id = msg.miner_id
                kept = set(msg.resumed)
                self.jobs = {j: a for j, a in self.jobs.items() if j in kept}
            case JobAssign():
                self.jobs[msg.job_id] = msg
            case JobCancel():
                self.jobs.pop(msg.job_id, None)
            case Ack() | Error():
                pass
        self._events.append(msg)

    def events_received(self) -> list[ServerToMiner]:
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def next_id(self) -> str:
        return f"m{next(self._ids)}"

    # -- commands ---------------------------------------------------------------------------

    def accept(self, job_id: str) -> None:
        self._send(JobAccept(job_id=job_id, attempt=self._require(job_id)))

    def reject(self, job_id: str, reason: str = "") -> None:
        attempt = self._require(job_id)
        self.jobs.pop(job_id)
        self._send(JobReject(job_id=job_id, reason=reason, attempt=attempt))

    def progress(
        self,
        job_id: str,
        *,
        progress: float | None = None,
        message: str | None = None,
        output: str | None = None,
    ) -> None:
        self._send(
            JobProgress(
                job_id=job_id,
                progress=progress,
                message=message,
                output=output,
                attempt=self._attempt(job_id),
            )
        )

    def result(self, job_id: str, result: JSONObject, metrics: JSONObject | None = None) -> str:
        """Queue a result; returns the request id whose ``ack`` carries the receipt."""
        request_id = self.next_id()
        attempt = self._attempt(job_id)
        self.jobs.pop(job_id, None)
        sig = None if self.result_key is None else sign_result(self.result_key, job_id, result)
        self._send(
            JobResult(
                job_id=job_id,
                result=result,
                metrics=metrics or {},
                id=request_id,
                attempt=attempt,
                result_sig=sig,
            )
        )
        return request_id

    def fail(self, job_id: str, code: str, message: str, *, retryable: bool = False) -> None:
        attempt = self._attempt(job_id)
        self.jobs.pop(job_id, None)
        self._send(
            JobFail(
                job_id=job_id,
                error_code=code,
                error_message=message,
                retryable=retryable,
                attempt=attempt,
            )
        )

    def status(self, *, concurrency: int | None = None, draining: bool | None = None) -> None:
        if concurrency is not None:
            self.concurrency = concurrency
        self._send(Status(concurrency=concurrency, draining=draining))

    def heartbeat(self, metrics: JSONObject | None = None) -> None:
        self._send(Heartbeat(metrics=metrics))

    def _require(self, job_id: str) -> int:
        assign = self.jobs.get(job_id)
        if assign is None:
            raise InvalidState(f"job {job_id} is not held by this miner")
        return assign.attempt

    def _attempt(self, job_id: str) -> int | None:
        """The fencing token to send with a job message (None once the job was dropped)."""
        assign = self.jobs.get(job_id)
        return None if assign is None else assign.attempt

    def _send(self, msg: object) -> None:
        self._out.append(encode(msg))
