"""Skip-Cache: the frozen backbone's features of each training window, computed once.

Skip2-LoRA's backbone is frozen and deterministic, so the features it hands the head (each
chosen block's output and the final norm's) are identical in every epoch for a given window
(Matsutani et al. 2025, §"Skip-Cache"). The first visit of a window runs the backbone and stores
them; every later visit reads them back and the backbone does not run at all.

Storage is picked by budget, in the configured order: the training GPU, CPU RAM, or a disk
memmap (which also outlives the process: a resumed run reuses it). A fingerprint of the backbone
weights, the training tokens, the window length, the block indices and the storage dtype names
the cache; a stored cache with another fingerprint is rebuilt, never read.

    entry n (one training window):  features[n] = (K+1, T, C)  =  [h_i for the K chosen blocks] + [norm(h_L-1)]
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from legolm.errors import ConfigError
from legolm.utils.io import atomic_write_text

Storage = Literal["gpu", "cpu", "disk"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MANIFEST, DATA, FILLED = "manifest.json", "features.bin", "filled.npy"


@dataclass
class SkipCacheConfig:
    """Whether and where the backbone features are cached.

    Attributes:
        enabled: Cache features in the first epoch and skip the backbone afterwards.
        storage: Allowed storages in order of preference (gpu, cpu, disk).
        gpu_budget_mb: Most MiB the cache may take on the training GPU.
        cpu_budget_mb: Most MiB the cache may take in CPU RAM.
        disk_budget_mb: Most MiB the cache may take on disk.
        dir: Directory of the disk cache (None: <LEGOLM_CACHE>/skip_cache/<fingerprint>).
        dtype: Storage dtype of the features (bfloat16 halves the size; float32 is exact).
    """

    enabled: bool = True
    storage: list[str] = field(default_factory=lambda: ["gpu", "cpu", "disk"])
    gpu_budget_mb: float = 8192.0
    cpu_budget_mb: float = 8192.0
    disk_budget_mb: float = 65536.0
    dir: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"

    def validate(self) -> None:
        bad = sorted(set(self.storage) - {"gpu", "cpu", "disk"})
        if bad or not self.storage:
            raise ConfigError(f"skip_cache.storage must list gpu / cpu / disk, got {self.storage}")
        if min(self.gpu_budget_mb, self.cpu_budget_mb, self.disk_budget_mb) < 0:
            raise ConfigError("skip_cache budgets must be >= 0 MiB")


def cache_nbytes(n_windows: int, n_features: int, window: int, width: int, dtype: torch.dtype) -> int:
    """Bytes of ``n_windows`` entries of (n_features, window, width) features."""
    return n_windows * n_features * window * width * dtype.itemsize


def choose_storage(config: SkipCacheConfig, nbytes: int, device: torch.device, disk_dir: Path) -> Storage:
    """The first allowed storage whose budget (and, on disk, free space) holds ``nbytes``."""
    mib = nbytes / 2**20
    for kind in config.storage:
        if kind == "gpu" and device.type == "cuda" and mib <= config.gpu_budget_mb:
            return "gpu"
        if kind == "cpu" and mib <= config.cpu_budget_mb:
            return "cpu"
        if kind == "disk" and mib <= config.disk_budget_mb:
            disk_dir.mkdir(parents=True, exist_ok=True)
            if nbytes <= shutil.disk_usage(disk_dir).free:
                return "disk"
    raise ConfigError(f"the Skip-Cache needs {mib:,.1f} MiB and fits none of the allowed storages {config.storage} "
                      f"(budgets: gpu {config.gpu_budget_mb:,.0f}, cpu {config.cpu_budget_mb:,.0f}, disk "
                      f"{config.disk_budget_mb:,.0f} MiB); raise a budget, allow disk, store bfloat16, or turn "
                      "the cache off with --no-skip-cache.enabled")


def fingerprint(backbone: torch.nn.Module, tokens: np.ndarray, window: int, indices: list[int],
                dtype: torch.dtype, tap_norm: str) -> str:
    """A hash of everything the cached features depend on."""
    h = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        if "lora_" in name:  # the head LoRA trains; the features never read it
            continue
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(np.ascontiguousarray(tokens).tobytes())
    h.update(json.dumps({"window": window, "indices": indices, "dtype": str(dtype), "tap_norm": tap_norm}).encode())
    return h.hexdigest()


class SkipCache:
    """Features of every training window, filled on first visit.

    Args:
        n_windows: Training windows (sample ids 0..n_windows-1).
        n_features: K+1 (chosen blocks plus the final norm).
        window: Tokens per window T.
        width: n_embd C.
        dtype: Storage dtype.
        storage: gpu, cpu or disk (see `choose_storage`).
        device: The training device (gpu storage lives there).
        key: The `fingerprint`; a disk cache with the same key is reused.
        disk_dir: Directory of a disk cache.
    """

    def __init__(self, n_windows: int, n_features: int, window: int, width: int, dtype: torch.dtype,
                 storage: Storage, device: torch.device, key: str, disk_dir: Path | None = None) -> None:
        self.shape = (n_windows, n_features, window, width)
        self.dtype, self.storage, self.key, self.disk_dir = dtype, storage, key, disk_dir
        self.reused = False
        self._raw: np.memmap | None = None
        if storage == "disk":
            assert disk_dir is not None
            self.data, self.filled = self._open_disk(disk_dir)
        else:
            where = device if storage == "gpu" else torch.device("cpu")
            self.data = torch.empty(self.shape, dtype=dtype, device=where)
            self.filled = torch.zeros(n_windows, dtype=torch.bool)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def _open_disk(self, d: Path) -> tuple[Tensor, Tensor]:
        """Map features.bin (reusing it when its manifest names the same key and shape)."""
        manifest = {"key": self.key, "shape": list(self.shape), "dtype": str(self.dtype)}
        same = (d / MANIFEST).is_file() and json.loads((d / MANIFEST).read_text()) == manifest
        if not same:
            for name in (MANIFEST, FILLED, DATA):
                (d / name).unlink(missing_ok=True)
        d.mkdir(parents=True, exist_ok=True)
        raw = np.memmap(d / DATA, dtype=np.uint8, mode="r+" if same else "w+",
                        shape=(int(np.prod(self.shape)) * self.dtype.itemsize,))
        self._raw = raw
        data = torch.from_numpy(raw).view(self.dtype).view(self.shape)
        filled = torch.from_numpy(np.load(d / FILLED)) if same and (d / FILLED).is_file() else \
            torch.zeros(self.shape[0], dtype=torch.bool)
        self.reused = same and bool(filled.any())
        atomic_write_text(d / MANIFEST, json.dumps(manifest))
        return data, filled

    def missing(self, sample_ids: Tensor) -> Tensor:
        """(B,) True where a window's features are not stored yet (a host tensor).

        Once every window is stored, the answer is known without reading the ids: ids already on the
        GPU are not copied back, so a cached step never waits for the device.
        """
        if bool(self.filled.all()):  # a host tensor: no device read
            return torch.zeros(sample_ids.shape[0], dtype=torch.bool)
        return ~self.filled[sample_ids.cpu()]

    def get(self, sample_ids: Tensor, device: torch.device) -> Tensor:
        """Stored features (B, K+1, T, C) of these windows, on ``device``."""
        rows = self.data[sample_ids.to(self.data.device)]
        if rows.device.type == "cpu" and device.type == "cuda":
            rows = rows.pin_memory()  # an asynchronous host-to-GPU copy
        return rows.to(device, non_blocking=True)

    def put(self, sample_ids: Tensor, features: Tensor) -> None:
        ids = sample_ids.to(self.data.device)
        self.data[ids] = features.to(self.data.device, self.dtype)
        self.filled[sample_ids.cpu()] = True

    def flush(self) -> None:
        """Make a disk cache durable: the features first, then the flags saying which are stored."""
        if self._raw is None or self.disk_dir is None:
            return
        self._raw.flush()  # torch shares numpy's mapping
        tmp = self.disk_dir / f".{FILLED}.tmp.npy"
        np.save(tmp, self.filled.numpy())
        tmp.replace(self.disk_dir / FILLED)

