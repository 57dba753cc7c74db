"""What every serving process (a server, a router) sets up the same way: its gRPC options, the services it
registers beside its front ends (health, reflection), its port and its metrics endpoint."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import CollectorRegistry, start_http_server

from embserve.oip import wire as oip
from embserve.v1 import embserve_pb2
from embserve.v1.wire import SERVICE_NAME

from .config import ServerConfig
from .connections import grpc_options as connection_options
from .security import server_credentials
from .startup import StartupError

__all__ = ["add_services", "bind", "grpc_options", "start_metrics"]


def grpc_options(config: ServerConfig, *, reuse_port: bool) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", config.limits.max_message_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        *connection_options(config.connections),
    ]


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """The descriptors reflection serves: the OIP ones live in a pool of their own (see embserve.oip.wire), the
    others in protobuf's default pool, so reflection gets a pool with all of them."""
    pool = descriptor_pool.DescriptorPool()
    for module in (embserve_pb2, health_pb2, reflection_pb2):
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb))
    file = descriptor_pb2.FileDescriptorProto()
    oip.POOL.FindFileByName(oip.PROTO_FILE).CopyToProto(file)
    pool.Add(file)
    return pool


def add_services(
    server: grpc.aio.Server,
    embserve_handlers: dict[str, grpc.RpcMethodHandler],
    oip_handlers: dict[str, grpc.RpcMethodHandler],
    health: health_pb2_grpc.HealthServicer,
) -> None:
    """The embserve.v1 and Open Inference Protocol handlers, the health service and reflection over all four."""
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(SERVICE_NAME, embserve_handlers),
            grpc.method_handlers_generic_handler(oip.SERVICE_NAME, oip_handlers),
        )
    )
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            oip.SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
        pool=_reflection_pool(),
    )


def bind(server: grpc.aio.Server, config: ServerConfig) -> int:
    """Binds `config.host:config.port` (TLS when configured); the port bound, or `StartupError`."""
    address = f"{config.host}:{config.port}"
    try:
        if config.tls is not None:
            port = server.add_secure_port(address, server_credentials(config.tls))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise StartupError(
            f"gRPC port {config.port} on {config.host} could not be bound (in use by another process, "
            "or not an address of this host): choose another with --port"
        )
    return int(port)


def start_metrics(config: ServerConfig, registry: CollectorRegistry) -> tuple[Any, int | None]:
    """The Prometheus endpoint on `config.metrics_port` and the port it bound ((None, None) without one), or
    `StartupError`. Bound before the gRPC server starts, so that a port in use fails the start cleanly."""
    if config.metrics_port is None:
        return None, None
    try:
        httpd, _ = start_http_server(config.metrics_port, addr=config.host, registry=registry)
    except OSError as err:
        raise StartupError(
            f"metrics port {config.metrics_port} on {config.host} could not be bound ({err.strerror}): choose "
            "another with --metrics-port, or --no-metrics"
        ) from None
    return httpd, int(httpd.server_port)
