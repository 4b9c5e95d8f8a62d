"""What ``traceml run`` hands torchrun to run (``python -c TORCHRUN_SHIM ...``): torchrun's own
``main`` with each rank's exit code as the launcher's, and torch's rendezvous stores kept on
loopback when their address is a loopback one (docs/security.md, docs/internals.md).
"""

#: torchrun, with each rank's own exit code as the launcher's exit code (plain torchrun exits 1
#: for any failed rank) and 128+N when it was stopped by signal N.
#: Also: torch's TCPStore server listens on every interface whatever address it is given; when
#: that address is a loopback one, the shim hands it a socket bound to that address only
#: (``master_listen_fd``).  That covers the static rendezvous's store, the c10d rendezvous's
#: (``--standalone``, or ``--rdzv-backend c10d`` with a loopback endpoint) and the store the
#: c10d rendezvous shares with the ranks (hosted on 127.0.0.1 when the endpoint is loopback),
#: so a single-node run listens on nothing but loopback (docs/security.md).  Non-loopback
#: addresses (multi-node) are left to torch.
TORCHRUN_SHIM = """\
import ipaddress, socket, sys
import torch.distributed.elastic.rendezvous.c10d_rendezvous_backend as _c10d
import torch.distributed.elastic.rendezvous.dynamic_rendezvous as _dynamic
import torch.distributed.elastic.rendezvous.registry as _registry
import torch.distributed.elastic.rendezvous.static_tcp_rendezvous as _static
from torch.distributed import TCPStore as _TCPStore
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint
from torch.distributed.run import main
def _loopback(host):
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
def _store(host_name, port, world_size=None, is_master=False, *args, **kwargs):
    # torch's store listens on every interface whatever host it is given: a store that hosts a
    # loopback address gets a socket bound there instead (a busy port fails as torch's own would)
    if is_master and kwargs.get("master_listen_fd") is None and _loopback(host_name):
        addr = "127.0.0.1" if host_name == "localhost" else host_name
        sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((addr, port))
            sock.listen(512)
        except OSError:
            sock.close()
        else:
            port = sock.getsockname()[1]
            kwargs["master_listen_fd"] = sock.detach()
    return _TCPStore(host_name, port, world_size, is_master, *args, **kwargs)
_static.TCPStore = _store
_c10d.TCPStore = _store
_create_handler = _registry.create_handler
def _handler(store, backend, params):
    # a rendezvous on a loopback endpoint (--standalone is localhost:0) is one machine: the store
    # torch shares with the ranks is hosted on 127.0.0.1 too, not on this machine's name
    try:
        host = parse_rendezvous_endpoint(params.endpoint, default_port=0)[0]
    except ValueError:
        host = ""
    if params.local_addr is None and _loopback(host):
        params.local_addr = "127.0.0.1"
    return _create_handler(store, backend, params)
_registry.create_handler = _handler
_shared_server = _dynamic.DynamicRendezvousHandler._create_tcp_store_server
def _shared(self, master_addr, master_port):
    if not _loopback(master_addr):
        return _shared_server(self, master_addr, master_port)
    return _store(master_addr, master_port, is_master=True, multi_tenant=True)
_dynamic.DynamicRendezvousHandler._create_tcp_store_server = _shared
from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
try:
    main(sys.argv[1:])
except ChildFailedError as exc:
    code = exc.get_first_failure()[1].exitcode
    sys.exit(128 - code if code < 0 else (code or 1))
except SignalException as exc:
    sys.exit(128 + int(exc.sigval))
"""
