"""The round-data RPC between two real DHT peers on 127.0.0.1: chunked bundles, history, admission,
and answers cut off in transit."""

import os

import pytest

from node.swarm.dht import LOOPBACK, DHTSettings, start_dht
from node.swarm.round_data import CHUNK_BYTES, NotHeld, Refused, RoundData, RoundDataService, RpcError


class ServerUnderTest(RoundDataService):
    """Counts the requests it gets; with ``cut`` set its answers lose their final chunk, as they do when
    the connection closes mid-stream (hivemind then ends the stream quietly)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.requests, self.cut = 0, False

    async def _serve(self, request, context):
        self.requests += 1
        async for reply in super()._serve(request, context):
            if self.cut and reply.last:
                return
            yield reply


@pytest.fixture
def two_peers():
    dhts, services = [], []
    try:
        first = start_dht(DHTSettings(host_maddrs=[LOOPBACK], join_retries=1))
        dhts.append(first)
        second = start_dht(DHTSettings(initial_peers=[str(m) for m in first.get_visible_maddrs()],
                                       host_maddrs=[LOOPBACK], join_retries=1))
        dhts.append(second)
        server = ServerUnderTest(first, "run", history=2, is_admitted=lambda peer: peer == str(second.peer_id)).start()
        services.append(server)
        client = RoundDataService(second, "run", history=2, is_admitted=lambda peer: False).start()
        services.append(client)
        yield server, client
    finally:
        for service in services:
            service.stop()
        for dht in dhts:
            dht.shutdown()
            dht.join(10)
        assert not any(dht.is_alive() for dht in dhts)


def test_a_peer_serves_what_it_kept_for_its_last_rounds_only_to_admitted_peers(two_peers):
    server, client = two_peers
    bundle = os.urandom(2 * CHUNK_BYTES + 123)  # streamed in three chunks
    server.keep(1, RoundData.CONTRIBUTION, [b"old"], b"x")
    server.keep(2, RoundData.CONTRIBUTION, [b"record"], bundle)
    server.keep(2, RoundData.BINDINGS, [b"a", b"b"])
    server.keep(3, RoundData.CONTRIBUTION, [b"newest"], b"")

    assert client.fetch(server.peer_id, 2, RoundData.CONTRIBUTION, timeout=20) == ([b"record"], bundle)
    assert client.fetch(server.peer_id, 2, RoundData.BINDINGS, timeout=20) == ([b"a", b"b"], b"")
    assert client.fetch(server.peer_id, 3, RoundData.CONTRIBUTION, timeout=20) == ([b"newest"], b"")
    with pytest.raises(RpcError, match=r"no 'contribution' held for round 1 \(holding rounds \[2, 3\]\)"):
        client.fetch(server.peer_id, 1, RoundData.CONTRIBUTION, timeout=20)

    client.keep(5, RoundData.CONTRIBUTION, [b"mine"])
    with pytest.raises(RpcError, match="not admitted to this run"):  # the client admits nobody
        server.fetch(client.peer_id, 5, RoundData.CONTRIBUTION, timeout=20)


def test_a_round_out_of_the_window_is_told_apart_from_one_never_kept(two_peers):
    server, client = two_peers  # the server keeps 2 rounds
    for round_ in (1, 2, 3):
        server.keep(round_, RoundData.CONTRIBUTION, [b"record"], b"")

    with pytest.raises(NotHeld) as late:
        client.fetch(server.peer_id, 1, RoundData.CONTRIBUTION, timeout=20)
    assert late.value.held_rounds == [2, 3] and late.value.evicted(history=2)
    assert not late.value.evicted(history=3)  # a window of 3 would still hold round 1: never kept
    with pytest.raises(NotHeld) as skipped:
        client.fetch(server.peer_id, 2, RoundData.BINDINGS, timeout=20)
    assert not skipped.value.evicted(history=2)  # inside the window: the peer did not keep it
    assert server.requests == 2  # refusals are answers: not asked again


def test_an_answer_cut_off_in_transit_is_asked_again_and_never_read_as_a_short_answer(two_peers):
    server, client = two_peers
    server.keep(1, RoundData.CONTRIBUTION, [b"record"], b"")
    server.keep(2, RoundData.CONTRIBUTION, [b"record"], os.urandom(2 * CHUNK_BYTES + 1))
    server.cut = True

    with pytest.raises(RpcError, match=r"cut off after 0 chunks \(0 bytes\) \(after 3 attempts\)") as empty:
        client.fetch(server.peer_id, 1, RoundData.CONTRIBUTION, timeout=20)
    assert not isinstance(empty.value, Refused) and server.requests == 3
    with pytest.raises(RpcError, match=rf"cut off after 2 chunks \({2 * CHUNK_BYTES + len(b'record')} bytes\)"):
        client.fetch(server.peer_id, 2, RoundData.CONTRIBUTION, timeout=20, attempts=2)
    assert server.requests == 5

    server.cut = False  # the connection recovers: the next attempt reads the whole answer
    assert client.fetch(server.peer_id, 1, RoundData.CONTRIBUTION, timeout=20) == ([b"record"], b"")
