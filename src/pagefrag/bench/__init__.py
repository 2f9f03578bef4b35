"""The benchmark matrix behind ``pagefrag bench`` and ``benchmarks/zerocopy_send.py``:
pagefrag (``ZeroCopySocket`` and the io_uring ``UringSocket``) beside the anchors (a C
send loop — copying, ``MSG_ZEROCOPY`` and io_uring — compiled at run time; plain
``socket.send``; a bare ``MSG_ZEROCOPY`` loop; asyncio streams; pyzmq's
``send(copy=False, track=True)``), measured in one run on the same work, sent from 256 MiB
of distinct buffers."""
