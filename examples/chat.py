"""A terminal chat room on manydoors.

    ./run manydoors serve                  # one shell
    .venv/bin/python examples/chat.py alice  # another (and bob in a third)

Lines you type are published to the room; everything said in it is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from manydoors.client import Client


async def show(client: Client) -> None:
    async for event in client:
        if event["ev"] == "msg":
            print(f"<{event['from']}> {event['data']}")
        elif event["ev"] == "gap":
            print(f"(missed some messages in {event['channel']})")
        else:
            print(f"({event['ev']} from {event.get('from')}) {event['data']}")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("user")
    parser.add_argument("--room", default="lobby")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7000)
    args = parser.parse_args()
    async with Client(args.host, args.port, user=args.user) as client:
        await client.subscribe(args.room)
        printer = asyncio.create_task(show(client))
        while line := await asyncio.to_thread(sys.stdin.readline):
            if line.strip():
                try:
                    await client.publish(args.room, line.rstrip("\n"))
                except ConnectionError:
                    print("(reconnecting; not sent)")
        printer.cancel()


if __name__ == "__main__":
    asyncio.run(main())
