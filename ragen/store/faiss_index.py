"""FAISS index construction and search settings (CPU, GPU when faiss has one): index configuration,
building a base or delta index, moving it to a GPU, search parameters that skip deleted rows."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ..errors import StoreError

logger = logging.getLogger(__name__)


INDEX_KINDS = ("flat", "hnsw", "ivf")


GPU_MAX_K = 2048  # faiss GPU k-selection limit


@dataclass(frozen=True)
class IndexConfig:
    """Which FAISS index to build. ``flat`` is exact; ``hnsw`` and ``ivf`` trade recall for speed.

    ``ivf_nlist=None`` picks ``4 * sqrt(n)`` lists (at least 39 training points per list, as faiss
    wants); an IVF index over too few vectors for two lists is built flat instead.
    """

    kind: str = "flat"
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 128
    ivf_nlist: int | None = None
    ivf_nprobe: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in INDEX_KINDS:
            raise StoreError(f"unknown index type {self.kind!r}; expected one of: {', '.join(INDEX_KINDS)}")
        for name in ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "ivf_nprobe", "ivf_nlist"):
            value = getattr(self, name)
            if value is None and name == "ivf_nlist":
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise StoreError(f"{name} must be an integer, got {value!r}")
        for name in ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "ivf_nprobe"):
            if getattr(self, name) < 1:
                raise StoreError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ivf_nlist is not None and self.ivf_nlist < 1:
            raise StoreError(f"ivf_nlist must be >= 1, got {self.ivf_nlist}")

    @classmethod
    def from_dict(cls, data: dict) -> IndexConfig:
        if not isinstance(data, dict):
            raise StoreError(f"index settings must be a JSON object, got {type(data).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


_GPU_RESOURCES = None


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    import faiss

    return hasattr(faiss, "StandardGpuResources") and getattr(faiss, "get_num_gpus", lambda: 0)() > 0


def _gpu_resources():
    """One ``StandardGpuResources`` per process: it owns scratch memory and streams, so share it."""
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        import faiss

        _GPU_RESOURCES = faiss.StandardGpuResources()
    return _GPU_RESOURCES


def _resolve_search_device(device: str | None, kind: str) -> int | None:
    """GPU number to search on, or None for CPU. HNSW has no faiss GPU implementation: always CPU."""
    if device is None or device == "auto":
        return 0 if kind != "hnsw" and gpu_available() else None
    if device == "cpu":
        return None
    if device.startswith("cuda"):
        if not gpu_available():
            raise StoreError(f"device {device!r} was requested but faiss has no GPU support or sees no GPU "
                             "(install faiss-gpu, or use --device cpu)")
        if kind == "hnsw":
            logger.info("HNSW indexes search on the CPU (faiss has no GPU HNSW)")
            return None
        _, _, num = device.partition(":")
        return int(num) if num.isdigit() else 0
    raise StoreError(f"unknown device {device!r}; expected cpu, cuda or cuda:N")


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


def empty_faiss_index(n: int, dim: int, config: IndexConfig, *, sample: np.ndarray | None = None,
                      centroids: np.ndarray | None = None, with_ids: bool = False):
    """An empty CPU index, ready for ``n`` vectors, and the kind actually built (IVF falls back to flat on
    tiny sets). IVF is trained on ``sample`` unless ``centroids`` (a quantizer trained before) fit.
    ``with_ids``: the index returns the ids given to ``add_with_ids`` (IVF natively, others id-mapped)."""
    import faiss

    kind = config.kind
    nlist = ivf_lists(n, config) if kind == "ivf" else 0
    if kind == "ivf" and not nlist:
        logger.info("IVF needs at least 78 vectors; %d vectors are indexed flat (exact)", n)
        kind = "flat"
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.hnsw_ef_construction
        index.hnsw.efSearch = config.hnsw_ef_search
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
    if with_ids and kind != "ivf":
        index = faiss.IndexIDMap(index)
    return index, kind


def ivf_sample_size(n: int, config: IndexConfig) -> int:
    """How many vectors IVF trains on: at most 256 per list (faiss would subsample beyond that)."""
    return min(n, 256 * ivf_lists(n, config)) if config.kind == "ivf" else 0


def build_faiss_index(vectors: np.ndarray, config: IndexConfig, *, seed: int = 0, ids: np.ndarray | None = None,
                      centroids: np.ndarray | None = None):
    """A CPU FAISS index over (already normalised) ``vectors`` for inner-product search; returns
    ``(index, kind)`` where ``kind`` is what was actually built (IVF falls back to flat on tiny sets).
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
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = config.hnsw_ef_search
    elif isinstance(inner, faiss.IndexIVF):
        inner.nprobe = min(config.ivf_nprobe, inner.nlist)


def _search_params(index, config: IndexConfig, removed: np.ndarray | None):
    """faiss search parameters that skip ``removed`` row ids (None when nothing is removed)."""
    import faiss

    if removed is None or not len(removed):
        return None
    selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(removed))
    inner = faiss.downcast_index(index)
    if isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexIVF):
        params = faiss.SearchParametersIVF(sel=selector, nprobe=min(config.ivf_nprobe, inner.nlist))
    elif isinstance(inner, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=config.hnsw_ef_search)
    else:
        params = faiss.SearchParameters(sel=selector)
    params._ragen_refs = (selector, removed)  # the C++ objects must outlive the parameters
    return params

