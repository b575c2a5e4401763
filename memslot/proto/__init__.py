"""The memslot gRPC API: ``memslot/v1/memslot.proto`` and its generated modules.

Import the generated code as ``from memslot.proto.memslot.v1 import memslot_pb2, memslot_pb2_grpc``.
Regenerate with ``make proto`` (``python -m memslot.proto.build``) after editing the .proto.
"""
