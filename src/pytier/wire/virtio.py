"""The virtio_net_hdr that a TUN device opened with IFF_VNET_HDR puts before every packet.

Ten bytes: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset. The TUN device uses the
legacy virtio layout, whose 16-bit fields are in the host's byte order (unless TUNSETVNETBE/LE
says otherwise, which pytier never does), so the codec packs them natively.

`NEEDS_CSUM` means the transport checksum is partial: the field at `csum_start + csum_offset`
holds the pseudo-header sum and the checksum over `csum_start..end` still has to be folded in.
`DATA_VALID` means the sender vouches for the checksum. A `gso_type` other than `GSO_NONE` means
the packet is a super-segment to be cut into `gso_size`-byte payloads.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pytier.wire import checksum
from pytier.wire.errors import WireError

__all__ = [
    "F_DATA_VALID",
    "F_NEEDS_CSUM",
    "F_RSC_INFO",
    "GSO_ECN",
    "GSO_NONE",
    "GSO_TCPV4",
    "GSO_TCPV6",
    "GSO_UDP",
    "GSO_UDP_L4",
    "HDR_LEN",
    "NO_OFFLOAD",
    "VirtioNetHdr",
    "complete_checksum",
]

HDR_LEN = 10  # bytes: sizeof(struct virtio_net_hdr), the TUN default TUNSETVNETHDRSZ

F_NEEDS_CSUM = 0x01
F_DATA_VALID = 0x02
F_RSC_INFO = 0x04

GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80  # or-ed into a TCP gso_type: the super-segment carries CWR on its first segment

_HDR = struct.Struct("=BBHHHH")
_U16 = struct.Struct("!H")

NO_OFFLOAD = bytes(HDR_LEN)  # an all-zero header: a whole packet with a complete checksum


@dataclass(frozen=True, slots=True)
class VirtioNetHdr:
    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0  # bytes of headers before the payload: a hint only
    gso_size: int = 0  # payload bytes per segment
    csum_start: int = 0
    csum_offset: int = 0

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> VirtioNetHdr:
        if len(data) < HDR_LEN:
            raise WireError(f"virtio net header of {len(data)} bytes is shorter than {HDR_LEN}")
        return cls(*_HDR.unpack_from(data))

    def emit(self) -> bytes:
        try:
            return _HDR.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start,
                             self.csum_offset)
        except struct.error as exc:
            raise ValueError(f"virtio net header field out of range in {self!r}: {exc}") from exc


def complete_checksum(packet: bytearray, csum_start: int, csum_offset: int) -> None:
    """Fold the sum of `packet[csum_start:]` into the partial checksum at `csum_start + csum_offset`.

    A result of 0x0000 is written as 0xFFFF, its one's complement twin, as the kernel does: UDP
    reads a zero checksum as "none", and every other user of the field accepts either form.
    """
    at = csum_start + csum_offset
    if at + 2 > len(packet) or csum_start >= len(packet):
        raise WireError(f"partial checksum at {csum_start}+{csum_offset} lies outside a "
                        f"{len(packet)}-byte packet")
    value = checksum.checksum(memoryview(packet)[csum_start:])
    _U16.pack_into(packet, at, value or 0xFFFF)
