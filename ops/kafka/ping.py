"""Exit 0 when a Kafka broker at HOST:PORT answers a Metadata request with at least one broker.

Standard library only, so that the broker script needs no virtual environment.
"""

import socket
import struct
import sys


def metadata_brokers(host: str, port: int, timeout: float = 2.0) -> int:
    """Send Metadata v4 (all topics) and return the number of brokers in the answer."""
    client = b"local-broker-ping"
    body = struct.pack(">hhih", 3, 4, 1, len(client)) + client + struct.pack(">ib", -1, 0)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(struct.pack(">i", len(body)) + body)
        head = sock.recv(4, socket.MSG_WAITALL)
        (size,) = struct.unpack(">i", head)
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                break
            data += chunk
    _correlation, _throttle, brokers = struct.unpack(">iii", data[:12])
    return brokers


if __name__ == "__main__":
    host, _, port = sys.argv[1].rpartition(":")
    try:
        sys.exit(0 if metadata_brokers(host, int(port)) > 0 else 1)
    except (OSError, struct.error):
        sys.exit(1)
