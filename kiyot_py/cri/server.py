"""The gRPC server on the unix socket the kubelet is pointed at."""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from kiyot_py.cri.image_service import ImageService
from kiyot_py.cri.runtime_service import RuntimeService
from kiyot_py.gen.runtime.v1 import api_pb2_grpc
from kiyot_py.pods.runtime import PodRuntime
from kiyot_py.streaming.server import StreamingServer

MAX_MESSAGE = 16 * 1024 * 1024  # the kubelet's own limit


async def start_server(socket: Path, runtime: PodRuntime, state_dir: Path,
                       streaming: StreamingServer) -> grpc.aio.Server:
    socket.parent.mkdir(parents=True, exist_ok=True)
    if socket.exists() or socket.is_symlink():  # noqa: ASYNC240 - local stat, once at startup
        socket.unlink()  # noqa: ASYNC240 - a stale socket from a process that died; local, once at startup
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
    ])
    api_pb2_grpc.add_RuntimeServiceServicer_to_server(RuntimeService(runtime, streaming), server)
    api_pb2_grpc.add_ImageServiceServicer_to_server(ImageService(runtime, str(state_dir)), server)
    server.add_insecure_port(f"unix://{socket}")
    await server.start()
    os.chmod(socket, 0o660)
    return server
