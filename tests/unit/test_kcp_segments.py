"""kcp_segments reads packet bodies the way ikcp_input does (checked against siokcp's ikcp)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from siokcp import KCPConnection

from pytier.transport.kcp_segments import CMD_PUSH, SEGMENT, ack_segment, count_pushes, pushes

CONV = 0x1234


def ikcp(conv: int = CONV) -> tuple[KCPConnection, list[bytes]]:
    out: list[bytes] = []

    def emit(body: bytes) -> int:
        out.append(body)
        return 0

    kcp = KCPConnection(conv, emit, lambda _message: None)
    kcp.nodelay(1, 10, 2, 1)
    kcp.setmtu(1200)
    kcp.update(0)
    return kcp, out


def push(sn: int, data: bytes, conv: int = CONV) -> bytes:
    return SEGMENT.pack(conv, CMD_PUSH, 0, 128, 7, sn, 0, len(data)) + data


@given(st.binary(max_size=200), st.integers(0, 0xFFFFFFFF))
def test_arbitrary_bytes_never_raise_and_every_segment_ikcp_took_is_found(body: bytes, conv: int) -> None:
    body = conv.to_bytes(4, "little") + body  # the conversation's own conv lets some segments through
    found = pushes(body, conv)
    receiver, _ = ikcp(conv)
    receiver.receive_data(body)
    assert len(found) >= receiver.nrcv_buf + receiver.nrcv_que


def test_ikcp_output_reads_back_segment_by_segment() -> None:
    sender, out = ikcp()
    sender.send(bytes(3000))
    sender.flush()
    assert [pushes(body, CONV) for body in out] == [[(0, 0)], [(1, 0)], [(2, 0)]]
    assert [count_pushes(body, CONV) for body in out] == [1, 1, 1]
    receiver, acks = ikcp()
    receiver.current = 5
    for body in out:
        receiver.receive_data(body)
    receiver.flush()
    (ack_body,) = acks
    assert len(ack_body) == 3 * SEGMENT.size and pushes(ack_body, CONV) == []
    assert count_pushes(ack_body, CONV) == 0
    # ACKs, a window update and data in one body: every kind the session's own output has.
    sender.send(bytes(100))
    sender.flush()
    receiver.receive_data(out[-1])
    receiver.probe = 2  # IKCP_ASK_TELL
    receiver.send(bytes(10))
    receiver.flush()
    (mixed,) = acks[1:]
    assert len(mixed) == 3 * SEGMENT.size + 10  # ACK, WINS, PUSH
    assert count_pushes(mixed, CONV) == 1 and pushes(mixed, CONV) == [(0, 5)]


def test_reading_stops_where_ikcp_stops() -> None:
    good = push(0, b"a") + push(1, b"b")
    foreign, truncated = push(2, b"c", conv=CONV + 1), push(2, b"c")[:-1]
    unknown_cmd = push(2, b"c").replace(b"\x51", b"\x55", 1)
    for tail in (foreign, truncated, unknown_cmd):
        receiver, _ = ikcp()
        receiver.receive_data(good + tail)
        assert receiver.rcv_nxt == 2  # ikcp took the two good segments and nothing of the tail
        assert [sn for sn, _ in pushes(good + tail, CONV)] == [0, 1]


def test_an_ack_we_write_is_an_ack_to_ikcp() -> None:
    sender, _ = ikcp()
    sender.send(bytes(3000))
    sender.flush()
    sender.current = 40
    sender.receive_data(ack_segment(CONV, 77, ts=0, sn=1, una=0))
    assert (sender.nsnd_buf, sender.snd_una, sender.rmt_wnd) == (2, 0, 77)
    assert sender.rx_srtt == 40  # the echoed timestamp gave the RTT sample
    sender.receive_data(ack_segment(CONV, 77, ts=0, sn=1, una=3))
    assert (sender.nsnd_buf, sender.snd_una) == (0, 3)
