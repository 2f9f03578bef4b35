"""``pagefrag://``: a zero-copy comm backend for dask.distributed.

Installed with ``pip install 'pagefrag[dask]'``, the scheme is registered through the
entry-point group ``distributed.comm.backends``, so ``LocalCluster(protocol="pagefrag")``,
``dask scheduler --protocol pagefrag``, ``dask worker pagefrag://host:port`` and
``Client("pagefrag://host:port")`` work as they do with ``tcp://``.

Large frames (NumPy and pandas buffers, pickle-5 out-of-band buffers) go to the kernel by
reference and stay pinned until it has released them, so freeing or overwriting an array
after ``await comm.write(...)`` returns cannot corrupt the stream. Settings:
``distributed.comm.pagefrag.*`` (:mod:`._config`). Kernel counterpart: the seed's
per-frag destructor, completed by ``MSG_ZEROCOPY`` / io_uring ``SEND_ZC`` notifications.
"""

from ._config import DEFAULTS, Settings, settings
from ._framing import FramingError
from .backend import PREFIX, PagefragBackend, PagefragConnector, PagefragListener
from .comm import PagefragComm

__all__ = [
    "DEFAULTS",
    "PREFIX",
    "FramingError",
    "PagefragBackend",
    "PagefragComm",
    "PagefragConnector",
    "PagefragListener",
    "Settings",
    "settings",
]
