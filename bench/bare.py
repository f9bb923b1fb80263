"""The benchmark's baseline for 1-message requests: a bare aiohttp handler that reads the body
and answers 202, nothing else. Prints its port, then serves until killed.

    python bench/bare.py [--uvloop]

With --uvloop it runs on uvloop's loop, as `ingest serve` does by default: the figure that
shows how much of ingest's ratio to the plain bare handler is the loop's.
"""

from __future__ import annotations

import socket
import sys

from aiohttp import web


async def accept(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=202, text='{"accepted": 1}', content_type="application/json")


def main() -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)  # before the port is printed: connections wait in the backlog, none refused
    print(sock.getsockname()[1], flush=True)
    app = web.Application()
    app.router.add_post("/messages", accept)
    loop = None
    if "--uvloop" in sys.argv[1:]:
        import uvloop

        loop = uvloop.new_event_loop()
    web.run_app(app, sock=sock, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
