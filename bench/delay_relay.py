#!/usr/bin/env python3
"""A TCP relay that adds a fixed delay each way: distance between a client (or shardgate)
and Kafka on one machine, for benchmarks (bench/prefetch). Order is kept per direction;
bytes are passed on as they come, each chunk released `delay` after it arrived.

    delay_relay.py --delay-ms 5 LISTEN_PORT:TARGET_PORT [...]
"""
import argparse
import asyncio
import time


async def pump(reader, writer, delay):
    queue = asyncio.Queue()

    async def release():
        while True:
            at, data = await queue.get()
            if data is None:
                break
            wait = at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(release())
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            await queue.put((time.monotonic() + delay, data))
    except (ConnectionError, OSError):
        pass
    await queue.put((0, None))
    try:
        await sender
    except (ConnectionError, OSError):
        pass


async def serve(listen, target, delay):
    async def handle(c_reader, c_writer):
        try:
            t_reader, t_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            c_writer.close()
            return
        for s in (c_writer, t_writer):
            sock = s.get_extra_info("socket")
            if sock is not None:
                import socket

                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(pump(c_reader, t_writer, delay), pump(t_reader, c_writer, delay))

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--delay-ms", type=float, default=5.0)
    ap.add_argument("pairs", nargs="+", help="LISTEN_PORT:TARGET_PORT")
    args = ap.parse_args()
    delay = args.delay_ms / 1000.0

    async def run():
        tasks = []
        for p in args.pairs:
            listen, target = (int(x) for x in p.split(":"))
            tasks.append(asyncio.create_task(serve(listen, target, delay)))
        print("relay ready", flush=True)
        await asyncio.gather(*tasks)

    asyncio.run(run())


if __name__ == "__main__":
    main()
