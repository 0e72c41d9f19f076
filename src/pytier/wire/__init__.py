"""EasyTier 2.6 byte formats: tunnel framing, peer header, protobuf messages and the two hashes.

Pure codecs: no sockets, clocks or asyncio. Every decoder raises `pytier.wire.errors.WireError`
(a ValueError) on malformed input and nothing else.
"""
