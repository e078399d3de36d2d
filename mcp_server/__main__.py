"""``python -m pipefit.mcp_server [--http PORT]``: serve pipefit's tools over stdio, or HTTP on localhost."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipefit.mcp_server", description=__doc__.splitlines()[0])
    parser.add_argument("--http", type=int, metavar="PORT", help="streamable HTTP on 127.0.0.1:PORT/mcp")
    serve(parser.parse_args(argv).http)


def serve(http_port: int | None = None) -> None:
    """Serve until the client disconnects (stdio) or the process is interrupted (HTTP)."""
    from pipefit.quiet import quiet_third_party_imports

    quiet_third_party_imports()  # before the tools import torchao and bitsandbytes
    from . import imports
    from .server import server

    imports.enable()  # the server's lifespan starts them once the transport is up

    if http_port is None:
        server.run()  # the SDK points fd 1 at stderr while it serves: stray prints cannot corrupt the wire
    else:  # localhost only: the tools read and run files on this machine
        server.run("streamable-http", host="127.0.0.1", port=http_port)


if __name__ == "__main__":
    main()
