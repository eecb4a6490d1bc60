"""Content sniffing: what the first bytes of an output really are.

A served ``Content-Type`` is a claim, not a fact. Outputs end up behind presigned links that a
browser may open, so bytes that are really HTML or SVG must never be stored as ``image/png``.
Every output is identified from its first bytes; the served type (and any type the caller
expected) must agree with what the bytes are, and the stored type and extension come from the
bytes.
"""

from __future__ import annotations

import codecs
import json

#: How many leading bytes are enough to identify every supported format.
SNIFF_BYTES = 512

TEXT_PLAIN = "text/plain"
APPLICATION_JSON = "application/json"
#: Markup (HTML, SVG, XML) is recognised only so that it can be refused: it can carry scripts.
MARKUP = "text/html"

#: Supported output types (canonical form) and their file extensions.
EXTENSIONS: dict[str, str] = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/gif": "gif",
    "image/webp": "webp",
    "video/mp4": "mp4",
    "video/quicktime": "mov",
    "video/webm": "webm",
    "audio/mp4": "m4a",
    "audio/wav": "wav",
    "audio/mpeg": "mp3",
    "audio/ogg": "ogg",
    "audio/flac": "flac",
    TEXT_PLAIN: "txt",
    APPLICATION_JSON: "json",
}

# Names servers use for the same formats.
_ALIASES: dict[str, str] = {
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "audio/x-wav": "audio/wav",
    "audio/wave": "audio/wav",
    "audio/vnd.wave": "audio/wav",
    "audio/mp3": "audio/mpeg",
    "audio/mpeg3": "audio/mpeg",
    "audio/x-mpeg": "audio/mpeg",
    "audio/x-mp3": "audio/mpeg",
    "audio/x-flac": "audio/flac",
    "audio/x-m4a": "audio/mp4",
    "application/ogg": "audio/ogg",
    "video/ogg": "audio/ogg",
    "text/json": APPLICATION_JSON,
}

# Served types that make no claim about the format: the bytes decide.
_UNSPECIFIC = frozenset({"", "application/octet-stream", "binary/octet-stream"})

# Served types accepted for each sniffed type, beyond the sniffed type itself. Containers that hold
# either audio or video (MP4, WebM, Ogg) may be labelled either way.
_ALSO_ACCEPTED: dict[str, frozenset[str]] = {
    "video/mp4": frozenset({"audio/mp4"}),
    "audio/mp4": frozenset({"video/mp4"}),
    "video/webm": frozenset({"audio/webm"}),
    TEXT_PLAIN: frozenset({"text/markdown", "text/csv"}),
    # JSON is text; a text/plain label on JSON bytes is not a contradiction.
    APPLICATION_JSON: frozenset({TEXT_PLAIN}),
}

# Control characters never found in real text (tab, newlines, form feed and escape are fine).
_BINARY_CONTROL = frozenset(set(range(0x00, 0x09)) | {0x0B} | set(range(0x0E, 0x1B)) | {0x7F})


def canonical_type(content_type: str | None) -> str:
    """``Content-Type`` without parameters, lowercased, with common aliases resolved."""
    base = (content_type or "").split(";", 1)[0].strip().lower()
    return _ALIASES.get(base, base)


def _sniff_binary(head: bytes) -> str | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith(b"RIFF") and head[8:12] == b"WAVE":
        return "audio/wav"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"M4A ", b"M4B "):
            return "audio/mp4"
        if brand == b"qt  ":
            return "video/quicktime"
        return "video/mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video/webm"
    if head.startswith(b"OggS"):
        return "audio/ogg"
    if head.startswith(b"fLaC"):
        return "audio/flac"
    if head.startswith(b"ID3"):
        return "audio/mpeg"
    if len(head) >= 3 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        # MPEG audio frame header: sync bits, a defined layer, a valid bitrate and sample rate.
        layer = (head[1] >> 1) & 0x3
        bitrate = head[2] >> 4
        sample_rate = (head[2] >> 2) & 0x3
        if layer != 0 and bitrate != 0xF and sample_rate != 0x3:
            return "audio/mpeg"
    return None


def _sniff_text(head: bytes, complete: bool) -> str | None:
    body = head[3:] if head.startswith(codecs.BOM_UTF8) else head
    try:
        # Not final unless complete: the head may end in the middle of a multi-byte character.
        text = codecs.getincrementaldecoder("utf-8")().decode(body, final=complete)
    except UnicodeDecodeError:
        return None
    if any(ord(ch) in _BINARY_CONTROL for ch in text):
        return None
    stripped = text.lstrip()
    if stripped.startswith("<"):
        return MARKUP
    if stripped.startswith(("{", "[")):
        if not complete:
            return APPLICATION_JSON
        try:
            json.loads(text)
        except ValueError:
            return TEXT_PLAIN
        return APPLICATION_JSON
    return TEXT_PLAIN


def sniff(head: bytes, *, complete: bool) -> str | None:
    """Identify the format of an output from its first bytes.

    ``head`` holds the first ``SNIFF_BYTES`` bytes (or the whole body when ``complete``). Returns
    a canonical type: one of ``EXTENSIONS``, ``MARKUP`` for HTML/SVG/XML, or None when unknown.
    """
    return _sniff_binary(head) or _sniff_text(head, complete)


def mismatch(sniffed: str, claimed: str | None) -> bool:
    """Whether a claimed ``Content-Type`` contradicts the sniffed type."""
    claim = canonical_type(claimed)
    if claim in _UNSPECIFIC or claim == sniffed:
        return False
    return claim not in _ALSO_ACCEPTED.get(sniffed, frozenset())


def stored_type(sniffed: str, claims: list[str | None]) -> str:
    """The ``Content-Type`` to store for an accepted output.

    The sniffed type, except that bytes that merely look like JSON but were served as
    ``text/plain`` stay plain text (a text output may well start with a bracket). Text is stored
    with its charset so that browsers render it correctly from a presigned link.
    """
    result = sniffed
    if sniffed == APPLICATION_JSON and any(canonical_type(c) == TEXT_PLAIN for c in claims):
        result = TEXT_PLAIN
    if result == TEXT_PLAIN:
        return "text/plain; charset=utf-8"
    return result
