"""gRPC plumbing: a server bootstrap (health, reflection, drain) and a client
that resolves endpoints through discovery, with deadlines and typed errors."""

from commutator.common.grpc.client import EndpointClient, error_from_status, map_rpc_error
from commutator.common.grpc.server import GrpcConfig, GrpcServer, abort_with

__all__ = ["EndpointClient", "GrpcConfig", "GrpcServer", "abort_with", "error_from_status", "map_rpc_error"]
