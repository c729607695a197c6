"""The two-site checkout demo: a shop (domain A), a checkout (domain B), the service and a
local Segment-compatible collector, started together by ``python -m examples.checkout``.

See examples/checkout/README.md; tests/test_checkout_browser.py drives it in Chromium.
"""
