"""The network transport reuses its send staging and receive buffers only when that is safe:
a receive buffer is reused once its consumer has let go of every piece, never while a piece
from an earlier receive is still held (that piece must keep its values)."""

import threading

import torch

from comm.transport import WeightTransport, free_port

METAS = [(f"w{i}", (64, 32), "float32") for i in range(6)]


def pair():
    port = free_port()
    box = {}
    joiner = threading.Thread(target=lambda: box.setdefault("rx", WeightTransport("127.0.0.1", port, 1, 2)))
    joiner.start()
    tx = WeightTransport("127.0.0.1", port, 0, 2)
    joiner.join()
    return tx, box["rx"]


def transfer(tx, rx, value: float, keep: bool):
    """Send tensors filled with `value`; the receiver copies them out and, with `keep`, also
    keeps the first piece it got (as a consumer holding a view would)."""
    tensors = [torch.full(shape, value + i) for i, (_, shape, _) in enumerate(METAS)]
    sender = threading.Thread(target=tx.send, args=(METAS, iter(tensors), int(value)), kwargs={"bucket_bytes": 1 << 20})
    sender.start()
    _, stream = rx.receive()
    got, kept, ptr = {}, None, None
    for name, t in stream:
        got[name] = t.clone()
        ptr = t.untyped_storage().data_ptr()  # the buffer this bucket was received into
        if keep and kept is None:
            kept = t
    del t
    sender.join()
    return got, kept, ptr


def test_receive_buffer_is_reused_only_after_its_consumer_lets_go():
    tx, rx = pair()
    got, kept, first_ptr = transfer(tx, rx, 10.0, keep=True)
    assert all(torch.equal(got[n], torch.full(s, 10.0 + i)) for i, (n, s, _) in enumerate(METAS))
    # the transport keeps a handle on that buffer (so its address cannot be handed out anew) ...
    assert rx.spare is not None and rx.spare.data_ptr() == first_ptr
    got, _, second_ptr = transfer(tx, rx, 20.0, keep=False)
    assert all(torch.equal(got[n], torch.full(s, 20.0 + i)) for i, (n, s, _) in enumerate(METAS))
    assert second_ptr != first_ptr  # ... but a piece of it is still held: it is not received into
    assert torch.equal(kept, torch.full((64, 32), 10.0))  # and the held piece kept its values
    del kept
    spare = rx.spare.data_ptr()  # alive through the transport's handle: no new buffer can sit there
    got, _, third_ptr = transfer(tx, rx, 30.0, keep=False)
    assert all(torch.equal(got[n], torch.full(s, 30.0 + i)) for i, (n, s, _) in enumerate(METAS))
    assert third_ptr == spare  # nobody holds it any more: the next bucket was received into it


def test_send_staging_is_reused_across_sends():
    tx, rx = pair()
    transfer(tx, rx, 1.0, keep=False)
    staging = tx._staging.data_ptr()
    got, _, _ = transfer(tx, rx, 2.0, keep=False)
    assert tx._staging.data_ptr() == staging
    assert all(torch.equal(got[n], torch.full(s, 2.0 + i)) for i, (n, s, _) in enumerate(METAS))
