"""Index embedding over several processes launched by ``torchrun`` or ``accelerate launch``.

Both launchers set ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; with
``WORLD_SIZE > 1`` the index command joins a gloo process group (CPU tensors, also under CUDA: only texts
and vectors travel). Rank 0 does everything a one-process run does (scan, read, chunk, decide what is
missing, own the :class:`~ragen.store.StoreWriter` and commit); the other ranks only embed. Each group of
``world_size * batch_size`` pending texts is cut into the same batches a one-process run would encode, rank
``r`` encodes batch ``r`` on its own device, and rank 0 gathers the vectors in order and adds them to the
writer batch by batch, so the result equals a one-process run and a killed run keeps finished batches.

Messages from rank 0 are JSON in a uint8 tensor (no pickle); every collective is answered by every rank,
with an error text travelling beside the vectors, so a failure on any rank ends all ranks instead of
hanging them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np

from .errors import RagenError

logger = logging.getLogger(__name__)

_STATUS_BYTES = 1024  # room for a one-line error text beside each gathered batch


@dataclass(frozen=True)
class Launch:
    """This process's place in a launch: one process by default. The one definition of it: ``ragen index``
    uses it here, training as ``ragen.training.distributed.DistContext`` (an alias)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_launch() -> Launch:
    """The launch ``torchrun``/``accelerate launch`` describe in the environment; one process without them."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return Launch()
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except (KeyError, ValueError) as exc:
        raise RagenError(f"WORLD_SIZE/RANK/LOCAL_RANK: expected integers set by torchrun or accelerate ({exc})") from None
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise RagenError(f"WORLD_SIZE={world} but {name} is not set: launch with torchrun or accelerate launch")
    return Launch(rank=rank, world_size=world, local_rank=local)


def rank_device(device: str | None, launch: Launch) -> str | None:
    """This rank's device: ``cuda`` (or the default, when CUDA is present) becomes ``cuda:LOCAL_RANK``."""
    if not launch.active:
        return device
    import torch

    if device in (None, "cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{launch.local_rank % max(torch.cuda.device_count(), 1)}"
    if device in (None, "auto"):
        return "cpu"
    return device


class Group:
    """A joined gloo process group and the message protocol of the index command."""

    def __init__(self, launch: Launch):
        import torch.distributed as dist

        self.launch = launch
        self._dist = dist
        if not dist.is_initialized():
            # reading a large folder on rank 0 can take long while the others wait for their first message
            dist.init_process_group(backend="gloo", timeout=timedelta(hours=12))
        self.dim: int | None = None
        self.encoder = None
        self.batch_size = 1

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    # -- messages (rank 0 -> all) --
    def _broadcast(self, message: dict | None) -> dict:
        import torch

        if self.launch.is_main:
            payload = np.frombuffer(json.dumps(message).encode("utf-8"), dtype=np.uint8)
            size = torch.tensor([payload.size], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        self._dist.broadcast(size, src=0)
        buf = torch.from_numpy(payload.copy()) if self.launch.is_main else torch.empty(int(size.item()), dtype=torch.uint8)
        self._dist.broadcast(buf, src=0)
        return message if self.launch.is_main else json.loads(buf.numpy().tobytes().decode("utf-8"))

    def _gather(self, vectors: np.ndarray | None, error: str | None, rows: int, dim: int) -> list[tuple[np.ndarray, str]]:
        """Every rank sends ``rows x dim`` floats and an error text; rank 0 gets them all, in rank order."""
        import torch

        block = np.zeros((rows, dim), dtype=np.float32)
        if vectors is not None and error is None:
            block[: len(vectors)] = vectors
        status = np.zeros(_STATUS_BYTES, dtype=np.uint8)
        text = (error or "").encode("utf-8")[: _STATUS_BYTES - 1]
        status[: len(text)] = np.frombuffer(text, dtype=np.uint8)
        main = self.launch.is_main
        vec_list = [torch.empty((rows, dim), dtype=torch.float32) for _ in range(self.world_size)] if main else None
        st_list = [torch.empty(_STATUS_BYTES, dtype=torch.uint8) for _ in range(self.world_size)] if main else None
        self._dist.gather(torch.from_numpy(block), vec_list, dst=0)
        self._dist.gather(torch.from_numpy(status), st_list, dst=0)
        if not main:
            return []
        return [(v.numpy(), s.numpy().tobytes().rstrip(b"\0").decode("utf-8", "replace"))
                for v, s in zip(vec_list, st_list)]

    def _raise_errors(self, answers: list[tuple[np.ndarray, str]]) -> None:
        for r, (_, error) in enumerate(answers):
            if error:
                raise RagenError(f"rank {r} of {self.world_size}: {error}")

    # -- rank 0 --
    def start(self, load: dict, encoder) -> None:
        """Tell the other ranks which encoder to load (each on its own device) and wait until they have it."""
        self.encoder = encoder
        self.dim = int(encoder.dim)
        self._broadcast({"op": "load", **load})
        answers = self._gather(np.full((1, 1), float(self.dim), dtype=np.float32), None, 1, 1)
        self._raise_errors(answers)
        for r, (v, _) in enumerate(answers):
            if int(v[0, 0]) != self.dim:
                raise RagenError(f"rank {r} loaded an encoder of dim {int(v[0, 0])}, rank 0 one of dim {self.dim}")

    def encode(self, batches: list[list[str]], batch_size: int) -> list[np.ndarray]:
        """Rank 0: encode up to ``world_size`` batches, batch ``r`` on rank ``r``; the vectors in batch order."""
        batches = batches + [[] for _ in range(self.world_size - len(batches))]
        self._broadcast({"op": "embed", "batches": batches, "batch_size": batch_size})
        vectors, error = _encode(self.encoder, batches[0], batch_size)
        answers = self._gather(vectors, error, batch_size, self.dim)
        self._raise_errors(answers)
        return [answers[r][0][: len(b)].copy() for r, b in enumerate(batches) if b]

    def stop(self, ok: bool) -> None:
        self._broadcast({"op": "done" if ok else "abort"})

    # -- other ranks --
    def serve(self, load_encoder, device: str | None) -> bool:
        """Rank > 0: load and embed as rank 0 asks until it says done (True) or abort (False)."""
        encoder, dim, load_error = None, 1, None
        while True:
            message = self._broadcast(None)
            op = message.get("op")
            if op == "load":
                opts = {k: v for k, v in message.items() if k != "op"}
                try:
                    encoder = load_encoder(device=device, **opts)
                    dim = int(encoder.dim)
                except RagenError as exc:
                    load_error = str(exc)
                except (OSError, RuntimeError, ValueError) as exc:
                    load_error = f"loading the encoder failed: {type(exc).__name__}: {exc}"
                self._gather(np.full((1, 1), float(dim), dtype=np.float32), load_error, 1, 1)
            elif op == "embed":
                rows = int(message["batch_size"])
                texts = message["batches"][self.launch.rank]
                if load_error is not None or encoder is None:
                    vectors, error = None, load_error or "no encoder loaded"
                else:
                    vectors, error = _encode(encoder, texts, rows)
                self._gather(vectors, error, rows, dim)
            else:
                return op == "done"

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


def _encode(encoder, texts: list[str], batch_size: int) -> tuple[np.ndarray | None, str | None]:
    if not texts:
        return None, None
    try:
        vectors = np.asarray(encoder.encode_documents(texts, batch_size=batch_size, normalize=True), dtype=np.float32)
    except RagenError as exc:
        return None, str(exc)
    except (RuntimeError, ValueError, MemoryError) as exc:  # e.g. CUDA out of memory on this rank's device
        logger.error("encoding a batch failed: %s", exc)
        return None, f"encoding failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return vectors, None
