"""corsproxy: a standalone CORS-enforcing reverse proxy.

Layers, dependencies pointing one way: ``core`` (pure decision) <- ``config``
(YAML + validation) <- ``server`` (``httpserver`` + ``upstream``) <- ``cli``.
"""

#: The one place the version is written: pyproject.toml reads it (``[tool.setuptools.dynamic]``,
#: statically, so keep it a plain string literal) and ``corsproxy --version`` prints it.
__version__ = "0.1.0"
