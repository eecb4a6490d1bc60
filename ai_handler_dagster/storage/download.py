"""Safe download of prediction outputs, and staging of any ``output`` shape into temp files.

Output URLs come from a third party, so every fetch is treated as hostile input:

* the host must be on the policy's allow-list and the scheme must be HTTPS (unless the policy
  allows plain HTTP, as the embedded emulator needs);
* the host is resolved once, every address is checked (no private, loopback, link-local,
  multicast, reserved or unspecified address, IPv4 or IPv6, including IPv4-mapped IPv6), and the
  connection goes to the checked address, so DNS rebinding has no second lookup to exploit. TLS
  still verifies the certificate against the host name, and SNI carries the host name;
* redirects are followed by hand, each hop checked like the first, up to a limit;
* the body is streamed to the destination in chunks, hashed on the way, and cut off past the
  size cap; connect, each read and the whole download have time limits;
* the first bytes decide the format; a served type that contradicts them is refused.

Failures raise :class:`~ai_handler_dagster.errors.GenerationError`: ``output_expired`` for
404/410, ``provider_unavailable`` (retryable) for transient network trouble, and
``output_rejected`` for everything refused.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import socket
import ssl
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from ai_handler_dagster import __version__
from ai_handler_dagster.errors import (
    OUTPUT_EXPIRED,
    OUTPUT_REJECTED,
    PROVIDER_UNAVAILABLE,
    GenerationError,
)
from ai_handler_dagster.storage import sniff
from ai_handler_dagster.storage.addresses import (
    Resolver,
    address_problem,
    host_allowed,
    normalize_allowed_hosts,
    parse_ip,
    system_resolver,
)
from ai_handler_dagster.storage.objects import StagedFile

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_REDIRECTS = 5
DEFAULT_MAX_DURATION_S = 600.0
#: More outputs than this in one prediction is refused rather than stored.
MAX_OUTPUT_ITEMS = 100

PRODUCTION_HOSTS = ("replicate.delivery",)

_CHUNK = 64 * 1024
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = f"ai-handler-dagster/{__version__}"
_ASCII_PRINTABLE = "".join(chr(c) for c in range(0x21, 0x7F))


@dataclasses.dataclass(frozen=True)
class DownloadPolicy:
    """What an output download may touch and how much it may take.

    ``allowed_hosts`` entries are ``host`` (any port; subdomains of a DNS name match too) or
    ``host:port``. ``timeout_s`` bounds the connect and every read; ``max_duration_s`` bounds
    the whole download including redirects, so a server trickling bytes cannot hold a worker.
    """

    allowed_hosts: tuple[str, ...]
    require_https: bool = True
    allow_loopback: bool = False
    max_bytes: int = DEFAULT_MAX_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_redirects: int = DEFAULT_MAX_REDIRECTS
    max_duration_s: float = DEFAULT_MAX_DURATION_S

    def __post_init__(self) -> None:
        if not self.allowed_hosts:
            raise ValueError("allowed_hosts must name at least one host")
        if self.max_bytes <= 0 or self.timeout_s <= 0 or self.max_duration_s <= 0:
            raise ValueError("max_bytes, timeout_s and max_duration_s must be positive")
        if self.max_redirects < 0:
            raise ValueError("max_redirects must not be negative")
        object.__setattr__(self, "allowed_hosts", normalize_allowed_hosts(self.allowed_hosts))

    @classmethod
    def production(
        cls,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_redirects: int = DEFAULT_MAX_REDIRECTS,
        max_duration_s: float = DEFAULT_MAX_DURATION_S,
    ) -> DownloadPolicy:
        """Replicate's delivery hosts (``replicate.delivery`` and subdomains), HTTPS only."""
        return cls(
            allowed_hosts=PRODUCTION_HOSTS,
            require_https=True,
            allow_loopback=False,
            max_bytes=max_bytes,
            timeout_s=timeout_s,
            max_redirects=max_redirects,
            max_duration_s=max_duration_s,
        )

    @classmethod
    def embedded(
        cls,
        base_url: str,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_redirects: int = DEFAULT_MAX_REDIRECTS,
        max_duration_s: float = DEFAULT_MAX_DURATION_S,
    ) -> DownloadPolicy:
        """Only the emulator at ``base_url`` (its exact host and port).

        Plain HTTP is allowed when the emulator speaks it, and loopback addresses are allowed
        because the embedded emulator listens on this machine; nothing else is.
        """
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"emulator base URL must be http(s)://host[:port], got {base_url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        ip = parse_ip(parts.hostname)
        host = f"[{ip}]" if ip is not None and ip.version == 6 else parts.hostname
        return cls(
            allowed_hosts=(f"{host}:{port}",),
            require_https=parts.scheme == "https",
            allow_loopback=True,
            max_bytes=max_bytes,
            timeout_s=timeout_s,
            max_redirects=max_redirects,
            max_duration_s=max_duration_s,
        )


@dataclasses.dataclass(frozen=True)
class DownloadedFile:
    """What was written to the destination: verified size, checksum and format."""

    size: int
    sha256: str
    content_type: str
    ext: str


def redact_url(url: str) -> str:
    """``url`` without credentials, query or fragment, safe for messages and logs."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparseable URL>"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path}"[:300]


def _rejected(message: str) -> GenerationError:
    return GenerationError(OUTPUT_REJECTED, message, retryable=False)


def _unavailable(message: str) -> GenerationError:
    return GenerationError(PROVIDER_UNAVAILABLE, message, retryable=True)


@dataclasses.dataclass(frozen=True)
class _Target:
    url: str
    scheme: str
    host: str
    port: int
    path: str


def _check_url(url: str, policy: DownloadPolicy) -> _Target:
    """Parse ``url`` and apply the scheme and host rules (no network yet)."""
    shown = redact_url(url)
    if any(ch.isspace() or ord(ch) < 0x20 or ch == "\\" for ch in url):
        raise _rejected(f"malformed output URL {shown}")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _rejected(f"malformed output URL {shown}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _rejected(f"output URL scheme {scheme!r} is not allowed ({shown})")
    if scheme == "http" and policy.require_https:
        raise _rejected(f"output URL must use HTTPS ({shown})")
    if "@" in parts.netloc:
        # Credentials in a URL are a classic way to confuse host checks; outputs never need them.
        raise _rejected(f"output URL must not carry credentials ({shown})")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise _rejected(f"output URL has no host ({shown})")
    if not host.isascii():
        # Delivery hosts are plain ASCII; internationalised look-alikes have no business here.
        raise _rejected(f"output host must be ASCII ({shown})")
    port = port or (443 if scheme == "https" else 80)
    if not host_allowed(host, port, policy.allowed_hosts):
        raise _rejected(f"output host {host}:{port} is not on the allow-list ({shown})")
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    # HTTP request targets are ASCII: percent-encode anything else, leave the rest untouched.
    path = urllib.parse.quote(path, safe=_ASCII_PRINTABLE)
    return _Target(url=url, scheme=scheme, host=host, port=port, path=path)


def _checked_addresses(target: _Target, policy: DownloadPolicy, resolve: Resolver) -> list[str]:
    """Resolve the host once and refuse it if any address is not allowed."""
    literal = parse_ip(target.host)
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            addresses = list(resolve(target.host, target.port))
        except OSError as exc:
            raise _unavailable(f"cannot resolve output host {target.host}: {exc}") from None
    if not addresses:
        raise _unavailable(f"output host {target.host} resolved to no address")
    for address in addresses:
        ip = parse_ip(address)
        if ip is None:
            raise _rejected(f"resolver returned a non-address {address!r} for {target.host}")
        problem = address_problem(ip, allow_loopback=policy.allow_loopback)
        if problem:
            # One bad answer refuses the host: a rebinding attacker may mix good and bad ones.
            raise _rejected(f"output host {target.host} resolves to a {problem} ({ip})")
    return addresses


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP connection to a pre-checked address; the Host header still names the host."""

    def __init__(self, host: str, port: int, *, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS connection to a pre-checked address; SNI and certificate checks use the host name."""

    def __init__(
        self, host: str, port: int, *, address: str, timeout: float, context: ssl.SSLContext
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address
        self._tls = context

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        try:
            self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


def _connect(
    target: _Target,
    addresses: Sequence[str],
    timeout: float,
    ssl_context: ssl.SSLContext | None,
) -> http.client.HTTPConnection:
    """Open a connection to the first checked address that answers."""
    last_error: OSError | None = None
    for address in addresses:
        conn: http.client.HTTPConnection
        if target.scheme == "https":
            context = ssl_context or ssl.create_default_context()
            conn = _PinnedHTTPSConnection(
                target.host, target.port, address=address, timeout=timeout, context=context
            )
        else:
            conn = _PinnedHTTPConnection(target.host, target.port, address=address, timeout=timeout)
        try:
            conn.connect()
        except ssl.SSLCertVerificationError:
            conn.close()
            raise
        except OSError as exc:
            conn.close()
            last_error = exc
            continue
        return conn
    assert last_error is not None
    raise last_error


def _remaining(deadline: float, policy: DownloadPolicy) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _unavailable(f"download took longer than {policy.max_duration_s:g} s")
    return min(policy.timeout_s, left)


def _receive(
    resp: http.client.HTTPResponse,
    sock: socket.socket | None,
    target: _Target,
    policy: DownloadPolicy,
    dest: BinaryIO,
    declared_content_type: str | None,
    deadline: float,
) -> DownloadedFile:
    """Stream a 200 response into ``dest`` with the size cap, hashing and format checks."""
    shown = redact_url(target.url)
    encoding = (resp.getheader("Content-Encoding") or "identity").strip().lower()
    if encoding != "identity":
        # We asked for identity; a compressed body would defeat the size cap and the sniffing.
        raise _rejected(f"output served with Content-Encoding {encoding!r} ({shown})")
    declared_length = resp.length  # parsed Content-Length, None when absent or chunked
    if declared_length is not None and declared_length > policy.max_bytes:
        raise _rejected(
            f"output is {declared_length} bytes, over the {policy.max_bytes}-byte cap ({shown})"
        )
    served_type = resp.getheader("Content-Type")
    claims = [served_type, declared_content_type]

    hasher = hashlib.sha256()
    size = 0
    head = bytearray()
    sniffed: str | None = None

    def identify(complete: bool) -> str:
        kind = sniff.sniff(bytes(head), complete=complete)
        if kind is None or kind not in sniff.EXTENSIONS:
            what = "markup (HTML/XML/SVG)" if kind == sniff.MARKUP else "an unsupported format"
            raise _rejected(f"output bytes are {what}; served as {served_type!r} ({shown})")
        for claim in claims:
            if sniff.mismatch(kind, claim):
                raise _rejected(f"output served as {claim!r} but its bytes are {kind} ({shown})")
        return kind

    while True:
        if sock is not None:
            sock.settimeout(_remaining(deadline, policy))
        # read1 returns whatever one socket read yields, so the deadline is checked even when a
        # server trickles bytes slower than a full chunk per read timeout.
        try:
            chunk = resp.read1(_CHUNK)
        except TimeoutError:
            _remaining(deadline, policy)  # name the overall deadline when that was the cause
            raise
        if not chunk:
            break
        size += len(chunk)
        if size > policy.max_bytes:
            raise _rejected(f"output exceeds the {policy.max_bytes}-byte cap ({shown})")
        if sniffed is None and len(head) < sniff.SNIFF_BYTES:
            head += chunk[: sniff.SNIFF_BYTES - len(head)]
            if len(head) >= sniff.SNIFF_BYTES:
                # Decide as soon as possible so a mismatched body is not downloaded in full.
                sniffed = identify(complete=False)
        hasher.update(chunk)
        dest.write(chunk)
    if size == 0:
        raise _rejected(f"output is empty ({shown})")
    if declared_length is not None and size != declared_length:
        raise _unavailable(f"output truncated: {size} of {declared_length} bytes ({shown})")
    if sniffed is None:
        sniffed = identify(complete=True)
    return DownloadedFile(
        size=size,
        sha256=hasher.hexdigest(),
        content_type=sniff.stored_type(sniffed, claims),
        ext=sniff.EXTENSIONS[sniffed],
    )


def download(
    url: str,
    policy: DownloadPolicy,
    dest: BinaryIO,
    *,
    declared_content_type: str | None = None,
    resolver: Resolver | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> DownloadedFile:
    """Fetch ``url`` under ``policy`` and stream its body into ``dest``.

    ``declared_content_type`` is a type the caller expects; like the served ``Content-Type`` it
    must agree with the bytes. ``resolver`` replaces the system DNS lookup (tests) and
    ``ssl_context`` the default trust store. On failure ``dest`` may hold partial data: the caller
    owns it and should discard it.

    Raises:
        GenerationError: ``output_expired`` (404/410), ``output_rejected`` (refused by policy,
            too large, wrong or unsupported format, other HTTP errors) or ``provider_unavailable``
            (retryable: timeouts, connection errors, 429 and 5xx, truncated bodies).
    """
    resolve = resolver or system_resolver
    deadline = time.monotonic() + policy.max_duration_s
    current = url
    for _hop in range(policy.max_redirects + 1):
        target = _check_url(current, policy)
        shown = redact_url(current)
        addresses = _checked_addresses(target, policy, resolve)
        try:
            conn = _connect(target, addresses, _remaining(deadline, policy), ssl_context)
        except ssl.SSLCertVerificationError as exc:
            raise _rejected(
                f"TLS certificate of {target.host} not accepted: {exc.verify_message}"
            ) from None
        except OSError as exc:
            raise _unavailable(f"cannot connect to {target.host}:{target.port}: {exc}") from None
        # getresponse() detaches the socket from the connection when the server closes after
        # the response, so keep our own handle to adjust read timeouts while streaming.
        sock = conn.sock
        try:
            try:
                conn.request(
                    "GET",
                    target.path,
                    headers={
                        "User-Agent": _USER_AGENT,
                        "Accept": "*/*",
                        "Accept-Encoding": "identity",
                        "Connection": "close",
                    },
                )
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise _unavailable(f"no response from {shown}: {exc!r}") from None
            status = resp.status
            if status in _REDIRECT_STATUSES:
                location = resp.getheader("Location")
                if not location:
                    raise _rejected(f"redirect {status} without Location ({shown})")
                current = urllib.parse.urljoin(current, location.strip())
                continue
            if status in (404, 410):
                raise GenerationError(
                    OUTPUT_EXPIRED, f"output is gone (HTTP {status}) ({shown})", retryable=False
                )
            if status == 429 or status >= 500:
                raise _unavailable(f"output host answered HTTP {status} ({shown})")
            if status != 200:
                raise _rejected(f"output host answered HTTP {status} ({shown})")
            try:
                return _receive(resp, sock, target, policy, dest, declared_content_type, deadline)
            except (OSError, http.client.HTTPException) as exc:
                # Timeouts and resets mid-body are transient; a retry fetches the file again.
                raise _unavailable(f"download of {shown} interrupted: {exc!r}") from None
        finally:
            conn.close()
    raise _rejected(f"more than {policy.max_redirects} redirects starting at {redact_url(url)}")


# --------------------------------------------------------------------------------------------
# Any prediction ``output`` shape -> items to store -> staged temp files
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OutputItem:
    """One thing to store from a prediction's ``output``.

    Exactly one of ``url`` (a file to download, or a ``data:`` URI decoded locally) and ``data``
    (literal bytes: joined text or a JSON document) is set. ``content_type`` is the declared type:
    for literal data it is final; for URLs the bytes are still checked against it.
    """

    url: str | None = None
    data: bytes | None = None
    content_type: str | None = None

    @property
    def kind(self) -> str:
        """``"file"`` (download), ``"data_uri"`` (inline file), ``"text"`` or ``"json"``."""
        if self.url is not None:
            return "data_uri" if self.url[:5].lower() == "data:" else "file"
        return "json" if self.content_type == sniff.APPLICATION_JSON else "text"


def _is_file_ref(value: object) -> bool:
    if not isinstance(value, str):
        return False
    lowered = value[:8].lower()
    is_url = lowered.startswith(("http://", "https://")) and not any(c.isspace() for c in value)
    return is_url or lowered.startswith("data:")


def _file_refs(value: object) -> Iterator[str]:
    """Every URL in a nested structure, depth first, in order."""
    if _is_file_ref(value):
        yield str(value)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _file_refs(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _file_refs(item)


def _text_item(text: str) -> OutputItem:
    return OutputItem(data=text.encode("utf-8"), content_type="text/plain; charset=utf-8")


def outputs_from_prediction(output: Any) -> list[OutputItem]:
    """Turn a prediction's ``output`` (any shape Replicate returns) into items to store.

    * ``None``, ``""`` or ``[]``: nothing (the caller decides whether that is a failure);
    * a URL string, or a list of URL strings: one file per URL, in order;
    * a plain string: one ``.txt``; a list of plain strings (streamed text chunks): joined into
      one ``.txt``;
    * anything else (objects, numbers, nested or mixed lists): one ``.json`` with the whole
      value, preceded by one file per URL found inside it, so referenced files outlive
      Replicate's one-hour retention.

    Raises:
        GenerationError: ``output_rejected`` when the output holds more than
            ``MAX_OUTPUT_ITEMS`` items.
    """
    items: list[OutputItem]
    if output is None or output == "" or output == []:
        items = []
    elif isinstance(output, str):
        items = [OutputItem(url=output)] if _is_file_ref(output) else [_text_item(output)]
    elif isinstance(output, list) and all(isinstance(v, str) for v in output):
        if all(_is_file_ref(v) for v in output):
            items = [OutputItem(url=v) for v in output]
        elif not any(_is_file_ref(v) for v in output):
            joined = "".join(output)
            items = [_text_item(joined)] if joined else []
        else:
            items = _structured(output)
    else:
        items = _structured(output)
    if len(items) > MAX_OUTPUT_ITEMS:
        raise _rejected(f"prediction output holds {len(items)} items (at most {MAX_OUTPUT_ITEMS})")
    return items


def _structured(output: Any) -> list[OutputItem]:
    try:
        document = json.dumps(output, ensure_ascii=False, sort_keys=True).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise _rejected(f"prediction output is not JSON-serialisable: {exc}") from None
    files = [OutputItem(url=ref) for ref in _file_refs(output)]
    return [*files, OutputItem(data=document, content_type=sniff.APPLICATION_JSON)]


def _decode_data_uri(uri: str, policy: DownloadPolicy) -> tuple[bytes, str | None]:
    """Bytes and declared media type of a ``data:`` URI (Replicate's sync mode returns these)."""
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise _rejected("malformed data: URI output")
    params = header.split(";")
    media_type = params[0] or None
    # base64 grows by 4/3; refuse before decoding anything bigger than the cap.
    if len(payload) > policy.max_bytes * 4 // 3 + 4:
        raise _rejected(f"data: URI output exceeds the {policy.max_bytes}-byte cap")
    try:
        if "base64" in (p.strip().lower() for p in params[1:]):
            data = base64.b64decode(payload, validate=True)
        else:
            data = urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise _rejected("data: URI output is not valid base64") from None
    return data, media_type


def _write_checked_bytes(
    data: bytes, declared: str | None, policy: DownloadPolicy, dest: BinaryIO
) -> DownloadedFile:
    """Apply the download rules (cap, sniffing, type agreement) to inline file bytes."""
    if not data:
        raise _rejected("data: URI output is empty")
    if len(data) > policy.max_bytes:
        raise _rejected(f"data: URI output exceeds the {policy.max_bytes}-byte cap")
    head = data[: sniff.SNIFF_BYTES]
    kind = sniff.sniff(head, complete=len(data) <= sniff.SNIFF_BYTES)
    if kind is None or kind not in sniff.EXTENSIONS:
        raise _rejected("data: URI output is markup or an unsupported format")
    if sniff.mismatch(kind, declared):
        raise _rejected(f"data: URI output declared {declared!r} but its bytes are {kind}")
    dest.write(data)
    return DownloadedFile(
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        content_type=sniff.stored_type(kind, [declared]),
        ext=sniff.EXTENSIONS[kind],
    )


def _stage_one(
    item: OutputItem,
    policy: DownloadPolicy,
    dest: BinaryIO,
    resolver: Resolver | None,
    ssl_context: ssl.SSLContext | None,
) -> DownloadedFile:
    if item.url is not None and item.kind == "data_uri":
        data, media_type = _decode_data_uri(item.url, policy)
        return _write_checked_bytes(data, media_type, policy, dest)
    if item.url is not None:
        return download(
            item.url,
            policy,
            dest,
            declared_content_type=item.content_type,
            resolver=resolver,
            ssl_context=ssl_context,
        )
    data = item.data or b""
    if len(data) > policy.max_bytes:
        raise _rejected(f"{item.kind} output exceeds the {policy.max_bytes}-byte cap")
    dest.write(data)
    content_type = item.content_type or "application/octet-stream"
    return DownloadedFile(
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        content_type=content_type,
        ext=sniff.EXTENSIONS[sniff.canonical_type(content_type)],
    )


def stage_outputs(
    output: Any,
    policy: DownloadPolicy,
    tmp_dir: str | os.PathLike[str] | None = None,
    *,
    resolver: Resolver | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> list[StagedFile]:
    """Download or write every item of a prediction's ``output`` to its own temp file.

    Returns the staged files in output order (the order defines the object index in S3). Either
    every item is staged or none is: on any failure the files already written are removed and
    the error propagates. The caller (or the IO manager) deletes the files once stored.
    """
    items = outputs_from_prediction(output)
    staged: list[StagedFile] = []
    try:
        for index, item in enumerate(items):
            fd, part_name = tempfile.mkstemp(prefix=f"output-{index}-", suffix=".part", dir=tmp_dir)
            part = Path(part_name)
            try:
                with os.fdopen(fd, "wb") as handle:
                    result = _stage_one(item, policy, handle, resolver, ssl_context)
                final = part.with_suffix(f".{result.ext}")
                part.replace(final)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
            staged.append(
                StagedFile(
                    path=final,
                    content_type=result.content_type,
                    ext=result.ext,
                    size=result.size,
                    sha256=result.sha256,
                )
            )
    except BaseException:
        for done in staged:
            with contextlib.suppress(OSError):
                done.path.unlink()
        raise
    return staged
