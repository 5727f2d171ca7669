"""Remove secret values from text that reaches people, prompts or logs.

Secrets are masked in the encodings a test (or anything else that prints) is likely to use:
the raw value, base64 (standard and URL-safe, at any byte alignment inside a longer encoded
text), URL encoding, hex, ``repr()``/JSON escapes, escaped newlines, and each line of a
multi-line secret such as a PEM key. This is defence in depth: the sandbox keeps secrets out
of reach in the first place (docs/architecture.md, "Trust boundaries").
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

MASK = "***"
MIN_SECRET = 4  # shorter values would mask ordinary words
MIN_PIECE = 12  # shortest derived piece (base64 core, one PEM line) that is masked
RUNTIME_KEPT = 256  # secrets learned while running that stay masked (the newest)


def _b64_cores(raw: bytes) -> set[str]:
    """Base64 text that encodes ``raw`` wherever it sits inside a longer byte string.

    Inside a longer text the secret starts at offset 0, 1 or 2 of a 3-byte group; the
    characters that encode bytes of the secret alone are the same for every surrounding text,
    so the core of each alignment (without the groups shared with neighbouring bytes) is masked.
    """
    cores: set[str] = set()
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw).decode()
        start = 4 if shift else 0  # first group mixes in the preceding bytes
        usable = (shift + len(raw)) // 3 * 4  # whole groups made of known bytes only
        core = encoded[start:usable]
        if len(core) >= MIN_PIECE:
            cores.add(core)
            cores.add(core.replace("+", "-").replace("/", "_"))  # URL-safe alphabet
    return cores


def variants(secret: str) -> set[str]:
    """Every form of ``secret`` that is masked."""
    out = {secret}
    raw = secret.encode()
    out |= _b64_cores(raw)
    out.add(quote(secret, safe=""))
    out.add(quote_plus(secret))
    out.add(binascii.hexlify(raw).decode())
    out.add(binascii.hexlify(raw).decode().upper())
    out.add(repr(secret)[1:-1])
    out.add(json.dumps(secret)[1:-1])
    out.add(secret.replace("\n", "\\n"))
    out.add(secret.replace("\n", "\\r\\n"))
    if "\n" in secret.strip():
        for line in secret.splitlines():
            line = line.strip()
            if len(line) >= MIN_PIECE and not line.startswith("-----"):
                out.add(line)
                out |= _b64_cores(line.encode())
    return {v for v in out if len(v) >= MIN_SECRET}


def _pattern(secrets: Iterable[str]) -> re.Pattern[str] | None:
    forms: set[str] = set()
    for secret in secrets:
        if secret and len(secret.strip()) >= MIN_SECRET:
            forms |= variants(secret.strip())
            forms |= variants(secret)
    # Longest first, so a secret that contains another is masked whole.
    ordered = sorted(forms, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, ordered))) if ordered else None


class _Learned:
    """Secrets the process learns while it runs (a GitHub App's installation tokens, fetched
    and refreshed hourly): not in the settings, so every Scrubber also masks these."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: OrderedDict[str, None] = OrderedDict()
        self.pattern: re.Pattern[str] | None = None

    def add(self, secret: str) -> None:
        if not secret or len(secret.strip()) < MIN_SECRET:
            return
        with self._lock:
            if secret in self._values:
                self._values.move_to_end(secret)
                return
            self._values[secret] = None
            while len(self._values) > RUNTIME_KEPT:
                self._values.popitem(last=False)
            self.pattern = _pattern(self._values)


_learned = _Learned()


def learn_secret(secret: str) -> None:
    """Mask `secret` from now on in every log line, message and sandbox output of this
    process (for credentials obtained at run time; configured ones come from the settings)."""
    _learned.add(secret)


class Scrubber:
    """Masks a fixed set of secrets (and their encodings) in text, and the secrets this
    process learned at run time (`learn_secret`)."""

    def __init__(self, secrets: Iterable[str]):
        self._pattern = _pattern(secrets)

    def __bool__(self) -> bool:
        return self._pattern is not None or _learned.pattern is not None

    def __call__(self, text: str) -> str:
        if not text:
            return text
        if self._pattern is not None:
            text = self._pattern.sub(MASK, text)
        learned = _learned.pattern
        return learned.sub(MASK, text) if learned is not None else text


def scrub(text: str, secrets: Iterable[str]) -> str:
    return Scrubber(secrets)(text)
