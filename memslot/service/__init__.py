"""service: the gRPC server of memslot.

- ``engine``: the model, the live value table and ``served_version``; batches and hot-swaps.
- ``server``: the MemoryService handlers, health and reflection, limits and error codes.
- ``auth``: bearer tokens (reader / editor) and the loopback rule for open servers.
- ``client``: connect (token, TLS) and Tensor <-> torch conversion.

Start one with ``memslot serve`` (``memslot.cli.serve``).
"""
