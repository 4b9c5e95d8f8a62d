"""No pickle, eval or arbitrary object construction from wire or file data, anywhere.

Two proofs.  Statically: an AST scan of every module of ``traceml`` and ``replay`` finds no
deserializer that can build objects (pickle, marshal, shelve, yaml, torch.load, np.load),
no eval/exec/compile/__import__, no msgpack decode without an ``ext_hook`` that raises and
no object hooks (but hooks that return what they are given, which only count it).  At run time: msgpack extension types (here wrapping a pickle that would
create a file) are refused on a real socket and in a file, and a column's type code can only
name one of the plain numeric dtypes or str.
"""

from __future__ import annotations

import ast
import os
import pickle
import socket
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from traceml.errors import MalformedFrameError
from traceml.transport import RankIdentity, batch, encode_frame, hello
from traceml.transport.codec import decode_columns
from traceml.transport.framing import HEADER, decode_payload
from traceml.transport.server import BaseHandler, Connection, TelemetryServer

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("traceml", "replay")

#: modules whose only purpose is to turn bytes into arbitrary objects
FORBIDDEN_MODULES = {
    "pickle",
    "_pickle",
    "cPickle",
    "marshal",
    "shelve",
    "dill",
    "cloudpickle",
    "joblib",
    "jsonpickle",
    "yaml",
}
#: builtins that run code or import by a computed name
FORBIDDEN_BUILTINS = {"eval", "exec", "compile", "__import__"}
#: attribute calls that deserialize objects: (object name, attribute)
FORBIDDEN_CALLS = {("torch", "load"), ("np", "load"), ("numpy", "load"), ("pickle", "loads"), ("pickle", "load")}
#: keywords that make a decoder build caller-chosen objects
FORBIDDEN_KEYWORDS = {"object_hook", "object_pairs_hook", "list_hook"}
MSGPACK_DECODERS = {"unpackb", "unpack", "Unpacker"}
#: importlib.import_module with a computed name, reviewed: (file, why it is safe)
REVIEWED_IMPORT_MODULE = {
    "traceml/integrations/lightning.py": "the name is checked against the constant FLAVORS tuple first",
    "traceml/exports/__init__.py": "require() is only called with literal module names (exports/otlp.py, trackers.py)",
    "replay/__init__.py": "the name is checked against the constant _SUBMODULES set first (PEP 562 lazy face)",
}


def _sources() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 40, f"expected the whole code base under {PACKAGES}, found {len(files)} files"
    return files


def _raising_functions(tree: ast.Module) -> set[str]:
    """Names of module-level functions whose body raises and never returns a value."""
    out = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            raises = any(isinstance(n, ast.Raise) for n in ast.walk(node))
            returns = any(isinstance(n, ast.Return) and n.value is not None for n in ast.walk(node))
            if raises and not returns:
                out.add(node.name)
    return out


def _identity_functions(tree: ast.Module) -> set[str]:
    """Names of functions (at any depth) that return their first argument unchanged and nothing
    else: a decoder hook like that only observes (e.g. counts) what msgpack built, it builds nothing."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.args.args:
            first = node.args.args[0].arg
            returns = [n for n in ast.walk(node) if isinstance(n, ast.Return)]
            if returns and all(isinstance(r.value, ast.Name) and r.value.id == first for r in returns):
                out.add(node.name)
    return out


def _dotted(node: ast.AST) -> tuple[str, str] | None:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return node.value.id, node.attr
    return None


def scan(path: Path, root: Path = ROOT) -> list[str]:
    """Every violation in one module, as ``file:line: what``."""
    rel = path.relative_to(root).as_posix()
    tree = ast.parse(path.read_text(), filename=rel)
    raising = _raising_functions(tree)
    observers = _identity_functions(tree)
    problems: list[str] = []

    def bad(node: ast.AST, what: str) -> None:
        problems.append(f"{rel}:{getattr(node, 'lineno', 0)}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in FORBIDDEN_MODULES:
                    bad(node, f"imports {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
                bad(node, f"imports from {node.module}")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in FORBIDDEN_BUILTINS:
                bad(node, f"calls {func.id}()")
            dotted = _dotted(func)
            if dotted in FORBIDDEN_CALLS:
                bad(node, f"calls {dotted[0]}.{dotted[1]}()")
            for kw in node.keywords:
                observes = isinstance(kw.value, ast.Name) and kw.value.id in observers
                if kw.arg in FORBIDDEN_KEYWORDS and not observes:
                    bad(node, f"passes {kw.arg}= (builds caller-chosen objects)")
                if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    bad(node, "allow_pickle not False")
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    bad(node, "subprocess with shell=")
            if dotted is not None and dotted[0] == "msgpack" and dotted[1] in MSGPACK_DECODERS:
                hook = next((kw.value for kw in node.keywords if kw.arg == "ext_hook"), None)
                if not (isinstance(hook, ast.Name) and hook.id in raising):
                    bad(node, f"msgpack.{dotted[1]} without an ext_hook that raises")
            computed = bool(node.args) and not isinstance(node.args[0], ast.Constant)
            if dotted == ("importlib", "import_module") and computed and rel not in REVIEWED_IMPORT_MODULE:
                bad(node, "importlib.import_module with a computed name")
            on_builtins = isinstance(func, ast.Name) and func.id == "getattr" and bool(node.args)
            if on_builtins and isinstance(node.args[0], ast.Name) and node.args[0].id in ("builtins", "__builtins__"):
                bad(node, "getattr on builtins")
    return problems


def test_no_module_can_build_objects_from_data() -> None:
    problems = [p for path in _sources() for p in scan(path)]
    assert not problems, "object construction from data:\n" + "\n".join(problems)


def test_the_scanner_catches_what_it_looks_for(tmp_path: Path) -> None:
    """The scan is not vacuous: each forbidden pattern in a planted module is reported."""
    planted = tmp_path / "planted.py"
    planted.write_text(
        "import pickle\n"
        "from yaml import load\n"
        "import msgpack, numpy as np, importlib\n"
        "def _ok(code, data):\n"
        "    return data\n"
        "def f(b, name):\n"
        "    eval(b)\n"
        "    msgpack.unpackb(b)\n"
        "    msgpack.unpackb(b, ext_hook=_ok)\n"
        "    msgpack.unpackb(b, object_hook=dict)\n"
        "    np.load(b, allow_pickle=True)\n"
        "    importlib.import_module(name)\n"
        "def _count(items):\n"
        "    return items\n"
        "def _build(items):\n"
        "    return set(items)\n"
        "def g(b):\n"
        "    msgpack.unpackb(b, ext_hook=_ok, list_hook=_count)\n"
        "    msgpack.unpackb(b, ext_hook=_ok, list_hook=_build)\n"
    )
    found = scan(planted, root=tmp_path)
    text = "\n".join(found)
    for what in (
        "imports pickle",
        "imports from yaml",
        "calls eval()",
        "without an ext_hook",
        "object_hook=",
        "np.load()",
        "allow_pickle",
        "import_module",
    ):
        assert what in text, f"the scanner missed {what!r}: {found}"
    assert sum("without an ext_hook" in p for p in found) == 5
    # a hook that returns what it is given only observes it: allowed; one that builds is not
    assert [p for p in found if "list_hook=" in p] == [
        "planted.py:19: passes list_hook= (builds caller-chosen objects)"
    ]


# --- at run time ------------------------------------------------------------------------------


class _Marker:
    """Unpickling this creates ``path``: proof that data was (not) unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def evil_ext(marker: Path) -> msgpack.ExtType:
    return msgpack.ExtType(42, pickle.dumps(_Marker(marker)))


def test_decode_payload_refuses_extension_types(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = msgpack.packb({"kind": "batch", "seq": 1, "tables": {}, "x": evil_ext(marker)})
    with pytest.raises(MalformedFrameError, match="max_ext_len|extension type"):
        decode_payload(payload)
    # bytes that happen to be a pickle stay bytes
    msg = decode_payload(
        msgpack.packb({"kind": "attachment", "name": "a", "data": {"blob": pickle.dumps(_Marker(marker))}})
    )
    assert isinstance(msg["data"]["blob"], bytes)
    assert not marker.exists()


@pytest.mark.parametrize("code", ["O", "object", "<i8", "V8", "S4", "U", "i8 "])
def test_column_type_codes_name_only_plain_dtypes(code: str) -> None:
    wire = {"n": 1, "cols": {"x": [code, b"\x00" * 8]}}
    with pytest.raises(MalformedFrameError, match="type code"):
        decode_columns(wire, "t")


class _Recorder(BaseHandler):
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.closed: list[str] = []
        self.done = threading.Event()

    def on_message(self, conn: Connection, msg: dict[str, Any]) -> None:
        self.messages.append(msg)

    def on_close(self, conn: Connection, reason: str) -> None:
        self.closed.append(reason)
        self.done.set()


def _ident() -> RankIdentity:
    return RankIdentity(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0, host="h", pid=os.getpid())


def _hangs_up(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_real_server_refuses_extension_types_in_hello_and_in_messages(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    handler = _Recorder()
    server = TelemetryServer("127.0.0.1", 0, "tok", handler, run_id="r").start()
    try:
        # an ext type inside the hello: the connection is refused before it is admitted
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            h = hello("r", "tok", _ident())
            h["host"] = evil_ext(marker)
            body = msgpack.packb(h)
            s.sendall(HEADER.pack(len(body)) + body)
            assert _hangs_up(s)
        # after a good hello: a batch with an ext type closes the connection as malformed
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(encode_frame(hello("r", "tok", _ident())))
            bad = msgpack.packb({"kind": "batch", "seq": 1, "tables": {}, "drops": {"x": evil_ext(marker)}})
            s.sendall(encode_frame(batch(1, {})) + HEADER.pack(len(bad)) + bad)
            assert _hangs_up(s)
        assert handler.done.wait(10)
    finally:
        server.stop()
    deadline = time.monotonic() + 5
    while not handler.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [m["kind"] for m in handler.messages] == ["batch"], "only the good batch is delivered"
    assert handler.closed and handler.closed[0].startswith("malformed") and "ext" in handler.closed[0]
    assert server.malformed >= 2 or server.refused >= 1
    assert not marker.exists()
