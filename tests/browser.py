"""What the browser tests share: Debian's Chromium through Playwright, or a skip.

Without Chromium or Playwright a browser test skips, except in CI (CI set), where it fails:
.ci/run installs Debian's chromium. No browser is downloaded: Playwright drives
``/usr/bin/chromium`` through ``executable_path``.
"""

import datetime
import importlib
import json
import shutil
import ssl
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.tools import missing_tool

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Third-party cookies blocked, as Chrome will block them.
BLOCK_THIRD_PARTY_COOKIES = "--test-third-party-cookie-phaseout"


def chromium_path() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return found or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def need_browser() -> Any:
    """Playwright's async API, or a skip (a failure in CI) when it or Chromium is missing."""
    try:
        async_api: Any = importlib.import_module("playwright.async_api")
    except ImportError:
        async_api = None
    missing = "playwright" if async_api is None else "chromium" if not chromium_path() else ""
    if missing:
        missing_tool(f"{missing} is missing", ".ci/run installs chromium")
    return async_api


def blocking_profile(directory: Path) -> Path:
    """A Chromium profile with Chrome's own setting on: "Block third-party cookies"."""
    return cookie_profile(directory, block_third_party=True)


def cookie_profile(directory: Path, *, block_third_party: bool) -> Path:
    """A Chromium profile with Chrome's "third-party cookies" setting on block or allow.

    Set either way: Debian's Chromium 156 blocks them by default (a blocked cookie's reason
    is ``UserPreferences``), and ``BLOCK_THIRD_PARTY_COOKIES`` alone does not block them in
    a profile that allows them."""
    profile = directory / "profile"
    (profile / "Default").mkdir(parents=True)
    preferences = {
        "profile": {
            "cookie_controls_mode": 1 if block_third_party else 0,
            "block_third_party_cookies": block_third_party,
        }
    }
    (profile / "Default" / "Preferences").write_text(json.dumps(preferences))
    return profile


def tls_context(directory: Path, *hosts: str) -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate for ``hosts`` (the first is its
    subject), for a site the browser reaches through ``--host-resolver-rules`` and accepts
    with ``ignore_https_errors``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.DNSName(host) for host in hosts]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "site.pem", directory / "site.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context
