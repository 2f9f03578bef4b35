"""The test and demo harness, not the library: nothing outside ``pagefrag.cli`` and
``pagefrag.bench`` (the demo and benchmark front ends) imports it.

- :mod:`pagefrag.testing.netlab`: test hosts, two network namespaces joined by veth
  (root only), used by the tests, the benchmarks and ``pagefrag demo --netns``.
- :mod:`pagefrag.testing.repro`: the seed's RPC retransmission corruption reproduced
  between two namespaces (``pagefrag repro``).
"""
