"""Submit a job over the client socket, print its live event stream and its receipt.

    python examples/ws_client.py --key CLIENT_KEY --prompt "hello world"

On a dropped connection it reconnects and re-subscribes with ``after`` = the last ``seq`` it
saw, so no event is missed or shown twice; an event whose ``seq`` leaves a gap (live events
that came before a replay it asked for, progress dropped under backpressure) waits for a
replay too. The submit carries an idempotency key, so a submit whose acknowledgement was lost
with the connection is not run twice. Should the coordinator come back without the job's last
events (its ack of the re-subscribe says where its log ends: ``behind``), it says so and shows
the job's events from there. Give ``--url`` more than once (a coordinator and its standby) and
each reconnect tries the next one. A submit or re-subscribe answered ``unavailable`` (the
coordinator could not read its database) is tried again on a new connection, waiting longer
after each attempt that brings nothing new.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import uuid
from pathlib import Path

import anyio
from websockets.asyncio.client import ClientConnection, connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from typing import TYPE_CHECKING

from examples.connection import (
    LOST,
    Refused,
    check_utf8,
    describe,
    no_welcome,
    refusal,
    url_refusal,
)
from protocol.codec import decode_server_to_client, encode
from protocol.errors import RemoteProtocolError, UnknownMessageType
from protocol.messages import (
    Ack,
    ClientHello,
    ClientWelcome,
    Error,
    JobEvent,
    JobSubmit,
    Subscribe,
)
from protocol.receipts import verify_receipt
from protocol.types import ErrorCode

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = ["follow_job", "main"]

TERMINAL = {"completed", "failed", "canceled", "expired"}


async def follow_job(
    url: str | Sequence[str],
    key: str,
    submit: JobSubmit,
    *,
    out: Callable[[str], None] = print,
    retry_after: float = 0.5,
    welcome_timeout: float = 10.0,
) -> list[JobEvent]:
    """Submit, then collect every event of the job until a terminal one; returns them.

    ``url`` may list several coordinators (one and its standby): each reconnect tries the next,
    ``retry_after`` seconds after a lost connection or an ``unavailable`` answer, twice as long
    after each further attempt that brought nothing new (``MAX_RETRY_AFTER`` at most).
    Raises ``Refused`` when the coordinator refuses in a way a reconnect would not change (an
    unknown key, a URL that is not the client socket, a submit it answers with an error, a job
    it no longer has), or when a server takes the socket but sends no ``welcome`` within
    ``welcome_timeout`` seconds of the hello (not the coordinator's client socket, or one that
    cannot serve).
    """
    urls = [url] if isinstance(url, str) else list(url)
    if submit.idempotency_key is None:
        submit = dataclasses.replace(submit, idempotency_key=f"ws-client-{uuid.uuid4()}")
    job = _Followed(submit, out)
    attempt = 0
    delay = retry_after
    while True:
        target = urls[attempt % len(urls)]
        attempt += 1
        progress = (job.job_id, len(job.events))
        try:
            # A completed event carries the result and the receipt (payload and result once
            # more): it may be larger than the frames the coordinator takes (docs/protocol.md).
            async with connect(target, additional_headers={"X-Api-Key": key}, max_size=None) as ws:
                # Armed until the welcome: a server that takes the socket and answers pings but
                # never welcomes (another service, an echo server) kept this waiting for ever.
                with anyio.move_on_after(welcome_timeout) as welcome:
                    if await job.follow(ws, welcome):
                        return job.events
                if welcome.cancelled_caught:
                    raise no_welcome(target, welcome_timeout, "client socket (…/v1/jobs/ws)")
                if ws.close_code is not None:  # closed by the coordinator, cleanly (1000, 1001)
                    why = f" ({ws.close_reason})" if ws.close_reason else ""
                    out(f"connection to {target} lost (closed {ws.close_code}{why}); reconnecting")
        except LOST as exc:
            if (refused := refusal(exc, target)) is not None:
                raise refused from exc
            out(f"connection to {target} lost ({describe(exc)}); reconnecting")
        except RemoteProtocolError as exc:  # not a coordinator's frame: no use trying again
            why = "is it the coordinator's client socket (…/v1/jobs/ws)?"
            raise Refused(f"{target} sent a frame this client cannot read ({exc}): {why}") from exc
        # Back off while attempts bring nothing (a store that stays unreadable, a coordinator
        # still starting): each waits twice as long as the one before, up to ``MAX_RETRY_AFTER``.
        if (job.job_id, len(job.events)) != progress:
            delay = retry_after  # this attempt got somewhere: start over
        await anyio.sleep(delay)
        delay = min(delay * 2, max(retry_after, MAX_RETRY_AFTER))


RESUBSCRIBE = "resub"
MAX_RETRY_AFTER = 15.0  # seconds between two attempts at most (see ``follow_job``)


class _Followed:
    """One job followed across connections: the events shown, in order, each once."""

    def __init__(self, submit: JobSubmit, out: Callable[[str], None]) -> None:
        self.submit = submit
        self.out = out
        self.job_id: str | None = None
        self.events: list[JobEvent] = []
        self.replaying = False  # a subscribe with ``after`` is on its way

    async def follow(self, ws: ClientConnection, welcome: anyio.CancelScope) -> bool:
        """Follow on a new connection; True once the job's terminal event is shown. ``welcome``
        (the wait for the coordinator's welcome) is disarmed when the welcome arrives."""
        await ws.send(encode(ClientHello(protocol=1)).decode())
        if self.job_id is None:  # not acknowledged yet: the key makes a resubmit safe
            await ws.send(encode(self.submit).decode())
        else:
            await self._resubscribe(ws, self.job_id)
        async for raw in ws:
            try:
                msg = decode_server_to_client(raw)
            except UnknownMessageType:
                continue  # a newer coordinator's message this client has no use for
            if isinstance(msg, ClientWelcome):
                welcome.deadline = math.inf
            elif isinstance(msg, Ack) and msg.id == self.submit.id:
                job = msg.fields["job"]
                self.job_id = str(job["job_id"])
                self.out(f"submitted {self.job_id}")
                if job.get("servable") is False:  # it said nothing, and waited till it expired
                    self.out(
                        "no miner the coordinator knows can serve its constraints "
                        f"{json.dumps(job.get('constraints'))}: it waits for one until "
                        f"{job.get('expires_at')}"
                    )
                if msg.fields.get("duplicate"):
                    # Stored by an earlier attempt: replay what that connection lost. The job's
                    # live events follow this ack, before that replay.
                    await self._resubscribe(ws, self.job_id)
            elif isinstance(msg, Ack) and msg.id == RESUBSCRIBE:
                self.replaying = False  # its replay follows in order, then live events
                self._rewind(msg.fields.get("behind"))
            elif isinstance(msg, JobEvent) and msg.job_id == self.job_id:
                if await self._event(ws, msg):
                    return True
            elif isinstance(msg, Error) and not self._error(msg):
                return False  # submit again on a new connection
        return False

    def _error(self, msg: Error) -> bool:
        """Show an error; False: submit or subscribe again on a new connection; ``Refused`` when
        it ends the job's story."""
        self.out(f"error {msg.code}: {msg.message}")
        if msg.id == self.submit.id and self.job_id is None:
            if msg.code == ErrorCode.UNAVAILABLE:
                return False  # the store could not be read
            raise Refused(f"job.submit refused: {msg.code}: {msg.message}")
        if msg.code == ErrorCode.NOT_FOUND and msg.ref == self.job_id:
            raise Refused(f"job {self.job_id} is gone: {msg.message}")
        if msg.id == RESUBSCRIBE:
            # The subscribe changed nothing: this socket would bring no event of the job (or
            # none that fills the gap). ``unavailable``: the store could not be read; retry.
            if msg.code == ErrorCode.UNAVAILABLE:
                return False
            raise Refused(f"subscribe to job {self.job_id} refused: {msg.code}: {msg.message}")
        return True

    def _rewind(self, behind: object) -> None:
        """The coordinator's log of the job ends before events shown here (``behind``: it lost
        its last commits): those are gone, and the events that follow are numbered from there."""
        seq = behind.get(self.job_id) if isinstance(behind, dict) else None
        last = self.events[-1].seq if self.events else 0
        if isinstance(seq, int) and seq < last:
            self.out(
                f"job {self.job_id}: the coordinator lost events {seq + 1}-{last} shown above; "
                f"following it from {seq}"
            )
            self.events = [e for e in self.events if e.seq <= seq]

    async def _event(self, ws: ClientConnection, msg: JobEvent) -> bool:
        last = self.events[-1].seq if self.events else 0
        if msg.seq <= last:
            return False  # seen already: a live copy, or replayed again
        if msg.seq > last + 1:
            # Those before it are still to come (a replay asked for) or were dropped (progress,
            # under backpressure): a replay brings them, and this one again.
            if not self.replaying:
                await self._resubscribe(ws, msg.job_id)
            return False
        self.events.append(msg)
        extra = {k: v for k, v in msg.data.items() if k != "receipt"}
        self.out(f"#{msg.seq} {msg.event:<9} {msg.state:<9} {json.dumps(extra)}")
        return msg.event in TERMINAL

    async def _resubscribe(self, ws: ClientConnection, job_id: str) -> None:
        last = self.events[-1].seq if self.events else 0
        subscribe = Subscribe(id=RESUBSCRIBE, job_ids=(job_id,), after={job_id: last})
        await ws.send(encode(subscribe).decode())
        self.replaying = True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="submit a job and follow it live")
    p.add_argument(
        "--url",
        action="append",
        help="the client socket's URL (default ws://127.0.0.1:8000/v1/jobs/ws); repeat it "
        "for a standby: each reconnect tries the next",
    )
    p.add_argument("--key", required=True, help="a client API key")
    p.add_argument("--prompt", default="hello", help="the job's prompt (default: hello)")
    p.add_argument("--model", help="the job's model (in the payload)")
    p.add_argument("--gpu", help="run only on a miner with this GPU (its exact name)")
    p.add_argument("--region", help="run only on a miner of this region")
    p.add_argument(
        "--ttl", type=int, help="seconds the job may wait and run (default: the coordinator's)"
    )
    a = p.parse_args(argv)
    check_utf8(p, a, "url", "key", "prompt", "model", "gpu", "region")
    payload: dict[str, object] = {"type": "inference", "prompt": a.prompt}
    if a.model:
        payload["model"] = a.model
    constraints = {k: v for k, v in (("gpu", a.gpu), ("region", a.region)) if v}
    submit = JobSubmit(id="submit", payload=payload, constraints=constraints, ttl_seconds=a.ttl)
    urls = a.url or ["ws://127.0.0.1:8000/v1/jobs/ws"]
    for url in urls:
        if (refused := url_refusal(url)) is not None:
            print(refused, file=sys.stderr)
            return 1
    try:
        events = anyio.run(follow_job, urls, a.key, submit)
    except Refused as exc:
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    receipt = events[-1].data.get("receipt")
    if receipt:
        reasons = verify_receipt(receipt)
        print(json.dumps(receipt, indent=2))
        print("receipt signature:", "valid" if not reasons else "; ".join(reasons))
    return 0 if events[-1].event == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
