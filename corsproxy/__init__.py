"""corsproxy: a standalone CORS-enforcing reverse proxy.

Layers, dependencies pointing one way: ``core`` (pure decision) <- ``config``
(YAML + validation) <- ``server`` (``httpserver`` + ``upstream``) <- ``cli``.
"""

__version__ = "0.1.0"
