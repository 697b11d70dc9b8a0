"""``python -m corsproxy``: the same program as the ``corsproxy`` command.

It works from any directory, also from the parent of a clone named ``corsproxy``.
There Python's path-based finder sees the clone (no ``__init__.py``) through
``sys.path[0]`` and makes it a namespace package before setuptools' editable-install
finder, which sits after it on ``sys.meta_path``, is asked (pypa/setuptools#3557);
``corsproxy.__main__`` still comes from the real package, but ``from . import
__version__`` and ``.config`` would then resolve inside the clone. So before any
relative import this module puts its own package in place of such a namespace.
A regular (wheel) install is not affected: a regular package anywhere on
``sys.path`` wins over namespace portions.
"""

import importlib.util
import os
import sys


def _use_own_package() -> None:
    """Make ``sys.modules["corsproxy"]`` the package this file belongs to, if a
    namespace package (no ``__file__``) took the name first."""
    name = __spec__.parent if __spec__ is not None else ""
    package = sys.modules.get(name)
    if not name or package is None or getattr(package, "__file__", None) is not None:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(here, "__init__.py"), submodule_search_locations=[here]
    )
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_use_own_package()

from .cli import main  # noqa: E402  (after the package is the right one)

if __name__ == "__main__":
    sys.exit(main())
