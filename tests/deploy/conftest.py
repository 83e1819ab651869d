"""Deployment tests: Debian's nginx run unprivileged-style on loopback ports
in front of real ``tokenstep serve`` processes, using the same
``docker/nginx`` template as the compose ``scale`` profile."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import stop_process

REPO = Path(__file__).resolve().parents[2]
NGINX_TEMPLATE = REPO / "docker" / "nginx" / "tokenstep.conf.template"
NGINX_MISSING = "nginx is not installed: apt-get install nginx (`make test-deps` does, as root), or deselect with -m 'not nginx'"
# One line per proxied request: which replica(s) nginx tried, the status, and
# the headers the tests route and tag by.
ACCESS_LOG_FORMAT = "'$upstream_addr|$status|$http_x_session_id|$http_x_test_tag'"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "nginx: runs Debian's nginx (apt-get install nginx)")


def nginx_binary() -> str:
    """The nginx executable; fails the test (never skips) when it is missing."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if found is None:
        pytest.fail(NGINX_MISSING, pytrace=False)
    return found


def render_template(upstream_servers: list[str], listen: str) -> str:
    """Fill the template the way the official nginx image's envsubst does:
    only the ``TOKENSTEP_*`` variables; nginx's own ``$vars`` stay."""
    lines = " ".join(f"server {server} max_fails=1 fail_timeout=10s;" for server in upstream_servers)
    text = NGINX_TEMPLATE.read_text().replace("${TOKENSTEP_UPSTREAM_SERVERS}", lines).replace("${TOKENSTEP_LISTEN}", listen)
    assert "${" not in text, "the template uses a variable the tests do not fill"
    return text


class NginxProcess:
    """nginx in the foreground with every path under ``prefix``; ``close()`` stops it."""

    def __init__(self, prefix: Path, site_conf: str, port: int) -> None:
        self.prefix = prefix
        self.base_url = f"http://127.0.0.1:{port}"
        self.access_log = prefix / "access.log"
        (prefix / "tokenstep.conf").write_text(site_conf)
        for temp in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / temp).mkdir()
        # As root, nginx would switch workers to "nobody", who cannot enter a
        # 0700 pytest temp dir; keep them as the invoking user instead.
        user = "user root;" if os.geteuid() == 0 else ""
        (prefix / "nginx.conf").write_text(f"""
{user}
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format replicas {ACCESS_LOG_FORMAT};
    access_log {self.access_log} replicas;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/tokenstep.conf;
}}
""")
        command = [nginx_binary(), "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")]
        checked = subprocess.run([*command, "-t"], capture_output=True, text=True)
        assert checked.returncode == 0, f"nginx -t rejected the rendered template:\n{checked.stderr}"
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 15) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}:\n{self.error_log()}")
            try:
                httpx.get(f"{self.base_url}/health", timeout=2)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise TimeoutError(f"nginx did not listen on {self.base_url}")

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text() if path.exists() else ""

    def requests_tagged(self, tag: str, count: int, timeout_s: float = 5) -> list[tuple[list[str], int, str]]:
        """``(upstreams tried, status, session id)`` of the ``count`` requests
        sent with ``X-Test-Tag: tag``. nginx logs a request when it finishes,
        which can be just after the client has read the response: poll."""
        deadline = time.monotonic() + timeout_s
        while True:
            entries = []
            for line in self.access_log.read_text().splitlines():
                upstreams, status, session_id, line_tag = line.split("|")
                if line_tag == tag:
                    entries.append(([addr.strip() for addr in upstreams.split(",")], int(status), session_id))
            if len(entries) >= count or time.monotonic() > deadline:
                assert len(entries) == count, f"nginx logged {len(entries)} requests tagged {tag!r}, expected {count}"
                return entries
            time.sleep(0.05)

    def close(self) -> None:
        stop_process(self.process, timeout_s=10)
