"""Collectives outside the model's graph, for every rank of a group alike: waiting until a
rank's own computation is done (:func:`settle`), a barrier, a value sent from rank 0 to every
rank (:func:`share`), one random seed for all, and the check that every rank was given the same
prompt (:func:`check_same_prompt`). Each is a collective: every rank must call it at the same
point."""

import json
import math
import threading

import mlx.core as mx
import numpy as np

from .errors import InputError


def settle() -> None:
    """Wait until this rank has no computation in flight, before a collective outside the
    model's graph.

    mlx-lm's ``generate_step`` computes one step past the last token it yields
    (``async_eval`` on its own ``generation_stream``); with a group that step holds collectives.
    A collective issued meanwhile on another stream would pair, on the other rank, with one of
    that step's (each stream runs on its own thread), mixing their data: seen as garbage in
    the next prompt's first collective. Waiting for both streams first keeps every rank's
    collectives in one order."""
    from mlx_lm.generate import generation_stream

    mx.synchronize(generation_stream)
    mx.synchronize()


_decode_streams = {}  # thread id -> the Stream that mlx-lm's generation_stream is on that thread


def settle_unless_decoding() -> None:
    """``settle`` unless this call runs in mlx-lm's decoding loop (its generation_stream), where
    the steps follow each other on one stream anyway and waiting would only stall the loop."""
    from mlx_lm.generate import generation_stream

    thread = threading.get_ident()
    if thread not in _decode_streams:
        with mx.stream(generation_stream):
            _decode_streams[thread] = mx.default_stream(mx.default_device())
    if mx.default_stream(mx.default_device()) != _decode_streams[thread]:
        settle()


def barrier(group) -> None:
    """Return once every rank has reached this point (an all_sum of one number)."""
    settle()
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))


# --------------------------------------------------------------------------- sharing from rank 0


def share(value, group, root: int = 0):
    """``value`` as rank ``root`` has it, returned on every rank; other ranks pass anything (None).

    ``value``: JSON data (None, bool, int, float, str, lists, dicts with str keys) and numpy
    arrays anywhere inside it. It travels as bytes in two all_sums (its length, then the bytes
    from ``root`` and zeros from the others: x + 0 is exact), as mlx-lm's server shares its
    requests, but without pickle: a rank only ever decodes JSON and raw array bytes.
    Every rank must call it at the same point (a collective).
    """
    payload = _encode(value) if group.rank() == root else b""
    settle()
    length = mx.distributed.all_sum(mx.array(len(payload), dtype=mx.int64), group=group, stream=mx.cpu)
    length = int(length.item())
    buffer = (mx.array(np.frombuffer(payload, dtype=np.uint8)) if group.rank() == root
              else mx.zeros((length,), dtype=mx.uint8))
    data = np.array(mx.distributed.all_sum(buffer, group=group, stream=mx.cpu))  # evaluated on every rank
    return value if group.rank() == root else _decode(data.tobytes())


def _encode(value) -> bytes:
    """8-byte header length, a JSON header (arrays replaced by their dtype, shape and offset in
    the bytes that follow), then the arrays' bytes."""
    arrays, offset = [], 0

    def encode(item):
        nonlocal offset
        if isinstance(item, np.ndarray):
            item = np.ascontiguousarray(item)
            arrays.append(item)
            spec = {"__array__": offset, "dtype": item.dtype.str, "shape": list(item.shape)}
            offset += item.nbytes
            return spec
        if isinstance(item, dict):
            return {str(k): encode(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [encode(v) for v in item]
        if isinstance(item, (np.integer, np.floating, np.bool_)):
            return item.item()
        return item

    header = json.dumps(encode(value)).encode()
    return len(header).to_bytes(8, "little") + header + b"".join(a.tobytes() for a in arrays)


def _decode(payload: bytes):
    size = int.from_bytes(payload[:8], "little")
    start = 8 + size

    def decode(item):
        if isinstance(item, dict) and "__array__" in item:
            dtype, shape = np.dtype(item["dtype"]), item["shape"]
            array = np.frombuffer(payload, dtype=dtype, count=math.prod(shape), offset=start + item["__array__"])
            return array.reshape(shape).copy()
        if isinstance(item, dict):
            return {k: decode(v) for k, v in item.items()}
        if isinstance(item, list):
            return [decode(v) for v in item]
        return item

    return decode(json.loads(payload[8:start]))


def share_seed(group) -> None:
    """Seed every rank's random generator alike (rank 0's draw), as mlx-lm's server does, so
    that sampling (temperature > 0) picks the same tokens on every rank."""
    seed = int(np.random.default_rng().integers(0, 2**31 - 1)) if group.rank() == 0 else 0
    settle()
    mx.random.seed(int(mx.distributed.all_sum(mx.array(seed), group=group, stream=mx.cpu).item()))


def check_same_prompt(group, length: int, offset: int = 0, ids=None, position_ids=None) -> None:
    """Refuse prompts that differ between ranks before any collective of their size runs.

    Each rank reduces the call's length, text offset, token ids (B, L) and M-RoPE position ids
    (3, B, L) (either may be None) to six integers (wrapping sums of the values and of the values
    times their index: the same ids give the same numbers on any hardware, and a changed or moved
    id changes them), and the ranks compare them (an all_gather of 6 numbers).

    Raises:
        InputError: (on every rank, marked ``everywhere``) a rank's prompt differs from rank 0's.
    """
    def fingerprint(x):
        if x is None:
            return [0, 0]
        flat = x.reshape(-1).astype(mx.uint32)
        weights = mx.arange(1, flat.size + 1, dtype=mx.uint32)
        return [flat.sum(), (flat * weights).sum()]

    parts = [mx.array(length), mx.array(offset), *fingerprint(ids), *fingerprint(position_ids)]
    mine = mx.stack([mx.array(p).astype(mx.uint32) for p in parts])
    settle()  # a prompt call may follow a generation whose extra step is still running
    table = np.array(mx.distributed.all_gather(mine[None], group=group, stream=mx.cpu))
    differ = [rank for rank in range(table.shape[0]) if not np.array_equal(table[rank], table[0])]
    if differ:
        error = InputError(
            f"rank {differ[0]} was given another prompt than rank 0 (token ids, images, videos or "
            f"position): every rank must get the same inputs (see distributed.share)"
        )
        error.everywhere = True
        raise error
