"""Who a rank is: torchrun's environment variables, read once, carried in the hello.

Plain ``python script.py`` (no torchrun variables) is rank 0 of a world of 1 on node 0.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from traceml.errors import ConfigError

#: torchrun / torch.distributed.elastic variables read by :func:`rank_identity_from_env`
ENV_RANK = "RANK"
ENV_LOCAL_RANK = "LOCAL_RANK"
ENV_WORLD_SIZE = "WORLD_SIZE"
ENV_LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"
ENV_GROUP_RANK = "GROUP_RANK"
ENV_NODE_RANK = "NODE_RANK"


@dataclass(frozen=True)
class RankIdentity:
    """A rank's place in the job; the same fields go into the hello message."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    host: str = ""
    pid: int = -1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError as exc:
        raise ConfigError(
            f"{name}={raw!r}: expected an integer (torchrun sets it); unset it or start the script with torchrun"
        ) from exc
    if value < minimum:
        raise ConfigError(f"{name}={raw!r}: expected an integer >= {minimum}")
    return value


def rank_identity_from_env(env: Mapping[str, str] | None = None) -> RankIdentity:
    """Read ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE`` and ``GROUP_RANK``
    (or ``NODE_RANK``) as torchrun sets them; missing ones default to a single process."""
    env = os.environ if env is None else env
    rank = _int(env, ENV_RANK, 0, 0)
    world_size = _int(env, ENV_WORLD_SIZE, 1, 1)
    local_rank = _int(env, ENV_LOCAL_RANK, rank if ENV_LOCAL_WORLD_SIZE not in env else 0, 0)
    local_world_size = _int(env, ENV_LOCAL_WORLD_SIZE, world_size, 1)
    group_key = ENV_GROUP_RANK if env.get(ENV_GROUP_RANK, "").strip() else ENV_NODE_RANK
    node_rank = _int(env, group_key, 0, 0)
    if rank >= world_size:
        raise ConfigError(
            f"{ENV_RANK}={rank} is not below {ENV_WORLD_SIZE}={world_size}; expected 0 <= RANK < WORLD_SIZE"
        )
    if local_rank >= local_world_size:
        raise ConfigError(
            f"{ENV_LOCAL_RANK}={local_rank} is not below {ENV_LOCAL_WORLD_SIZE}={local_world_size}; "
            "expected 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE"
        )
    return RankIdentity(
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        local_world_size=local_world_size,
        node_rank=node_rank,
        host=socket.gethostname(),
        pid=os.getpid(),
    )
