"""`make docs`: build the site with every network connection refused, so that a build that would fetch anything
(fonts, inventories, scripts) fails instead of depending on the network.

    python docs/offline_build.py [mkdocs build options]
"""

import socket
import sys


class NoNetwork(OSError):
    pass


def _refuse(self, address, *args, **kwargs):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (host in ("localhost", "::1") or host.startswith("127.")) or \
            self.family == socket.AF_UNIX:
        return _connect(self, address, *args, **kwargs)
    raise NoNetwork(f"the documentation build tried to reach {address!r}")


def _lookup(host, *args, **kwargs):
    if host in (None, "localhost") or str(host).startswith("127."):
        return _getaddrinfo(host, *args, **kwargs)
    raise NoNetwork(f"the documentation build looked up {host!r}")


_connect, _getaddrinfo = socket.socket.connect, socket.getaddrinfo
socket.socket.connect, socket.getaddrinfo = _refuse, _lookup

if __name__ == "__main__":
    from mkdocs.__main__ import cli

    sys.exit(cli(["build", *sys.argv[1:]]))
