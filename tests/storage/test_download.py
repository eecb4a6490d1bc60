"""Safe download of outputs: what is refused, what is accepted, and that accepted bytes are exact.

Proves over real HTTP(S) against a local server that downloads honour the host allow-list, the
HTTPS rule, the address rules (loopback, private, link-local incl. 169.254.169.254, IPv6 and
IPv4-mapped IPv6), re-check every redirect hop, connect to the address that was checked (no
second DNS lookup, correct TLS name checks), cap the size with and without Content-Length, time
out, refuse content that contradicts its Content-Type, and map 404/410 to ``output_expired``.
Address classification and host matching are also tested as pure units with an injected resolver.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ai_handler_dagster.errors import (
    OUTPUT_EXPIRED,
    OUTPUT_REJECTED,
    PROVIDER_UNAVAILABLE,
    GenerationError,
)
from ai_handler_dagster.storage.addresses import address_problem, host_allowed
from ai_handler_dagster.storage.download import DownloadPolicy, download, redact_url
from tests.support.fileserver import FileServer, jpeg_bytes, make_pki, png_bytes, wav_bytes

PNG = png_bytes()


def _loopback_policy(server: FileServer, **overrides: object) -> DownloadPolicy:
    """The embedded policy for the file server, with overrides."""
    policy = DownloadPolicy.embedded(server.base_url)
    fields = {**policy.__dict__, **overrides}
    return DownloadPolicy(**fields)  # type: ignore[arg-type]


def _named_policy(**overrides: object) -> DownloadPolicy:
    """Allows the fake DNS name ``files.test`` (and subdomains) over http, loopback allowed."""
    fields: dict[str, object] = {
        "allowed_hosts": ("files.test",),
        "require_https": False,
        "allow_loopback": True,
        "timeout_s": 2.0,
    }
    fields.update(overrides)
    return DownloadPolicy(**fields)  # type: ignore[arg-type]


class FakeDNS:
    """An injected resolver with a fixed table; counts lookups per name."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.calls: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "unknown name")
        return self.table[host]


def _expect(code: str, fn, *args, **kwargs) -> GenerationError:  # type: ignore[no-untyped-def]
    with pytest.raises(GenerationError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value
    return info.value


# ----------------------------------------------------------------------------------------------
# Pure units: address classification and host matching
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "non-public"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
        ("::ffff:10.0.0.1", "IPv4-mapped private"),
        ("::ffff:169.254.169.254", "IPv4-mapped link-local"),
        ("2002:a00:1::", "6to4 private"),
    ],
)
def test_non_public_addresses_are_classified(address: str, expected: str) -> None:
    problem = address_problem(ipaddress.ip_address(address), allow_loopback=False)
    assert problem is not None and problem.startswith(expected)


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address), allow_loopback=False) is None


def test_loopback_allowance_covers_only_loopback() -> None:
    assert address_problem(ipaddress.ip_address("127.0.0.1"), allow_loopback=True) is None
    assert address_problem(ipaddress.ip_address("::1"), allow_loopback=True) is None
    assert address_problem(ipaddress.ip_address("::ffff:127.0.0.1"), allow_loopback=True) is None
    for other in ("10.0.0.1", "169.254.169.254", "0.0.0.0", "::ffff:192.168.0.1"):
        assert address_problem(ipaddress.ip_address(other), allow_loopback=True) is not None


@pytest.mark.parametrize(
    ("host", "port", "allowed"),
    [
        ("replicate.delivery", 443, True),
        ("pbxt.replicate.delivery", 443, True),
        ("a.b.replicate.delivery", 8443, True),
        ("REPLICATE.DELIVERY.", 443, True),
        ("evilreplicate.delivery", 443, False),
        ("replicate.delivery.evil.com", 443, False),
        ("delivery", 443, False),
    ],
)
def test_production_host_matching(host: str, port: int, allowed: bool) -> None:
    assert host_allowed(host, port, DownloadPolicy.production().allowed_hosts) is allowed


def test_host_entries_with_port_and_ip() -> None:
    entries = ("127.0.0.1:9000", "[::1]:9000", "files.test")
    assert host_allowed("127.0.0.1", 9000, entries)
    assert not host_allowed("127.0.0.1", 9001, entries)
    assert host_allowed("::1", 9000, entries)
    assert not host_allowed("0:0:0:0:0:0:0:2", 9000, entries)
    # An IP entry never matches "subdomains" of itself.
    assert not host_allowed("x.127.0.0.1", 9000, entries)
    assert host_allowed("cdn.files.test", 1234, entries)


def test_embedded_policy_allows_exactly_the_emulator() -> None:
    policy = DownloadPolicy.embedded("http://127.0.0.1:8123/")
    assert policy.allowed_hosts == ("127.0.0.1:8123",)
    assert policy.allow_loopback and not policy.require_https
    production = DownloadPolicy.production()
    assert production.require_https and not production.allow_loopback
    assert production.allowed_hosts == ("replicate.delivery",)


def test_redact_url_drops_query_and_credentials() -> None:
    shown = redact_url("https://u:p@pbxt.replicate.delivery/a/b.png?X-Amz-Signature=secret")
    assert shown == "https://pbxt.replicate.delivery/a/b.png"


# ----------------------------------------------------------------------------------------------
# Refusals before any connection (injected resolver, production policy)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address", ["127.0.0.1", "10.0.0.7", "169.254.169.254", "::1", "::ffff:127.0.0.1", "::"]
)
def test_allowed_host_resolving_to_non_public_address_is_refused(address: str) -> None:
    dns = FakeDNS({"pbxt.replicate.delivery": [address]})
    err = _expect(
        OUTPUT_REJECTED,
        download,
        "https://pbxt.replicate.delivery/x/out.png",
        DownloadPolicy.production(),
        io.BytesIO(),
        resolver=dns,
    )
    assert "resolves to" in err.message and not err.retryable
    assert dns.calls == ["pbxt.replicate.delivery"]


def test_one_bad_answer_among_good_ones_refuses_the_host() -> None:
    dns = FakeDNS({"pbxt.replicate.delivery": ["93.184.216.34", "10.0.0.1"]})
    err = _expect(
        OUTPUT_REJECTED,
        download,
        "https://pbxt.replicate.delivery/out.png",
        DownloadPolicy.production(),
        io.BytesIO(),
        resolver=dns,
    )
    assert "private" in err.message


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://pbxt.replicate.delivery/out.png", "HTTPS"),
        ("https://example.com/out.png", "allow-list"),
        ("https://replicate.delivery.evil.com/out.png", "allow-list"),
        ("https://user:pw@pbxt.replicate.delivery/out.png", "credentials"),
        ("ftp://pbxt.replicate.delivery/out.png", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("https://169.254.169.254/latest/meta-data/", "allow-list"),
    ],
)
def test_production_policy_refuses_url_before_resolving(url: str, reason: str) -> None:
    dns = FakeDNS({})
    err = _expect(
        OUTPUT_REJECTED, download, url, DownloadPolicy.production(), io.BytesIO(), resolver=dns
    )
    assert reason in err.message
    assert dns.calls == []


def test_allow_listed_metadata_ip_is_still_refused() -> None:
    policy = DownloadPolicy(allowed_hosts=("169.254.169.254",), require_https=False)
    err = _expect(OUTPUT_REJECTED, download, "http://169.254.169.254/latest/", policy, io.BytesIO())
    assert "link-local" in err.message


# ----------------------------------------------------------------------------------------------
# Real HTTP: accepted downloads are exact
# ----------------------------------------------------------------------------------------------


def test_png_download_streams_exact_bytes_with_checksum(file_server: FileServer) -> None:
    body = png_bytes((64, 64))
    url = file_server.add("/out/0.png", body, "image/png")
    dest = io.BytesIO()
    result = download(url, DownloadPolicy.embedded(file_server.base_url), dest)
    assert dest.getvalue() == body
    assert result.size == len(body)
    assert result.sha256 == hashlib.sha256(body).hexdigest()
    assert (result.content_type, result.ext) == ("image/png", "png")


@pytest.mark.parametrize(
    ("body", "served", "content_type", "ext"),
    [
        (jpeg_bytes(), "image/jpeg", "image/jpeg", "jpg"),
        (wav_bytes(), "audio/x-wav", "audio/wav", "wav"),
        (PNG, "application/octet-stream", "image/png", "png"),
        (b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\x00" * 64, "audio/mpeg", "audio/mpeg", "mp3"),
        (b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64, "video/mp4", "video/mp4", "mp4"),
        (b"GIF89a" + b"\x00" * 32, "image/gif", "image/gif", "gif"),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 32, "image/webp", "image/webp", "webp"),
        ("héllo wörld\n".encode(), "text/plain; charset=utf-8", "text/plain; charset=utf-8", "txt"),
        (b'{"a": [1, 2]}', "application/json", "application/json", "json"),
    ],
)
def test_formats_are_sniffed_from_bytes(
    file_server: FileServer, body: bytes, served: str, content_type: str, ext: str
) -> None:
    url = file_server.add("/f", body, served)
    result = download(url, DownloadPolicy.embedded(file_server.base_url), io.BytesIO())
    assert (result.content_type, result.ext) == (content_type, ext)


def test_non_ascii_path_is_percent_encoded(file_server: FileServer) -> None:
    file_server.add("/%C3%A9t%C3%A9.png", PNG, "image/png")
    result = download(
        file_server.url("/été.png"), DownloadPolicy.embedded(file_server.base_url), io.BytesIO()
    )
    assert result.size == len(PNG)
    assert file_server.seen[-1].path == "/%C3%A9t%C3%A9.png"


def test_non_ascii_host_is_refused() -> None:
    err = _expect(
        OUTPUT_REJECTED,
        download,
        "https://pbxt.repli\u0441ate.delivery/out.png",  # Cyrillic es (U+0441), not a Latin c
        DownloadPolicy(allowed_hosts=("repli\u0441ate.delivery",)),
        io.BytesIO(),
        resolver=FakeDNS({}),
    )
    assert "ASCII" in err.message


def test_chunked_body_without_length_is_accepted_under_the_cap(file_server: FileServer) -> None:
    body = png_bytes((200, 200), "green")
    url = file_server.add("/chunked.png", body, "image/png", declare_length=False, chunk_size=999)
    dest = io.BytesIO()
    result = download(url, DownloadPolicy.embedded(file_server.base_url), dest)
    assert dest.getvalue() == body and result.size == len(body)


def test_connects_to_the_checked_address_without_a_second_lookup(file_server: FileServer) -> None:
    """DNS rebinding: a second lookup would get 10.0.0.1; there must be none."""
    answers = iter([["127.0.0.1"], ["10.0.0.1"], ["10.0.0.1"]])
    calls: list[str] = []

    def rebinding_dns(host: str, port: int) -> list[str]:
        calls.append(host)
        return next(answers)

    file_server.add("/pinned.png", PNG, "image/png")
    dest = io.BytesIO()
    download(
        file_server.url("/pinned.png", host="files.test"),
        _named_policy(),
        dest,
        resolver=rebinding_dns,
    )
    assert dest.getvalue() == PNG
    assert calls == ["files.test"]
    # The request went to the checked address but still named the host.
    assert file_server.seen[-1].host == f"files.test:{file_server.port}"


# ----------------------------------------------------------------------------------------------
# Real HTTP: refusals
# ----------------------------------------------------------------------------------------------


def test_loopback_target_refused_unless_policy_allows_it(file_server: FileServer) -> None:
    url = file_server.add("/local.png", PNG, "image/png")
    allowed = _loopback_policy(file_server)
    assert download(url, allowed, io.BytesIO()).size == len(PNG)
    before = len(file_server.seen)
    err = _expect(
        OUTPUT_REJECTED,
        download,
        url,
        _loopback_policy(file_server, allow_loopback=False),
        io.BytesIO(),
    )
    assert "loopback" in err.message
    assert len(file_server.seen) == before  # refused before connecting


def _ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture
def ipv6_server() -> Iterator[FileServer]:
    if not _ipv6_loopback_available():
        pytest.skip("no IPv6 loopback on this machine")
    server = FileServer(host="::1", ipv6=True)
    try:
        yield server
    finally:
        server.stop()


def test_ipv6_loopback_target_refused_unless_allowed(ipv6_server: FileServer) -> None:
    url = ipv6_server.add("/v6.png", PNG, "image/png")
    policy = DownloadPolicy.embedded(ipv6_server.base_url)
    assert policy.allowed_hosts == (f"[::1]:{ipv6_server.port}",)
    assert download(url, policy, io.BytesIO()).sha256 == hashlib.sha256(PNG).hexdigest()
    strict = DownloadPolicy(allowed_hosts=policy.allowed_hosts, require_https=False)
    err = _expect(OUTPUT_REJECTED, download, url, strict, io.BytesIO())
    assert "loopback" in err.message


def test_ipv4_mapped_ipv6_loopback_refused(file_server: FileServer) -> None:
    file_server.add("/mapped.png", PNG, "image/png")
    dns = FakeDNS({"files.test": ["::ffff:127.0.0.1"]})
    err = _expect(
        OUTPUT_REJECTED,
        download,
        file_server.url("/mapped.png", host="files.test"),
        _named_policy(allow_loopback=False),
        io.BytesIO(),
        resolver=dns,
    )
    assert "IPv4-mapped loopback" in err.message


def test_redirects_are_followed_and_rechecked(file_server: FileServer) -> None:
    file_server.add("/final.png", PNG, "image/png")
    file_server.redirect("/hop2", "/final.png", status=307)
    url = file_server.redirect("/hop1", file_server.url("/hop2"), status=301)
    dest = io.BytesIO()
    download(url, DownloadPolicy.embedded(file_server.base_url), dest)
    assert dest.getvalue() == PNG
    assert [s.path for s in file_server.seen] == ["/hop1", "/hop2", "/final.png"]
    limited = _loopback_policy(file_server, max_redirects=1)
    err = _expect(OUTPUT_REJECTED, download, url, limited, io.BytesIO())
    assert "redirects" in err.message


def test_redirect_to_private_address_is_refused(file_server: FileServer) -> None:
    dns = FakeDNS({"files.test": ["127.0.0.1"], "internal.files.test": ["10.0.0.5"]})
    file_server.redirect("/go", f"http://internal.files.test:{file_server.port}/secret")
    err = _expect(
        OUTPUT_REJECTED,
        download,
        file_server.url("/go", host="files.test"),
        _named_policy(),
        io.BytesIO(),
        resolver=dns,
    )
    assert "private" in err.message and "internal.files.test" in err.message
    assert [s.path for s in file_server.seen] == ["/go"]


def test_redirect_to_metadata_service_is_refused(file_server: FileServer) -> None:
    url = file_server.redirect("/meta", "http://169.254.169.254/latest/meta-data/")
    err = _expect(
        OUTPUT_REJECTED, download, url, DownloadPolicy.embedded(file_server.base_url), io.BytesIO()
    )
    assert "allow-list" in err.message
    # Even with the address allow-listed, the link-local rule still refuses it.
    listed = _loopback_policy(
        file_server, allowed_hosts=(f"127.0.0.1:{file_server.port}", "169.254.169.254")
    )
    err = _expect(OUTPUT_REJECTED, download, url, listed, io.BytesIO())
    assert "link-local" in err.message


def test_redirect_to_other_host_is_refused(file_server: FileServer) -> None:
    url = file_server.redirect("/away", "https://example.com/out.png")
    err = _expect(
        OUTPUT_REJECTED, download, url, DownloadPolicy.embedded(file_server.base_url), io.BytesIO()
    )
    assert "HTTPS" in err.message or "allow-list" in err.message


def test_declared_length_over_cap_is_refused_before_reading(file_server: FileServer) -> None:
    body = PNG + b"\x00" * 20_000
    url = file_server.add("/big.png", body, "image/png")
    dest = io.BytesIO()
    err = _expect(
        OUTPUT_REJECTED, download, url, _loopback_policy(file_server, max_bytes=10_000), dest
    )
    assert "cap" in err.message
    assert dest.getvalue() == b""


def test_undeclared_length_over_cap_is_cut_off(file_server: FileServer) -> None:
    body = PNG + b"\x00" * 200_000
    url = file_server.add(
        "/big-chunked.png", body, "image/png", declare_length=False, chunk_size=4096
    )
    dest = io.BytesIO()
    err = _expect(
        OUTPUT_REJECTED, download, url, _loopback_policy(file_server, max_bytes=10_000), dest
    )
    assert "cap" in err.message
    # Streaming stopped at the cap instead of buffering the whole body.
    assert len(dest.getvalue()) <= 10_000


@pytest.mark.parametrize(
    ("body", "served"),
    [
        (b"<!DOCTYPE html><html><script>alert(1)</script></html>", "image/png"),
        (b"<svg xmlns='http://www.w3.org/2000/svg' onload='alert(1)'/>", "image/svg+xml"),
        (jpeg_bytes(), "image/png"),
        (PNG, "audio/wav"),
        (b"plain words, not an image", "image/png"),
        (bytes(range(256)) * 4, "application/octet-stream"),
    ],
)
def test_content_type_mismatch_or_unsupported_bytes_refused(
    file_server: FileServer, body: bytes, served: str
) -> None:
    url = file_server.add("/mismatch", body, served)
    err = _expect(
        OUTPUT_REJECTED, download, url, DownloadPolicy.embedded(file_server.base_url), io.BytesIO()
    )
    assert "bytes are" in err.message


def test_declared_type_must_match_bytes_too(file_server: FileServer) -> None:
    url = file_server.add("/declared.png", PNG, "image/png")
    policy = DownloadPolicy.embedded(file_server.base_url)
    _expect(OUTPUT_REJECTED, download, url, policy, io.BytesIO(), declared_content_type="audio/wav")
    ok = download(url, policy, io.BytesIO(), declared_content_type="image/png")
    assert ok.ext == "png"


def test_compressed_and_empty_bodies_refused(file_server: FileServer) -> None:
    policy = DownloadPolicy.embedded(file_server.base_url)
    gz = file_server.add("/gz.png", PNG, "image/png", headers={"Content-Encoding": "gzip"})
    assert (
        "Content-Encoding" in _expect(OUTPUT_REJECTED, download, gz, policy, io.BytesIO()).message
    )
    empty = file_server.add("/empty.png", b"", "image/png")
    assert "empty" in _expect(OUTPUT_REJECTED, download, empty, policy, io.BytesIO()).message


@pytest.mark.parametrize(
    ("status", "code", "retryable"),
    [
        (404, OUTPUT_EXPIRED, False),
        (410, OUTPUT_EXPIRED, False),
        (403, OUTPUT_REJECTED, False),
        (500, PROVIDER_UNAVAILABLE, True),
        (503, PROVIDER_UNAVAILABLE, True),
        (429, PROVIDER_UNAVAILABLE, True),
    ],
)
def test_http_status_mapping(
    file_server: FileServer, status: int, code: str, retryable: bool
) -> None:
    url = file_server.add("/status", b"nope", "text/plain", status=status)
    err = _expect(code, download, url, DownloadPolicy.embedded(file_server.base_url), io.BytesIO())
    assert err.retryable is retryable


def test_stalled_body_times_out_as_retryable(file_server: FileServer) -> None:
    url = file_server.add("/stall.png", PNG, "image/png", stall_s=1.5)
    started = time.monotonic()
    err = _expect(
        PROVIDER_UNAVAILABLE,
        download,
        url,
        _loopback_policy(file_server, timeout_s=0.3),
        io.BytesIO(),
    )
    assert err.retryable
    assert time.monotonic() - started < 1.4


def test_trickling_body_hits_the_overall_deadline(file_server: FileServer) -> None:
    # Each chunk arrives well within the read timeout, but the whole would take ~3 s.
    body = PNG + b"\x00" * 400
    url = file_server.add("/trickle.png", body, "image/png", chunk_size=8, chunk_delay_s=0.05)
    started = time.monotonic()
    err = _expect(
        PROVIDER_UNAVAILABLE,
        download,
        url,
        _loopback_policy(file_server, timeout_s=1.0, max_duration_s=0.5),
        io.BytesIO(),
    )
    assert "longer than" in err.message
    assert time.monotonic() - started < 1.5


def test_truncated_body_is_retryable(file_server: FileServer) -> None:
    url = file_server.add("/short.png", PNG, "image/png", claimed_length=len(PNG) + 500)
    err = _expect(
        PROVIDER_UNAVAILABLE,
        download,
        url,
        DownloadPolicy.embedded(file_server.base_url),
        io.BytesIO(),
    )
    assert err.retryable


def test_connection_refused_is_retryable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on the port any more.
    url = f"http://127.0.0.1:{port}/x.png"
    err = _expect(PROVIDER_UNAVAILABLE, download, url, DownloadPolicy.embedded(url), io.BytesIO())
    assert err.retryable


# ----------------------------------------------------------------------------------------------
# Real HTTPS: the pinned connection still checks the certificate against the host name
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[FileServer, ssl.SSLContext]]:
    pki = make_pki(["files.test"])
    server = FileServer(tls=pki.server_context(tmp_path_factory.mktemp("tls")))
    try:
        yield server, pki.client_context()
    finally:
        server.stop()


def test_https_download_verifies_certificate_for_the_host_name(
    tls_server: tuple[FileServer, ssl.SSLContext],
) -> None:
    server, trust = tls_server
    server.add("/secure.png", PNG, "image/png")
    policy = DownloadPolicy(allowed_hosts=("files.test",), allow_loopback=True, timeout_s=2.0)
    dns = FakeDNS({"files.test": ["127.0.0.1"]})
    dest = io.BytesIO()
    download(
        server.url("/secure.png", host="files.test"), policy, dest, resolver=dns, ssl_context=trust
    )
    assert dest.getvalue() == PNG
    assert dns.calls == ["files.test"]


def test_https_certificate_for_another_name_is_refused(
    tls_server: tuple[FileServer, ssl.SSLContext],
) -> None:
    server, trust = tls_server
    server.add("/secure.png", PNG, "image/png")
    policy = DownloadPolicy(allowed_hosts=("other.test",), allow_loopback=True, timeout_s=2.0)
    dns = FakeDNS({"other.test": ["127.0.0.1"]})
    err = _expect(
        OUTPUT_REJECTED,
        download,
        server.url("/secure.png", host="other.test"),
        policy,
        io.BytesIO(),
        resolver=dns,
        ssl_context=trust,
    )
    assert "certificate" in err.message


def test_https_untrusted_certificate_is_refused(
    tls_server: tuple[FileServer, ssl.SSLContext], tmp_path: Path
) -> None:
    server, _trust = tls_server
    server.add("/secure.png", PNG, "image/png")
    policy = DownloadPolicy(allowed_hosts=("files.test",), allow_loopback=True, timeout_s=2.0)
    dns = FakeDNS({"files.test": ["127.0.0.1"]})
    # The default trust store does not know the test CA.
    err = _expect(
        OUTPUT_REJECTED,
        download,
        server.url("/secure.png", host="files.test"),
        policy,
        io.BytesIO(),
        resolver=dns,
    )
    assert "certificate" in err.message
