"""The real-browser suite (Chromium via Playwright).

Run it alone with ``python -m pytest -m browser``.
"""
