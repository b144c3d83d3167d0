"""Audio given as links (the web's songs, ingestion's solo imports): checking a URL before anything
is fetched, and downloading it with yt-dlp behind one egress guard.

yt-dlp handles every site it has an extractor for, and plain audio URLs through its generic
extractor. Links must be http(s) and, unless the settings allow the host, must lead to globally
routable addresses only (`ipaddress.is_global`: no loopback, private, link-local, carrier-grade
NAT 100.64/10, 6to4 2002::/16, Teredo, or NAT64 of an internal address) on the ports of
`DEFAULT_PORTS` (80 and 443): a service must not become a way into the network it runs in.
Hosts the settings allow (tests, a local mirror) may use any port.

Checking the link once is not enough: a public page can redirect to an internal address, and a
host name can resolve to a public address when checked and to an internal one when yt-dlp
connects. So yt-dlp talks only through `EgressGuard`, a local proxy that resolves every host
yt-dlp asks for (redirects and media URLs included), checks every address and port, and
connects to the address it checked. The guard also holds the whole fetch (extraction pages and
media) to one deadline and one byte budget: a page that drips a byte every 20 s is cut off when
the deadline passes, whatever yt-dlp's per-socket timeout says.
"""

from __future__ import annotations

import ipaddress
import re
import select
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

from services.common.errors import InvalidArgumentError

MAX_URL_LENGTH = 2048
DEFAULT_PORTS = (80, 443)
# yt-dlp reads pages (extraction) besides the media: they count against the byte budget too.
PAGE_ALLOWANCE_BYTES = 8 << 20
# Networks whose addresses embed an IPv4 address another host routes to: 6to4 and Teredo are
# refused outright; NAT64 is judged by the IPv4 address it embeds.
_TUNNELS = (ipaddress.ip_network("2002::/16"), ipaddress.ip_network("2001::/32"))
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


class LinkError(InvalidArgumentError):
    """The link is refused or could not be downloaded; the message is for the person who gave it."""


class _Stop(Exception):
    """Raised inside yt-dlp's progress hook to abort a download."""


def _allowed(address: ipaddress._BaseAddress, allow: Iterable[str]) -> bool:
    return any(address in ipaddress.ip_network(entry, strict=False) for entry in allow)


def is_internal(address: ipaddress._BaseAddress) -> bool:
    """Whether an address is one a public link must not lead to: anything not globally routable."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif any(address in net for net in _TUNNELS):
            return True
        elif any(address in net for net in _NAT64):
            address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return not address.is_global or address.is_multicast


def resolve_host(host: str) -> list[ipaddress._BaseAddress]:
    """Every address `host` resolves to (an IP literal resolves to itself)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as error:
        raise LinkError(f"cannot resolve the host {host!r} of the link") from error
    return sorted({ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}, key=str)


def check_url(url: str, allow_hosts: Iterable[str] = (),
              resolve: Callable[[str], list] = resolve_host, allow_ports: Iterable[int] = DEFAULT_PORTS) -> str:
    """Validate a link given by a user; returns it stripped, raises LinkError saying what is wrong."""
    url = (url or "").strip()
    if not url:
        raise LinkError("the link is empty")
    if len(url) > MAX_URL_LENGTH:
        raise LinkError(f"the link is longer than {MAX_URL_LENGTH} characters")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise LinkError(f"only http and https links are accepted, not {parts.scheme or 'a link without scheme'!r}")
    host = parts.hostname
    if not host:
        raise LinkError("the link has no host name")
    if parts.username or parts.password:
        raise LinkError("links with a user name or password are not accepted")
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError as error:
        raise LinkError(f"the link's port is invalid: {error}") from None
    _checked_addresses(host, port, list(allow_hosts), resolve, tuple(allow_ports))
    return url


def _checked_addresses(host: str, port: int, allow: list[str], resolve: Callable[[str], list],
                       allow_ports: tuple[int, ...] = DEFAULT_PORTS) -> list:
    """Every address of `host`, once none of them is internal or on a refused port (or all such
    are allowed: hosts the settings name may use any port)."""
    addresses = resolve(host)
    for address in addresses:
        if _allowed(address, allow):
            continue
        if is_internal(address):
            raise LinkError(f"the link leads to a private or local address ({address}), which is not allowed")
        if port not in allow_ports:
            raise LinkError(f"the link uses port {port}; only ports {', '.join(map(str, allow_ports))} are allowed")
    if not addresses:
        raise LinkError(f"cannot resolve the host {host!r} of the link")
    return addresses


def _guarded_address(host: str, port: int, guard: EgressGuard) -> tuple[str, int]:
    """The address the guard connects to: the first of `host`'s, after checking all of them."""
    return str(_checked_addresses(host, port, guard.allow, resolve_host, guard.allow_ports)[0]), port


def _split_host_port(authority: str, default_port: int) -> tuple[str, int]:
    """'host:port', '[v6]:port' or a bare host -> (host, port)."""
    if authority.startswith("["):
        host, _, rest = authority[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif authority.count(":") == 1:
        host, port = authority.split(":")
    else:
        host, port = authority, ""
    return host, int(port) if port.isdigit() else default_port


class _GuardHandler(socketserver.BaseRequestHandler):
    """One proxied connection: CONNECT host:port (https) or an absolute http:// request."""

    def handle(self) -> None:
        guard: EgressGuard = self.server.guard  # type: ignore[attr-defined]
        client = self.request
        client.settimeout(guard.timeout)
        head = b""
        while b"\r\n\r\n" not in head:
            try:
                chunk = client.recv(65536)
            except OSError:  # yt-dlp gave up or timed out before sending a request
                return
            if not chunk or len(head) > 65536:
                return
            head += chunk
        header, _, body = head.partition(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ", 2)
        except ValueError:
            return
        try:
            if method.upper() == "CONNECT":
                host, port = _split_host_port(target, 443)
                upstream = socket.create_connection(_guarded_address(host, port, guard), timeout=guard.timeout)
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                first = body
            else:
                parts = urlsplit(target)
                if parts.scheme != "http" or not parts.hostname:
                    raise LinkError(f"the proxy only forwards http:// requests, not {target[:100]!r}")
                address = _guarded_address(parts.hostname, parts.port or 80, guard)
                upstream = socket.create_connection(address, timeout=guard.timeout)
                path = parts.path or "/"
                if parts.query:
                    path += "?" + parts.query
                # One request per connection: the next one might be for another host.
                kept = [line for line in lines[1:] if line.split(":", 1)[0].strip().lower()
                        not in ("connection", "proxy-connection", "keep-alive", "proxy-authorization")]
                first = "\r\n".join([f"{method} {path} {version}", *kept, "Connection: close"]).encode("latin-1")
                first += b"\r\n\r\n" + body
        except LinkError as refused:
            guard.refusals.append(str(refused))
            message = str(refused).encode()
            client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(message), message))
            return
        except OSError as error:
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            guard.refusals.append(f"cannot connect to {target[:200]}: {error}")
            return
        with upstream:
            if first:
                upstream.sendall(first)
            _relay(client, upstream, guard)


def _relay(client: socket.socket, upstream: socket.socket, guard: EgressGuard) -> None:
    """Copy bytes both ways until either side closes, nothing moves for the guard's idle timeout,
    the guard's deadline passes or what came in exceeds its byte budget."""
    peers = {client: upstream, upstream: client}
    while True:
        left = guard.deadline - time.monotonic()
        if left <= 0:
            guard.refuse(f"the link took longer than {guard.total_seconds:g} s to fetch")
            return
        ready, _, _ = select.select(list(peers), [], [], min(guard.timeout, left))
        if not ready:
            if time.monotonic() < guard.deadline:
                return  # idle: yt-dlp's own timeout reports it
            continue
        for sock in ready:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            if sock is upstream and not guard.take(len(data)):
                guard.refuse(f"the link sent more than {guard.max_bytes / 1e6:.0f} MB")
                return
            peers[sock].sendall(data)


class EgressGuard:
    """A proxy on 127.0.0.1 that refuses connections to internal addresses (see the module text).

    Use as a context manager; `url` is what yt-dlp's `proxy` option takes, and `refusals` says
    why connections were refused, so the person gets that reason and not a bare HTTP 403.
    """

    def __init__(self, allow_hosts: Iterable[str] = (), timeout: float = 30.0, total_seconds: float = 600.0,
                 max_bytes: int = 1 << 40, allow_ports: Iterable[int] = DEFAULT_PORTS):
        self.allow = list(allow_hosts)
        self.allow_ports = tuple(allow_ports)
        self.timeout = timeout
        self.total_seconds = total_seconds
        self.deadline = time.monotonic() + total_seconds
        self.max_bytes = max_bytes
        self._received = 0
        self._lock = threading.Lock()
        self.refusals: list[str] = []
        self.cut = ""
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _GuardHandler, bind_and_activate=True)
        self._server.daemon_threads = True
        self._server.guard = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def take(self, count: int) -> bool:
        """Count bytes that came in; False once the budget is spent."""
        with self._lock:
            self._received += count
            return self._received <= self.max_bytes

    def refuse(self, reason: str) -> None:
        """The fetch is cut off (deadline or byte budget): that is the reason the person gets."""
        if reason not in self.refusals:
            self.refusals.insert(0, reason)
        self.cut = reason

    def __enter__(self) -> EgressGuard:
        threading.Thread(target=self._server.serve_forever, name="egress-guard", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def download(url: str, folder: Path, max_bytes: int, max_seconds_audio: float, timeout_seconds: float,
             allow_hosts: Iterable[str] = (), progress: Callable[[float, float, str], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> Path:
    """Fetch the audio behind `url` into `folder` with yt-dlp; returns the downloaded file (see `fetch`)."""
    return fetch(url, folder, max_bytes, max_seconds_audio, timeout_seconds, allow_hosts, progress, should_stop)[0]


def fetch(url: str, folder: Path, max_bytes: int, max_seconds_audio: float, timeout_seconds: float,
          allow_hosts: Iterable[str] = (), progress: Callable[[float, float, str], None] | None = None,
          should_stop: Callable[[], bool] | None = None,
          allow_ports: Iterable[int] = DEFAULT_PORTS) -> tuple[Path, str]:
    """Fetch the audio behind `url` into `folder` with yt-dlp; returns (the file, its title).

    Refuses (LinkError) media longer than `max_seconds_audio` or larger than `max_bytes` (before
    downloading when the site says so, else while downloading), a fetch — extraction and download
    together — taking longer than `timeout_seconds` or receiving more than `max_bytes` plus a page
    allowance, and media whose actual URL leads to an internal address or a refused port.
    """
    import yt_dlp  # heavy; only the worker thread needs it

    allow = list(allow_hosts)
    check_url(url, allow, allow_ports=allow_ports)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def hook(status: dict) -> None:
        if should_stop is not None and should_stop():
            raise _Stop("cancelled")
        if time.monotonic() - started > timeout_seconds:
            raise _Stop(f"the download took longer than {timeout_seconds:g} s")
        done = float(status.get("downloaded_bytes") or 0)
        if done > max_bytes:
            raise _Stop(f"the download is larger than {max_bytes / 1e6:.0f} MB")
        if progress is not None and status.get("status") == "downloading":
            total = float(status.get("total_bytes") or status.get("total_bytes_estimate") or 0)
            progress(done, total, f"downloading: {done / 1e6:.1f} MB")

    options = {
        # Only formats yt-dlp fetches itself over http(s) (plain, DASH or HLS), so every byte goes
        # through the guard; ffmpeg or rtmpdump fetching a stream would go around it.
        "format": "bestaudio[protocol^=http]/bestaudio[protocol^=m3u8]/best[protocol^=http]/best[protocol^=m3u8]",
        "external_downloader": {"default": "native"},
        "outtmpl": str(folder / "download.%(ext)s"),
        "noplaylist": True,
        "playlist_items": "1",
        "max_filesize": max_bytes,
        "socket_timeout": min(30.0, timeout_seconds),
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "progress_hooks": [hook],
        "restrictfilenames": True,
        "overwrites": True,
        "cachedir": False,
        "retries": 1,
        "fragment_retries": 1,
    }
    guard = EgressGuard(allow, timeout=min(30.0, timeout_seconds), total_seconds=timeout_seconds,
                        max_bytes=max_bytes + PAGE_ALLOWANCE_BYTES, allow_ports=allow_ports)
    options["proxy"] = guard.url
    try:
        with guard, yt_dlp.YoutubeDL(options) as ydl:
            info = ydl.extract_info(url, download=False)
            if info is None:
                raise LinkError("no audio was found behind the link")
            if info.get("_type") in ("playlist", "multi_video"):
                entries = [entry for entry in info.get("entries") or [] if entry]
                if not entries:
                    raise LinkError("the link is an empty playlist")
                info = entries[0]
            duration = info.get("duration")
            if duration and float(duration) > max_seconds_audio:
                raise LinkError(f"the song is {float(duration):.0f} s long; at most {max_seconds_audio:.0f} s are accepted")
            size = info.get("filesize") or info.get("filesize_approx")
            if size and float(size) > max_bytes:
                raise LinkError(f"the file is {float(size) / 1e6:.0f} MB; at most {max_bytes / 1e6:.0f} MB are accepted")
            info = ydl.process_ie_result(info, download=True)
    except LinkError:
        raise
    except _Stop as stop:
        raise LinkError(str(stop)) from None
    except yt_dlp.utils.DownloadError as error:
        if isinstance(getattr(error, "exc_info", (None, None))[1], _Stop):
            raise LinkError(str(error.exc_info[1])) from None
        if guard.refusals:
            raise LinkError(guard.refusals[0]) from None
        message = str(error).replace("ERROR: ", "", 1).strip()
        http = re.search(r"HTTP Error (\d{3}): ([^(\n]+)", message)
        if http:  # what a person can act on, without yt-dlp's extractor prefix
            message = f"the server answered {http.group(1)} {http.group(2).strip()}"
        raise LinkError(f"the link could not be downloaded: {message[:300]}") from None
    except Exception as error:  # yt-dlp raises many kinds; the user gets a message, never a trace
        cause = error
        while cause.__context__ is not None and not isinstance(cause, _Stop):
            cause = cause.__context__
        if isinstance(cause, _Stop):
            raise LinkError(str(cause)) from None
        if guard.refusals:
            raise LinkError(guard.refusals[0]) from None
        raise LinkError(f"the link could not be downloaded: {str(error)[:300]}") from None
    files = sorted(p for p in folder.glob("download.*") if p.is_file() and not p.name.endswith((".part", ".ytdl")))
    if not files:
        raise LinkError(guard.refusals[0] if guard.refusals else
                        f"nothing was downloaded: the file is larger than the {max_bytes / 1e6:.0f} MB accepted, "
                        "or empty")
    if guard.cut:  # cut off: what is there is a truncated file
        raise LinkError(guard.cut)
    title = str((info or {}).get("title") or Path(urlsplit(url).path).stem or "download")
    return files[0], title
