"""Ray connection glue shared by the training, post-training and serving drivers (docs/architecture.md, "Connecting
to Ray").

`connect_ray(cpus_needed)` joins the cluster in `RAY_ADDRESS`, else the cluster `ray start` recorded on this machine,
else starts a local instance. Before joining it checks that a GCS answers at the address: `ray.init` retries a dead
address without end (`Failed to connect to GCS at address ...`), and a head that died without `ray stop` (killed,
crashed, OOM-killed) leaves its address in `<ray temp dir>/ray_current_cluster`, which `address="auto"` trusts.

- `RAY_ADDRESS` unset: the recorded cluster if it answers; a stale record gets one line on stderr and a new local
  instance; no record: a new local instance (not another driver's in-process instance that Ray could find).
- `RAY_ADDRESS=local`: always a new local instance.
- `RAY_ADDRESS=<host:port>`, `ray://<host>[:port]` or `auto`: that cluster (`auto`: the recorded one); if it does not
  answer, `RayConnectionError` within a few seconds instead of a hang.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

import ray

__all__ = [
    "PROBE_TIMEOUT_S",
    "RayConnectionError",
    "connect_ray",
    "probe_address",
    "ray_address_file",
    "recorded_cluster",
]

# Long enough for a loaded head on another machine, short enough that a dead address fails before a user wonders.
PROBE_TIMEOUT_S = 2.0
# Ray Client's default port (`ray start --ray-client-server-port`), used when a `ray://` address names none.
RAY_CLIENT_DEFAULT_PORT = 10001
# grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING
_SERVING = 1


class RayConnectionError(RuntimeError):
    """No Ray cluster answers at the address the environment asks for; the message says which and how to fix it."""


def ray_address_file() -> Path:
    """Where `ray start` records the GCS address that `ray.init(address="auto")` joins.

    Ray's own rule (`ray._common.utils.get_default_ray_temp_dir`, not public): `$RAY_TMPDIR`, else `$TMPDIR` on Linux,
    else /tmp (Linux, macOS) or the platform temp dir; then `ray/ray_current_cluster`."""
    if os.environ.get("RAY_TMPDIR"):
        base = os.environ["RAY_TMPDIR"]
    elif sys.platform.startswith("linux") and os.environ.get("TMPDIR"):
        base = os.environ["TMPDIR"]
    elif sys.platform.startswith(("linux", "darwin")):
        base = "/tmp"
    else:
        base = tempfile.gettempdir()
    return Path(base) / "ray" / "ray_current_cluster"


def recorded_cluster() -> tuple[Path, str] | None:
    """(file, GCS address) that the last `ray start` on this machine recorded, or None when there is no record."""
    path = ray_address_file()
    try:
        address = path.read_text().strip()
    except OSError:  # no file (never started, or `ray stop` removed it) or unreadable: nothing recorded
        return None
    return (path, address) if address else None


def _split_host_port(address: str, default_port: int | None = None) -> tuple[str, int]:
    """`host:port`, `[v6]:port` (or a bare host when `default_port` is given) → (host, port); ValueError otherwise."""
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep:
            raise ValueError(address)
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(address)
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep:
            host, port_text = address, ""
    if not port_text:
        if default_port is None:
            raise ValueError(address)
        return host or address, default_port
    port = int(port_text)
    if not host or not 0 < port < 65536:
        raise ValueError(address)
    return host, port


def _tcp_probe(host: str, port: int, timeout: float) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.gaierror:
        return f"cannot resolve host {host!r}"
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except ConnectionRefusedError:
        return "connection refused"
    except OSError as exc:
        return exc.strerror or str(exc)


def _grpc_health_probe(address: str, timeout: float) -> str | None:
    """The standard gRPC health check (`grpc.health.v1.Health/Check`), which Ray's GCS serves.

    Stronger than a TCP connect: a port reused by another program, or a network that accepts every connection (proxies,
    sandboxes), does not pass for a GCS. The request and response are hand-encoded (the empty request is b"", the
    response is field 1, the status) so that no generated protobuf module is needed."""
    import grpc

    enable_proxy = os.environ.get("RAY_grpc_enable_http_proxy", "0").lower() in ("1", "true")  # as Ray's own channels
    channel = grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", int(enable_proxy))])
    try:
        response = channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=timeout)
    except grpc.RpcError as exc:
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return None  # a GCS that wants credentials did answer; ray.init brings the token
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"no answer within {timeout:g} s"
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return "something answers there, but not a Ray GCS"
        details = (exc.details() if callable(getattr(exc, "details", None)) else "") or ""
        if "refused" in details.lower():
            return "connection refused"
        return f"{getattr(code, 'name', 'error')}: {details.strip()}" if details.strip() else str(code)
    finally:
        channel.close()
    status = response[1] if len(response) >= 2 and response[0] == 0x08 else 0
    return None if status == _SERVING else f"the GCS answers but reports status {status}, not SERVING"


def probe_address(address: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when a Ray cluster answers at `address` (GCS `host:port` or `ray://host[:port]`), else why not.

    Bounded by about `timeout` seconds (plus name resolution)."""
    try:
        if address.startswith("ray://"):
            # Ray Client's server has no health service: reachability of its port is what can be checked.
            host, port = _split_host_port(address.removeprefix("ray://").split("/", 1)[0], RAY_CLIENT_DEFAULT_PORT)
            return _tcp_probe(host, port, timeout)
        host, port = _split_host_port(address)
    except ValueError:
        return "not an address of the form host:port or ray://host[:port]"
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        # A TLS GCS rejects the plaintext health check; an open port is the check that needs no certificates.
        return _tcp_probe(host, port, timeout)
    try:
        import grpc  # noqa: F401  (installed with ray[default]; a bare ray install gets the TCP check)
    except ImportError:
        return _tcp_probe(host, port, timeout)
    return _grpc_health_probe(address, timeout)


def _start_local(cpus_needed: int, dashboard: bool) -> str:
    # Logical CPUs: the workers take one each; one more leaves room for Ray Data's read tasks and the progress actor.
    # The dashboard (loopback only, Ray's default host) serves Ray's State API, which Ray Train's PlacementGroupCleaner
    # polls every second: without it that actor cannot tell whether the controller lives and logs a warning per poll.
    kwargs: dict = {"include_dashboard": dashboard}
    if dashboard:
        # Pinned so that this job's processes can be told where it is: with no address, the State API client looks
        # for "the" Ray instance on this machine and gives up when a second one runs (a test run, another job).
        port = _free_loopback_port()
        kwargs.update(
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
        )
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cpus_needed + 1), **kwargs)
    return "new local instance"


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect_ray(cpus_needed: int, *, dashboard: bool = False) -> str:
    """Connect to Ray and say how: "already connected", "cluster at <RAY_ADDRESS>", "running cluster at <addr>",
    "running local cluster" (RAY_ADDRESS=auto without a record) or "new local instance" (callers compare against the
    last one).

    `RAY_ADDRESS=<addr>` / `auto` must answer (else `RayConnectionError`, fast); unset, a recorded cluster that does
    not answer is reported in one line and replaced by a new local instance; `RAY_ADDRESS=local` forces a new local
    instance even when a cluster is running on this machine. `dashboard`: a local instance started here runs Ray's
    dashboard (and with it the State API), which Ray Train jobs need; serving does without."""
    if ray.is_initialized():
        return "already connected"
    address = os.environ.get("RAY_ADDRESS", "").strip()  # Ray treats an empty RAY_ADDRESS as unset
    if address == "local":
        return _start_local(cpus_needed, dashboard)

    if address and address != "auto":
        problem = probe_address(address)
        if problem:
            raise RayConnectionError(
                f"RAY_ADDRESS={address}: no Ray cluster answers there ({problem}). Start that cluster (`ray start "
                "--head` on its head node), fix RAY_ADDRESS or unset it to use this machine, or set RAY_ADDRESS=local "
                "for a new local instance."
            )
        ray.init()  # reads RAY_ADDRESS itself
        return f"cluster at {address}"

    recorded = recorded_cluster()
    if recorded is not None:
        path, gcs = recorded
        problem = probe_address(gcs)
        if problem is None:
            # "auto" resolves to this same record, and unlike an explicit address it also picks up the token a
            # `ray start` cluster with token authentication left in ~/.ray (Ray enables that only for found clusters).
            ray.init(address="auto")
            return f"running cluster at {gcs}"
        if address == "auto":  # the user asked to join the recorded cluster: starting another one would surprise
            raise RayConnectionError(
                f"RAY_ADDRESS=auto: the Ray cluster recorded in {path} at {gcs} does not answer ({problem}): a stale "
                "record, left when that cluster ended without `ray stop`. Start the cluster again (`ray start "
                "--head`), set RAY_ADDRESS to a live cluster, or unset RAY_ADDRESS (or RAY_ADDRESS=local) for a new "
                "local instance."
            )
        print(
            f"Ray: the cluster recorded in {path} at {gcs} is not reachable ({problem}): stale file, that cluster "
            "ended without `ray stop` (delete the file to silence this); starting a new local instance",
            file=sys.stderr,
            flush=True,
        )
        return _start_local(cpus_needed, dashboard)

    if address != "auto":
        # No record and no address: a new local instance. Ray's "auto" would also search `ps` for GCS processes and
        # join the first one, which without a record is another driver's in-process instance (a test run, a
        # notebook): it ends when that driver exits and takes this job with it.
        return _start_local(cpus_needed, dashboard)
    # RAY_ADDRESS=auto asks for a running cluster explicitly: let Ray search this machine's processes for one (they
    # are alive, so this does not hang); with nothing found it raises ConnectionError at once.
    try:
        ray.init(address="auto")
        return "running local cluster"
    except ConnectionError as exc:
        raise RayConnectionError(
            f"RAY_ADDRESS=auto: no running Ray cluster found on this machine (no {ray_address_file()}; {exc}). "
            "Start one with `ray start --head`, set RAY_ADDRESS to a live cluster, or unset RAY_ADDRESS (or "
            "RAY_ADDRESS=local) for a new local instance."
        ) from None
