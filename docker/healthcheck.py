"""Container health check: exit 0 when this container's ``/health`` answers 200.

Used by the Dockerfile's HEALTHCHECK and the compose services. ``/health`` is
503 while the model loads and while a SIGTERM drain runs, so a replica leaves
its load balancer's rotation before it stops.
"""

import os
import sys
import urllib.request

port = os.environ.get("TOKENSTEP_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError as error:  # refused, timed out, or an HTTP error status
    print(f"unhealthy: {error}", file=sys.stderr)
    sys.exit(1)
