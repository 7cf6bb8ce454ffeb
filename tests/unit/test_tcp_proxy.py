"""The outage proxy itself, against an echo server of the test's own: if it did not really
cut or stall, the outage tests that rely on it would pass for the wrong reason."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from tests.tcp_proxy import TcpProxy, ThreadedTcpProxy


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def _roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), 5)
    finally:
        writer.close()


def test_forwards_cuts_refuses_and_restores() -> None:
    async def main() -> None:
        echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
        echo_port = echo.sockets[0].getsockname()[1]
        async with echo, TcpProxy("127.0.0.1", echo_port) as proxy:
            assert proxy.port not in (0, echo_port)
            assert await _roundtrip(proxy.port, b"hello") == b"hello"

            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            await proxy.cut()
            # The open connection is dropped at once ...
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(1), 5) == b""
            writer.close()
            # ... and new ones are refused.
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", proxy.port)

            port = proxy.port
            await proxy.restore()
            assert proxy.port == port
            assert await _roundtrip(proxy.port, b"again") == b"again"
            assert proxy.connections_total == 3

    asyncio.run(main())


def test_stall_holds_data_until_restore() -> None:
    async def main() -> None:
        echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
        async with echo, TcpProxy("127.0.0.1", echo.sockets[0].getsockname()[1]) as proxy:
            await proxy.stall()
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"held")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.readexactly(4), 0.3)
            await proxy.restore()
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"held"
            writer.close()

    asyncio.run(main())


def test_threaded_proxy_serves_blocking_clients() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)
        with ThreadedTcpProxy("127.0.0.1", listener.getsockname()[1]) as proxy:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
                server_side, _ = listener.accept()
                with server_side:
                    client.sendall(b"ping")
                    assert server_side.recv(4) == b"ping"
                    proxy.cut()
                    with contextlib.suppress(ConnectionResetError):
                        assert client.recv(4) == b""
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            proxy.restore()
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
                server_side, _ = listener.accept()
                with server_side:
                    client.sendall(b"pong")
                    assert server_side.recv(4) == b"pong"
