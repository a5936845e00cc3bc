"""The control plane's gRPC wiring, signed both ways with the cluster secret.

Requests and replies travel as raw bytes through generic handlers (not the generated stubs), so the signature covers
exactly the bytes that crossed the wire: the server checks a call's signature before it parses the body, and signs
its serialized reply (in trailing metadata, bound to the call's nonce); the client checks that before it parses the
reply. An unsigned or badly signed call gets UNAUTHENTICATED with no detail; a call the server cannot parse gets
INVALID_ARGUMENT. The service and method names are those of `kv_transfer.proto`.
"""

import logging
from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError, Message

from . import kv_transfer_pb2 as pb
from .auth import CallVerifier, ClusterSecret, reply_is_signed, sign_call, sign_reply

log = logging.getLogger(__name__)

SERVICE = "glmserve.kvtransfer.KVTransfer"
METHODS: dict[str, tuple[type[Message], type[Message]]] = {
    "Handshake": (pb.HandshakeRequest, pb.HandshakeReply),
    "OpenTransfer": (pb.OpenTransferRequest, pb.OpenTransferReply),
    "RenewLease": (pb.RenewLeaseRequest, pb.RenewLeaseReply),
    "Complete": (pb.CompleteRequest, pb.TransferStatus),
    "Abort": (pb.AbortRequest, pb.TransferStatus),
}
MAX_MESSAGE_BYTES = 16 << 20  # the largest call is a completion with one token's hidden state (GLM-5: 24 KiB)


class Unauthenticated(ConnectionError):
    """The receiver did not prove the cluster secret (or refused ours)."""


def server_handler(secret: ClusterSecret, handlers: dict[str, Callable[[Message], Message]]):
    """A generic handler serving `handlers` (method name -> request -> reply) behind the signature check."""
    verifier = CallVerifier(secret)

    def wrap(name: str, handle: Callable[[Message], Message]):
        request_type = METHODS[name][0]

        def serve(raw: bytes, context: grpc.ServicerContext) -> bytes:
            nonce = verifier.verify(name, raw, context.invocation_metadata())
            if nonce is None:
                log.debug("refused an unauthenticated %s call from %s", name, context.peer())
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "unauthenticated")
            try:
                request = request_type.FromString(raw)
            except DecodeError:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed request")
            body = handle(request).SerializeToString()
            context.set_trailing_metadata(sign_reply(secret, name, nonce, body))
            return body

        return grpc.unary_unary_rpc_method_handler(serve)

    return grpc.method_handlers_generic_handler(SERVICE, {name: wrap(name, h) for name, h in handlers.items()})


class ControlClient:
    """Signed calls to one receiver."""

    def __init__(self, address: str, secret: ClusterSecret, timeout_s: float):
        self.secret = secret
        self.timeout_s = timeout_s
        self.channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self._calls = {name: self.channel.unary_unary(f"/{SERVICE}/{name}") for name in METHODS}

    def call(self, name: str, request: Message) -> Message:
        """Raises grpc.RpcError (the call failed) or Unauthenticated (the reply is not the receiver's)."""
        body = request.SerializeToString()
        metadata, nonce = sign_call(self.secret, name, body)
        raw, call = self._calls[name].with_call(body, metadata=metadata, timeout=self.timeout_s)
        if not reply_is_signed(self.secret, name, nonce, raw, call.trailing_metadata()):
            raise Unauthenticated(f"the KV receiver's {name} reply is not signed with the cluster secret")
        return METHODS[name][1].FromString(raw)

    def close(self) -> None:
        self.channel.close()
