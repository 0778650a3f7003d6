"""Fixtures and helpers shared by the test packages (imported as ``tests.helpers``).

Test modules live in packages that mirror ``fastsoup/`` (``tests/kernels``, ``tests/ops``,
``tests/io``, ``tests/merge``, ``tests/train``, ``tests/gpu``); what several of them use
belongs here, what every test needs (the interpreter switch, the ``cuda`` marker) in
``tests/conftest.py``.
"""
