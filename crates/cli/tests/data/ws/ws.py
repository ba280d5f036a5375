"""A WebSocket echo server and client (the `websockets` package), for the proxy's Upgrade path.

    ws.py serve              listens on $PORT (or a free port), prints "port N", then echoes
                             every message on every connection
    ws.py relay              listens on $PORT; each connection is relayed, message by message, to
                             ws://$ECHO_ADDR (the app's sidecar port for the echo service)
    ws.py client URL N       sends N messages over one connection, checks each echo, prints "echoed N"
    ws.py tcpecho            a plain TCP echo server on $PORT (or a free port), prints "port N"
                             (the destination of CONNECT tunnels)
"""
import asyncio
import os
import sys

import websockets


async def serve():
    async def echo(ws):
        async for message in ws:
            await ws.send(message)

    async with websockets.serve(echo, "127.0.0.1", int(os.environ.get("PORT", "0"))) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"port {port}", flush=True)
        await asyncio.Future()


async def relay():
    upstream_url = "ws://" + os.environ["ECHO_ADDR"] + "/echo"

    async def pipe(src, dst):
        async for message in src:
            await dst.send(message)

    async def handle(ws):
        async with websockets.connect(upstream_url, open_timeout=10) as up:
            await asyncio.gather(pipe(ws, up), pipe(up, ws))

    async with websockets.serve(handle, "127.0.0.1", int(os.environ["PORT"])) as server:
        print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.Future()


async def client(url, n):
    async with websockets.connect(url, open_timeout=10, close_timeout=5) as ws:
        for i in range(n):
            message = f"message {i} " + "x" * (i % 200)
            await ws.send(message)
            echoed = await asyncio.wait_for(ws.recv(), 10)
            if echoed != message:
                raise SystemExit(f"message {i}: sent {message!r}, got {echoed!r}")
    print(f"echoed {n}", flush=True)


async def tcpecho():
    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", int(os.environ.get("PORT", "0")))
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if sys.argv[1] == "tcpecho":
        asyncio.run(tcpecho())
    elif sys.argv[1] == "serve":
        asyncio.run(serve())
    elif sys.argv[1] == "relay":
        asyncio.run(relay())
    else:
        asyncio.run(client(sys.argv[2], int(sys.argv[3])))
