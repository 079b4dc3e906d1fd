"""A free port on loopback, for the servers the tests and scripts start on this machine (the
kernel's choice: its ephemeral range, never inside Ray's worker ports, 10002-19999). TensorFlow's
collective port is picked differently: trainer/train/backend.py's collective_port."""

from __future__ import annotations

import socket


def loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
