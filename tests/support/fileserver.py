"""A small real HTTP(S) file server for download tests (stdlib, one thread per request).

Routes are registered per test: plain files, redirects, wrong types, big, chunked, slow or
truncated bodies. Every request is logged with its Host header so tests can see what reached
the wire.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import http.server
import io
import ipaddress
import socket
import ssl
import threading
import time
import wave
from collections.abc import Sequence
from typing import Any

from PIL import Image


def png_bytes(size: tuple[int, int] = (8, 8), color: str = "red") -> bytes:
    """A real PNG image."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes() -> bytes:
    """A real JPEG image."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buf, format="JPEG")
    return buf.getvalue()


def wav_bytes(frames: int = 800) -> bytes:
    """A real (silent) WAV file."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x00" * frames)
    return buf.getvalue()


@dataclasses.dataclass
class Route:
    """How the server answers one path."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    #: False: no Content-Length, chunked transfer encoding (length undeclared).
    declare_length: bool = True
    #: Pretend the body is this long in Content-Length (for truncation tests).
    claimed_length: int | None = None
    chunk_size: int = 16 * 1024
    #: Sleep between chunks (slow or trickling bodies).
    chunk_delay_s: float = 0.0
    #: Sleep this long after the headers, before any body byte.
    stall_s: float = 0.0


@dataclasses.dataclass
class Seen:
    """One request as the server received it."""

    path: str
    host: str | None


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass

    def do_GET(self) -> None:
        self.server.seen.append(Seen(path=self.path, host=self.headers.get("Host")))
        route = self.server.routes.get(self.path.split("?", 1)[0])
        if route is None:
            route = Route(status=404, body=b"not found", headers={"Content-Type": "text/plain"})
        # The client may hang up on purpose (size cap, mismatch, timeout): not a server error.
        with contextlib.suppress(OSError):
            self._answer(route)

    def _answer(self, route: Route) -> None:
        self.send_response(route.status)
        for name, value in route.headers.items():
            self.send_header(name, value)
        self.send_header("Connection", "close")
        if route.declare_length:
            length = route.claimed_length if route.claimed_length is not None else len(route.body)
            self.send_header("Content-Length", str(length))
        else:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        if route.stall_s:
            time.sleep(route.stall_s)
        for offset in range(0, len(route.body), route.chunk_size):
            piece = route.body[offset : offset + route.chunk_size]
            if route.declare_length:
                self.wfile.write(piece)
            else:
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.flush()
            if route.chunk_delay_s:
                time.sleep(route.chunk_delay_s)
        if not route.declare_length:
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        self.close_connection = True


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    routes: dict[str, Route]
    seen: list[Seen]

    def handle_error(self, request: Any, client_address: Any) -> None:
        # TLS handshakes refused by the client land here; tests assert on the client side.
        pass


class _Server6(_Server):
    address_family = socket.AF_INET6


class FileServer:
    """A running server; register routes with :meth:`add` and :meth:`redirect`."""

    def __init__(
        self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None, ipv6: bool = False
    ) -> None:
        cls = _Server6 if ipv6 else _Server
        self._server = cls((host, 0), _Handler)
        self._server.routes = {}
        self._server.seen = []
        if tls is not None:
            self._server.socket = tls.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self.host = host
        self.port: int = self._server.server_address[1]
        self.scheme = "https" if tls is not None else "http"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        """``scheme://host:port`` as a client reaches it by address."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def url(self, path: str, host: str | None = None) -> str:
        """Absolute URL of ``path``, optionally naming the server by another host name."""
        if host is None:
            return f"{self.base_url}{path}"
        return f"{self.scheme}://{host}:{self.port}{path}"

    @property
    def seen(self) -> list[Seen]:
        """Requests received so far."""
        return self._server.seen

    def reset(self) -> None:
        """Forget routes and requests (between tests)."""
        self._server.routes.clear()
        self._server.seen.clear()

    def add(self, path: str, body: bytes = b"", content_type: str | None = None, **kw: Any) -> str:
        """Serve ``body`` at ``path``; returns the URL."""
        route = Route(body=body, **kw)
        if content_type is not None:
            route.headers.setdefault("Content-Type", content_type)
        self._server.routes[path] = route
        return self.url(path)

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        """Redirect ``path`` to ``location``; returns the URL."""
        self._server.routes[path] = Route(status=status, headers={"Location": location})
        return self.url(path)

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@dataclasses.dataclass
class Pki:
    """A throwaway CA and a server certificate signed by it."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only this CA."""
        return ssl.create_default_context(cadata=self.ca_pem.decode())

    def server_context(self, tmp_dir: Any) -> ssl.SSLContext:
        """A server context presenting the certificate."""
        cert = tmp_dir / "cert.pem"
        key = tmp_dir / "key.pem"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        return ctx


def make_pki(dns_names: list[str], ip_addresses: Sequence[str] = ()) -> Pki:
    """A CA and a server certificate for ``dns_names`` (and optional IP SANs)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "storage test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return Pki(
        ca_pem=ca_cert.public_bytes(pem),
        cert_pem=cert.public_bytes(pem),
        key_pem=key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
