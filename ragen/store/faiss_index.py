"""FAISS index construction and search settings (CPU, GPU when faiss has one): index configuration,
building a base or delta index, moving it to a GPU, search parameters that skip deleted rows."""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np

from ..errors import StoreError

logger = logging.getLogger(__name__)


INDEX_KINDS = ("auto", "flat", "hnsw", "ivf", "ivfpq")
BUILT_KINDS = ("flat", "hnsw", "ivf", "ivfpq")  # what ``auto`` resolves to (and what a manifest records)


# ``auto``: exact flat search up to AUTO_FLAT_MAX vectors, IVF (full vectors, approximate lists) up to
# AUTO_IVF_MAX, then IVF-PQ (compressed codes, a few dozen bytes per vector). Re-chosen at every base build.
AUTO_FLAT_MAX = 100_000
AUTO_IVF_MAX = 1_000_000
PQ_NBITS = 8
PQ_MIN_VECTORS = 39 * (1 << PQ_NBITS)  # faiss wants 39 training points per PQ centroid
IVF_TRAIN_MAX = 500_000  # vectors an IVF/IVF-PQ trains on at most (k-means never sees all 10M)
PQ_RERANK = 10  # IVF-PQ: fetch k * PQ_RERANK candidates by code, re-rank them by their exact vectors


GPU_MAX_K = 2048  # faiss GPU k-selection limit


@dataclass(frozen=True)
class IndexConfig:
    """Which FAISS index to build. ``flat`` is exact; ``hnsw`` and ``ivf`` trade recall for speed.

    ``ivf_nlist=None`` picks ``4 * sqrt(n)`` lists (at least 39 training points per list, as faiss
    wants); an IVF index over too few vectors for two lists is built flat instead. ``ivfpq`` stores
    ``pq_m`` bytes per vector (``None``: ``dim / 4``, rounded to a divisor of dim), optionally behind an
    OPQ rotation (``opq``); over fewer than ``PQ_MIN_VECTORS`` vectors it is built IVF instead.
    ``auto`` picks flat, IVF or IVF-PQ by the number of vectors (:func:`resolve_kind`).
    """

    kind: str = "flat"
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 128
    ivf_nlist: int | None = None
    ivf_nprobe: int = 32
    pq_m: int | None = None
    opq: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in INDEX_KINDS:
            raise StoreError(f"unknown index type {self.kind!r}; expected one of: {', '.join(INDEX_KINDS)}")
        for name in ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "ivf_nprobe", "ivf_nlist", "pq_m"):
            value = getattr(self, name)
            if value is None and name in ("ivf_nlist", "pq_m"):
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise StoreError(f"{name} must be an integer, got {value!r}")
        for name in ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "ivf_nprobe"):
            if getattr(self, name) < 1:
                raise StoreError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ivf_nlist is not None and self.ivf_nlist < 1:
            raise StoreError(f"ivf_nlist must be >= 1, got {self.ivf_nlist}")
        if self.pq_m is not None and self.pq_m < 1:
            raise StoreError(f"pq_m must be >= 1, got {self.pq_m}")
        if not isinstance(self.opq, bool):
            raise StoreError(f"opq must be true or false, got {self.opq!r}")

    @classmethod
    def from_dict(cls, data: dict) -> IndexConfig:
        if not isinstance(data, dict):
            raise StoreError(f"index settings must be a JSON object, got {type(data).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


_GPU_RESOURCES = None


def faiss_distributions() -> list[tuple[str, str]]:
    """``(name, version)`` of every installed distribution that ships the ``faiss`` module (faiss-cpu,
    faiss-gpu, faiss-gpu-cu12, ...), found by the files they install, not by their names."""
    try:
        from importlib import metadata
    except ImportError:  # a stripped or unreadable standard library: nothing to inspect
        return []
    found = {}
    try:
        for dist in metadata.distributions():
            name = (dist.metadata.get("Name") or "").lower().replace("_", "-")
            if not name.startswith("faiss"):
                continue
            top = (dist.read_text("top_level.txt") or "").split()
            files = dist.files or ()
            if "faiss" in top or any(str(f).replace("\\", "/").startswith("faiss/") for f in files):
                found[name] = dist.version
    except OSError as exc:  # site-packages this user cannot read
        logger.debug("cannot list the installed distributions: %s", exc)
    return sorted(found.items())


@functools.lru_cache(maxsize=1)
def check_faiss() -> str:
    """Import faiss once, and refuse an environment where two faiss distributions overwrite each other's
    ``faiss`` module (faiss-cpu plus a faiss-gpu wheel: ``import faiss`` then breaks in odd ways).
    Returns the faiss version."""
    dists = faiss_distributions()
    if len(dists) > 1:
        names = ", ".join(f"{n} {v}" for n, v in dists)
        others = " ".join(n for n, _ in dists if n != "faiss-cpu") or dists[-1][0]
        raise StoreError(f"{len(dists)} faiss distributions are installed ({names}) and each ships the `faiss` "
                         f"module; keep exactly one: `pip uninstall -y {others}` (CPU) or "
                         f"`pip uninstall -y faiss-cpu {others} && pip install faiss-gpu` (GPU)")
    try:
        import faiss
    except ImportError as exc:
        hint = "pip install faiss-cpu" if not dists else f"reinstall {dists[0][0]}"
        raise StoreError(f"cannot import faiss ({exc}); {hint}") from None
    return str(getattr(faiss, "__version__", "unknown"))


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    check_faiss()
    import faiss

    return hasattr(faiss, "StandardGpuResources") and getattr(faiss, "get_num_gpus", lambda: 0)() > 0


def _gpu_resources():
    """One ``StandardGpuResources`` per process: it owns scratch memory and streams, so share it."""
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        import faiss

        _GPU_RESOURCES = faiss.StandardGpuResources()
    return _GPU_RESOURCES


def _torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return False
    return bool(torch.cuda.is_available())


def _torch_device_for(device: str) -> str:
    """The torch device a ``cuda[:N]`` request searches on (a hook the CPU tests point at ``cpu``)."""
    return device if ":" in device else "cuda:0"


def _resolve_search_device(device: str | None, kind: str):
    """Where to search: None (faiss on the CPU), a GPU number (faiss-gpu), or ``"torch:<device>"`` (exact
    search of a flat index on torch's CUDA when faiss has no GPU build). HNSW has no faiss GPU
    implementation; IVF/IVF-PQ without faiss-gpu stay on the CPU."""
    if device is None or device == "auto":
        if kind == "hnsw":
            return None
        if gpu_available():
            return 0
        if kind == "flat" and _torch_cuda_available():
            return "torch:" + _torch_device_for("cuda")
        return None
    if device == "cpu":
        return None
    if device.startswith("cuda"):
        _, _, num = device.partition(":")
        if kind == "hnsw":
            logger.info("HNSW indexes search on the CPU (faiss has no GPU HNSW)")
            return None
        if gpu_available():
            return int(num) if num.isdigit() else 0
        if kind == "flat" and _torch_cuda_available():
            return "torch:" + _torch_device_for(device)
        if kind == "flat":
            raise StoreError(f"device {device!r} was requested but neither torch nor faiss sees a GPU; use --device cpu")
        raise StoreError(f"device {device!r} was requested for a {kind} index but faiss has no GPU support or sees no "
                         "GPU (torch searches flat indexes only); use --device cpu, or replace faiss-cpu by the CUDA "
                         "12 build: `pip uninstall -y faiss-cpu && pip install faiss-gpu`")
    raise StoreError(f"unknown device {device!r}; expected cpu, cuda or cuda:N")


class TorchFlat:
    """Exact inner-product search of one flat segment with torch (on a GPU when faiss has none): the
    vectors as one tensor, deleted rows masked out, results mapped to row ids like faiss does."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray, removed: np.ndarray | None, device: str) -> None:
        import torch

        self.device = torch.device(device)
        self.vectors = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(self.device)
        self.ids = np.asarray(ids, dtype=np.int64)
        self._set_removed(removed)

    def with_removed(self, removed: np.ndarray | None) -> TorchFlat:
        """The same tensor with another set of deleted rows (a later generation's tombstones)."""
        import copy

        other = copy.copy(self)
        other._set_removed(removed)
        return other

    def _set_removed(self, removed: np.ndarray | None) -> None:
        import torch

        self.mask = None
        dead = np.zeros(len(self.ids), dtype=bool)
        if removed is not None and len(removed):
            dead = np.isin(self.ids, removed)
            if dead.any():
                self.mask = torch.from_numpy(dead).to(self.device)
        self.live = int(len(self.ids) - int(dead.sum()))

    @classmethod
    def from_index(cls, index, ids: np.ndarray | None, removed: np.ndarray | None, device: str) -> TorchFlat:
        import faiss

        inner = faiss.downcast_index(index)
        if isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            ids = faiss.vector_to_array(inner.id_map).astype(np.int64)
            inner = faiss.downcast_index(inner.index)
        if not isinstance(inner, faiss.IndexFlat):
            raise StoreError(f"torch searches flat indexes only, not {type(inner).__name__}")
        vectors = inner.reconstruct_n(0, inner.ntotal) if inner.ntotal else np.zeros((0, inner.d), np.float32)
        if ids is None:
            ids = np.arange(inner.ntotal, dtype=np.int64)
        return cls(vectors, ids, removed, device)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        k = min(k, self.live)
        if k <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        with torch.no_grad():
            scores = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)).to(self.device) @ self.vectors.T
            if self.mask is not None:
                scores.masked_fill_(self.mask, float("-inf"))
            top, pos = torch.topk(scores, k, dim=1)
        return top.cpu().numpy(), self.ids[pos.cpu().numpy()]


def _to_device(seg, gpu: int):
    """``(GPU index, position -> row id array or None)`` for a loaded segment. faiss moves id-mapped
    wrappers to the GPU unevenly across versions, so the inner index goes and the ids are mapped here."""
    import faiss

    inner = faiss.downcast_index(seg.index)
    if isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return to_gpu(faiss.downcast_index(inner.index), gpu), faiss.vector_to_array(inner.id_map).astype(np.int64)
    return to_gpu(seg.index, gpu), seg.ids


def to_gpu(index, gpu: int):
    import faiss

    return faiss.index_cpu_to_gpu(_gpu_resources(), gpu, index)


def to_cpu(index):
    """A CPU copy of a GPU index (what gets written to disk); CPU indexes pass through."""
    import faiss

    return faiss.index_gpu_to_cpu(index) if "Gpu" in type(index).__name__ else index


def normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def ivf_lists(n: int, config: IndexConfig) -> int:
    """The number of IVF lists for ``n`` vectors (``4 * sqrt(n)`` unless set, at least 39 training points
    per list, as faiss wants); 0 when there are too few vectors for two lists (built flat instead)."""
    nlist = min(config.ivf_nlist or int(4 * math.sqrt(max(n, 1))), n // 39)
    return nlist if nlist >= 2 else 0


def pq_subquantizers(dim: int, config: IndexConfig) -> int:
    """Bytes per PQ code: ``pq_m`` when it divides ``dim``, else the largest divisor of ``dim`` not above
    it (default ``dim / 4``: 4 dimensions per byte; at 8 per byte recall@10 after re-ranking fell from 0.97
    to 0.69 in benchmarks/bench_index.py)."""
    want = max(1, min(config.pq_m or max(dim // 4, 1), dim))
    return next(m for m in range(want, 0, -1) if dim % m == 0)


def resolve_kind(n: int, config: IndexConfig) -> str:
    """The index kind built for ``n`` vectors: ``auto`` by size, and the fall-backs for too few vectors
    (IVF-PQ -> IVF below ``PQ_MIN_VECTORS``, IVF -> flat below 78)."""
    kind = config.kind
    if kind == "auto":
        kind = "flat" if n <= AUTO_FLAT_MAX else "ivf" if n <= AUTO_IVF_MAX else "ivfpq"
    if kind == "ivfpq" and n < PQ_MIN_VECTORS:
        kind = "ivf"
    if kind == "ivf" and not ivf_lists(n, config):
        kind = "flat"
    return kind


def bytes_per_vector(kind: str, dim: int, config: IndexConfig) -> int:
    """Memory one vector takes in a FAISS index of ``kind`` (codes, ids, graph links; not counting the
    fixed cost of centroids or codebooks), as ``ragen info`` reports it."""
    if kind == "ivfpq":
        return pq_subquantizers(dim, config) * PQ_NBITS // 8 + 8  # the code, the id in its list
    if kind == "hnsw":
        return 4 * dim + 8 + 2 * config.hnsw_m * 4 + 8  # vector, id map, level-0 links (+ upper levels)
    return 4 * dim + 8  # flat (id-mapped) and IVF lists: the float32 vector and its id


def _train_sample_size(n: int, kind: str, config: IndexConfig) -> int:
    if kind not in ("ivf", "ivfpq"):
        return 0
    nlist = ivf_lists(n, config)
    size = min(n, 64 * nlist, max(40 * nlist, IVF_TRAIN_MAX))
    if kind == "ivfpq":
        size = max(size, min(n, 64 * (1 << PQ_NBITS)))  # PQ codebooks want a few thousand points too
    return size


def reserve(index, n: int) -> None:
    """Give an empty id-mapped flat index room for ``n`` vectors up front, so that adding them batch by batch
    never reallocates (a growing buffer briefly holds the old and the new copy: 1.57x the vectors at
    100k x 384 against 1.17x with the room reserved). Other kinds keep their own storage; a no-op there."""
    import faiss

    if n <= 0 or not isinstance(index, faiss.IndexIDMap) or index.ntotal:
        return
    inner = faiss.downcast_index(index.index)
    if not isinstance(inner, faiss.IndexFlatCodes):
        return
    inner.codes.resize(n * inner.code_size)  # std::vector: shrinking back keeps the capacity
    inner.codes.resize(0)
    index.id_map.resize(n)
    index.id_map.resize(0)


def empty_faiss_index(n: int, dim: int, config: IndexConfig, *, sample: np.ndarray | None = None,
                      centroids: np.ndarray | None = None, trained: bytes | None = None, with_ids: bool = False):
    """An empty CPU index, ready for ``n`` vectors, and the kind actually built (:func:`resolve_kind`).
    IVF is trained on ``sample`` unless ``centroids`` (a quantizer trained before) fit; IVF-PQ likewise
    reuses ``trained`` (a serialised trained empty index) when its shape still fits.
    ``with_ids``: the index returns the ids given to ``add_with_ids`` (IVF natively, others id-mapped)."""
    import faiss

    kind = resolve_kind(n, config)
    nlist = ivf_lists(n, config) if kind in ("ivf", "ivfpq") else 0
    if config.kind in ("ivf", "ivfpq") and kind == "flat":
        logger.info("IVF needs at least 78 vectors; %d vectors are indexed flat (exact)", n)
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.hnsw_ef_construction
        index.hnsw.efSearch = config.hnsw_ef_search
    elif kind == "ivfpq":
        index = _reuse_trained(trained, dim, config, n)
        if index is None:
            if sample is None or len(sample) < max(nlist, 1 << PQ_NBITS):
                raise ValueError("an IVF-PQ index needs a training sample of at least nlist and 256 vectors")
            m = pq_subquantizers(dim, config)
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, PQ_NBITS, faiss.METRIC_INNER_PRODUCT)
            index.by_residual = True
            if config.opq:
                index = faiss.IndexPreTransform(faiss.OPQMatrix(dim, m), index)
            index.train(np.ascontiguousarray(sample, dtype=np.float32))  # the wrappers keep their parts alive
        _ivf_of(index).nprobe = min(config.ivf_nprobe, _ivf_of(index).nlist)
    elif centroids is not None and len(centroids) >= 2 and n >= 39 * len(centroids):
        quantizer = faiss.IndexFlatIP(dim)
        quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
        index = faiss.IndexIVFFlat(quantizer, dim, len(centroids), faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(config.ivf_nprobe, len(centroids))
    else:
        if sample is None or len(sample) < nlist:
            raise ValueError("an IVF index needs a training sample of at least nlist vectors")
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(np.ascontiguousarray(sample, dtype=np.float32))  # the wrapper keeps `quantizer` alive
        index.nprobe = min(config.ivf_nprobe, nlist)
    if with_ids and kind not in ("ivf", "ivfpq"):
        index = faiss.IndexIDMap(index)
    return index, kind


def _ivf_of(index):
    """The IndexIVF inside ``index`` (through an OPQ pre-transform or an id map), or None."""
    import faiss

    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        inner = faiss.downcast_index(inner.index)
    return inner if isinstance(inner, faiss.IndexIVF) else None


def serialize_trained(index) -> bytes | None:
    """The trained, emptied IVF-PQ index (OPQ rotation, coarse centroids, PQ codebooks) as bytes, to be
    reused by the next base build instead of training again; None for other kinds."""
    import faiss

    ivf = _ivf_of(index)
    if ivf is None or not isinstance(ivf, faiss.IndexIVFPQ):
        return None
    empty = faiss.clone_index(index)
    empty.reset()
    return faiss.serialize_index(empty).tobytes()


def _reuse_trained(trained: bytes | None, dim: int, config: IndexConfig, n: int):
    import faiss

    if not trained:
        return None
    try:
        index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    except RuntimeError as exc:
        logger.info("the recorded IVF-PQ training does not load (%s); training again", str(exc).splitlines()[0])
        return None
    ivf = _ivf_of(index)
    if (index.d != dim or not isinstance(ivf, faiss.IndexIVFPQ) or ivf.pq.M != pq_subquantizers(dim, config)
            or (config.ivf_nlist is not None and ivf.nlist != config.ivf_nlist)
            or (config.ivf_nlist is None and ivf.nlist < ivf_lists(n, config) // 2)  # the corpus outgrew it
            or isinstance(faiss.downcast_index(index), faiss.IndexPreTransform) != config.opq
            or n < 39 * ivf.nlist or index.ntotal):
        return None
    return index


def is_pq(index) -> bool:
    """Whether ``index`` scores by compressed codes (IVF-PQ, with or without OPQ): its scores are
    approximations, so the store re-ranks its candidates exactly (:func:`rerank_exact`)."""
    import faiss

    return isinstance(_ivf_of(index), faiss.IndexIVFPQ)


def rerank_exact(q: np.ndarray, candidates: np.ndarray, vectors: dict[int, np.ndarray],
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of each query's candidate ids (-1 = none) by exact inner product with ``vectors``
    (id -> normalised vector); candidates without a vector are dropped. Returns ``(scores, ids)``."""
    n = len(q)
    scores = np.full((n, k), -np.inf, np.float32)
    ids = np.full((n, k), -1, np.int64)
    for i in range(n):
        row = [int(c) for c in dict.fromkeys(candidates[i].tolist()) if c >= 0 and int(c) in vectors]
        if not row:
            continue
        exact = np.stack([vectors[c] for c in row]) @ q[i]
        best = np.argsort(-exact, kind="stable")[:k]
        scores[i, :len(best)] = exact[best]
        ids[i, :len(best)] = np.asarray(row, np.int64)[best]
    return scores, ids


def ivf_sample_size(n: int, config: IndexConfig) -> int:
    """How many vectors IVF / IVF-PQ trains on: 64 per list (faiss wants at least 39), and at most
    ``IVF_TRAIN_MAX`` beyond 40 per list, so 10M vectors never all go through k-means."""
    return _train_sample_size(n, resolve_kind(n, config), config)


def build_faiss_index(vectors: np.ndarray, config: IndexConfig, *, seed: int = 0, ids: np.ndarray | None = None,
                      centroids: np.ndarray | None = None):
    """A CPU FAISS index over (already normalised) ``vectors`` for inner-product search; returns
    ``(index, kind)`` where ``kind`` is what was actually built (:func:`resolve_kind`).
    With ``ids`` the index returns those ids instead of positions (IVF natively, others id-mapped).
    ``centroids``: an IVF quantizer trained before (kept across compactions: no k-means again)."""
    n, dim = vectors.shape
    sample = None
    m = ivf_sample_size(n, config)
    if m:
        sample = vectors
        if n > m:  # deterministic and quiet, where faiss would subsample itself
            sample = vectors[np.sort(np.random.default_rng(seed).choice(n, m, replace=False))]
    index, kind = empty_faiss_index(n, dim, config, sample=sample, centroids=centroids, with_ids=ids is not None)
    if n:
        if ids is not None:
            index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
        else:
            index.add(vectors)
    return index, kind


def _apply_search_params(index, config: IndexConfig) -> None:
    import faiss

    inner = faiss.downcast_index(index)
    if isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        inner = faiss.downcast_index(inner.index)
    ivf = _ivf_of(index)
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = config.hnsw_ef_search
    elif ivf is not None:
        ivf.nprobe = min(config.ivf_nprobe, ivf.nlist)


def _search_params(index, config: IndexConfig, removed: np.ndarray | None):
    """faiss search parameters that skip ``removed`` row ids (None when nothing is removed)."""
    import faiss

    if removed is None or not len(removed):
        return None
    selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(removed))
    inner = faiss.downcast_index(index)
    if isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        inner = faiss.downcast_index(inner.index)
    ivf = _ivf_of(index)
    if ivf is not None:
        params = faiss.SearchParametersIVF(sel=selector, nprobe=min(config.ivf_nprobe, ivf.nlist))
    elif isinstance(inner, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=config.hnsw_ef_search)
    else:
        params = faiss.SearchParameters(sel=selector)
    if isinstance(faiss.downcast_index(index), faiss.IndexPreTransform):  # OPQ: the IVF parameters go inside
        outer = faiss.SearchParametersPreTransform()
        outer.index_params = params
        outer._ragen_refs = (selector, removed, params)
        return outer
    params._ragen_refs = (selector, removed)  # the C++ objects must outlive the parameters
    return params

