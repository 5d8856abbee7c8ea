"""Submit a job over the client socket, print its live event stream and its receipt.

    python examples/ws_client.py --key CLIENT_KEY --prompt "hello world"

On a dropped connection it reconnects and re-subscribes with ``after`` = the last ``seq`` it
saw, so no event is missed or shown twice.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import anyio
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from typing import TYPE_CHECKING

from protocol.codec import decode_server_to_client, encode
from protocol.messages import (
    Ack,
    ClientHello,
    Error,
    JobEvent,
    JobSubmit,
    Subscribe,
)
from protocol.receipts import verify_receipt

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["follow_job", "main"]

TERMINAL = {"completed", "failed", "canceled", "expired"}


async def follow_job(
    url: str, key: str, submit: JobSubmit, *, out: Callable[[str], None] = print
) -> list[JobEvent]:
    """Submit, then collect every event of the job until a terminal one; returns them."""
    events: list[JobEvent] = []
    job_id: str | None = None
    while True:
        try:
            async with connect(url, additional_headers={"X-Api-Key": key}) as ws:
                await ws.send(encode(ClientHello(protocol=1)).decode())
                if job_id is None:
                    await ws.send(encode(submit).decode())
                else:
                    last = events[-1].seq if events else 0
                    await ws.send(
                        encode(
                            Subscribe(id="resub", job_ids=(job_id,), after={job_id: last})
                        ).decode()
                    )
                async for raw in ws:
                    msg = decode_server_to_client(raw)
                    if isinstance(msg, Ack) and msg.id == submit.id:
                        job_id = str(msg.fields["job"]["job_id"])
                        out(f"submitted {job_id}")
                    elif isinstance(msg, JobEvent) and msg.job_id == job_id:
                        events.append(msg)
                        extra = {k: v for k, v in msg.data.items() if k != "receipt"}
                        out(f"#{msg.seq} {msg.event:<9} {msg.state:<9} {json.dumps(extra)}")
                        if msg.event in TERMINAL:
                            return events
                    elif isinstance(msg, Error):
                        out(f"error {msg.code}: {msg.message}")
        except (ConnectionClosed, OSError) as exc:
            out(f"connection lost ({exc!r}); reconnecting")
            await anyio.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="submit a job and follow it live")
    p.add_argument("--url", default="ws://127.0.0.1:8000/v1/jobs/ws")
    p.add_argument("--key", required=True, help="a client API key")
    p.add_argument("--prompt", default="hello")
    p.add_argument("--model")
    p.add_argument("--gpu")
    p.add_argument("--region")
    p.add_argument("--ttl", type=int)
    a = p.parse_args(argv)
    payload: dict[str, object] = {"type": "inference", "prompt": a.prompt}
    if a.model:
        payload["model"] = a.model
    constraints = {k: v for k, v in (("gpu", a.gpu), ("region", a.region)) if v}
    submit = JobSubmit(id="submit", payload=payload, constraints=constraints, ttl_seconds=a.ttl)
    events = anyio.run(follow_job, a.url, a.key, submit)
    receipt = events[-1].data.get("receipt")
    if receipt:
        reasons = verify_receipt(receipt)
        print(json.dumps(receipt, indent=2))
        print("receipt signature:", "valid" if not reasons else "; ".join(reasons))
    return 0 if events[-1].event == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
