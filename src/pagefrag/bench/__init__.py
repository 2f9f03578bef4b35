"""The benchmark matrix behind ``pagefrag bench`` and ``benchmarks/``: pagefrag beside the
anchors (plain ``socket.send``, a bare ``MSG_ZEROCOPY`` loop, asyncio streams, pyzmq's
``send(copy=False, track=True)``), measured in one run on the same work."""
