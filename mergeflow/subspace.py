"""Per-layer spectral building blocks of the subspace methods (TSV-M, Iso-C, Iso-CTS, DOGE): truncated singular
triplets, polar factors and the subspace sizes the reference code uses.

Singular triplets come from the eigendecomposition of the min(m, n)-sized Gram matrix in float64: exact to fp32
rounding (LAPACK's fp32 thin SVD loses ~1e-4 on the trailing vectors of a gapless spectrum); all the triplets of
a 768 x 768 matrix come as fast as from that SVD, of a 3072 x 768 one 1.4x faster (2 cores, 2026-12-04). Where a
kept singular value is numerically zero (a rank-deficient layer), the null-space vectors are arbitrary in every
implementation; there the float64 SVD is used.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mergeflow import stopping

_RANK_TOLERANCE = 1e-12  # an eigenvalue of the Gram below this fraction of the largest counts as zero


def top_singular(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-`k` singular triplets (u [m, k], s [k], vh [k, n]) of `matrix` [m, n], fp32, s descending."""
    m, n = matrix.shape
    k = min(k, m, n)
    a = matrix.double()
    values, vectors = _top_eigenpairs(a @ a.mT if m <= n else a.mT @ a, k)
    if k and values[-1] <= _RANK_TOLERANCE * values[0].clamp(min=torch.finfo(torch.float64).tiny):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :k].float(), s[:k].float(), vh[:k].float()
    s = values.sqrt()
    if m <= n:
        return vectors.float(), s.float(), (vectors.mT @ a / s[:, None]).float()
    return (a @ vectors / s).float(), s.float(), vectors.mT.float().contiguous()


def _top_eigenpairs(gram: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` largest eigenvalues (descending) and their eigenvectors [n, k] of a symmetric float64 matrix, from
    torch's full decomposition. (scipy's MRRR driver computes only the top k, 1.4x faster measured alone at
    n = 768, but its OpenBLAS threads keep spinning after each call and slow the torch products that follow: a
    TSV-M layer's factors took 1.5x longer with it; `python benchmarks/eigh_speed.py`.)"""
    n = gram.shape[0]
    values, vectors = torch.linalg.eigh(gram)
    return values[n - k:].flip(-1), vectors[:, n - k:].flip(-1)


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P of `matrix` [m, n] (= U V^T of its thin SVD; the closest matrix with
    orthonormal columns, or rows when m < n). Falls back to the fp32 SVD when the matrix is rank-deficient, where
    the factor is not unique."""
    m, n = matrix.shape
    a = matrix.double()
    tall = m >= n
    values, vectors = torch.linalg.eigh(a.mT @ a if tall else a @ a.mT)
    if values[0] <= _RANK_TOLERANCE * values[-1].clamp(min=torch.finfo(torch.float64).tiny):
        u, _, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
        return u @ vh
    inverse_root = (vectors / values.sqrt()) @ vectors.mT
    return (a @ inverse_root if tall else inverse_root @ a).float()


def tsv_rank(r: int, tasks: int) -> int:
    """Triplets kept per task by TSV-M (and DOGE's per-task basis): int(r * (1 / T)), as the reference computes
    it (r // T for every practical size)."""
    return int(r * (1 / tasks))


def iso_cts_sizes(r: int, tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common size c, per-task size n_t) of Iso-CTS for rank r: the task-specific total rounded (Python's
    banker's rounding, as the reference) to a multiple of T, so c + T n_t = r."""
    common = int(r * common_fraction)
    task_total = round((r - common) / tasks) * tasks
    common = r - task_total
    return common, int((r - common) / tasks)


def iso_cts_bases(task_vectors: torch.Tensor, common_fraction: float) -> tuple[torch.Tensor, ...]:
    """Iso-CTS's stacked bases of one layer's task vectors [T, m, n], before orthogonalisation: (u [m, r], s [r],
    vh [r, n]) = each task's top n_t triplets of its task vector with the common subspace (the summed task vector's
    top c left singular vectors) projected out, then the c common triplets."""
    tasks, m, n = task_vectors.shape
    r = min(m, n)
    common, per_task = iso_cts_sizes(r, tasks, common_fraction)
    u, s, vh = top_singular(task_vectors.sum(dim=0), r)
    uc = u[:, :common]
    parts = [top_singular(tv - uc @ (uc.mT @ tv), per_task) for tv in task_vectors]
    parts.append((uc, s[:common], vh[:common]))
    return tuple(torch.cat(pieces, dim=dim) for pieces, dim in zip(zip(*parts), (1, 0, 0)))


def assemble_isotropic(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """mean(s) * polar(U) @ polar(Vh): Iso-CTS's update from its stacked bases."""
    return s.mean() * (polar(u) @ polar(vh))


# ------------------------------------------------------------------------------------- stored factors, per layer
#
# A subspace directory holds, for every 2-D float tensor of a set of experts, the factors one kind of consumer
# reads, in safetensors files of about `group_bytes` each (so one part of a merge reads only its layers' file):
#   "task"        each task vector's top int(r/T) triplets: u [T, m, k], s [T, k], vh [T, k, n]   (TSV-M)
#   "sum"         the thin SVD of the summed task vector: u [m, r], s [r], vh [r, n]          (Iso-C, Iso-CTS)
#   "shared-<d>"  DOGE's shared basis q [m, r // d] of the tasks' top r // T left vectors     (DOGE TA)
#   "shared-tasks" the same with d = T, the number of experts                                  (DOGE AM)
#   "cts-<f>"     Iso-CTS's stacked bases for common fraction f (`iso_cts_bases`): u [m, r], s [r], vh [r, n]
# and `index.json`: kind, the experts in order (content digests; names for in-memory sources), the file of each
# layer, and each file's sha256 and size. A stored subspace's digest is its index's sha256: a reader fetches and
# verifies only the files of the layers it reads (a merge part, its own layer groups).

INDEX = "index.json"
FORMAT_VERSION = 2


def check_kind(kind: str) -> str:
    """`kind` if it names a stored factor set, else ValueError."""
    if kind in ("task", "sum", "shared-tasks") or (kind.startswith("shared-") and kind[7:].isdigit()
                                                    and int(kind[7:]) > 0) or _cts_fraction(kind) is not None:
        return kind
    raise ValueError(f"unknown subspace kind {kind!r}: 'task', 'sum', 'shared-<divisor>', 'shared-tasks' or "
                     "'cts-<fraction>'")


def cts_kind(common_fraction: float) -> str:
    """The stored kind of Iso-CTS's bases for this common fraction."""
    return f"cts-{common_fraction:g}"


def _cts_fraction(kind: str) -> float | None:
    if not kind.startswith("cts-"):
        return None
    try:
        fraction = float(kind[4:])
    except ValueError:
        return None
    return fraction if 0.0 < fraction <= 1.0 and cts_kind(fraction) == kind else None


def layer_factors(kind: str, task_vectors: torch.Tensor) -> dict[str, torch.Tensor]:
    """The factors of `kind` for one layer's task vectors [T, m, n]."""
    tasks, m, n = task_vectors.shape
    r = min(m, n)
    if kind == "task":
        triplets = [top_singular(tv, tsv_rank(r, tasks)) for tv in task_vectors]
        return {key: torch.stack(part) for key, part in zip(("u", "s", "vh"), zip(*triplets))}
    if kind == "sum":
        return dict(zip(("u", "s", "vh"), top_singular(task_vectors.sum(dim=0), r)))
    if (fraction := _cts_fraction(kind)) is not None:
        return dict(zip(("u", "s", "vh"), iso_cts_bases(task_vectors, fraction)))
    divisor = tasks if check_kind(kind) == "shared-tasks" else int(kind[7:])
    return {"q": shared_basis(task_vectors, divisor)}


def top_left(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """The top-`k` left singular vectors [m, k] of `matrix` [m, n] (fp32)."""
    return top_singular(matrix, k)[0]


def shared_basis(task_vectors: torch.Tensor, divisor: int) -> torch.Tensor:
    """DOGE's shared subspace Q [m, r // divisor] of one layer's task vectors [T, m, n]: the top left singular
    vectors of [U_1[:, :r//T] | ... | U_T[:, :r//T]]."""
    tasks, m, n = task_vectors.shape
    r = min(m, n)
    per_task = torch.cat([top_left(tv, r // tasks) for tv in task_vectors], dim=1)
    return top_left(per_task, r // divisor)


def write_subspace(pool, kind: str, directory: Path, group_bytes: int = 256_000_000,
                   progress: bool = False) -> dict[str, Any]:
    """Compute the factors of `kind` for every 2-D float tensor of `pool` (an ExpertPool) into `directory`;
    returns the index written."""
    from mergeflow.checkpoints.safetensors_format import save_safetensors
    from mergeflow.progress import progress_bar
    from mergeflow.storage import sha256_file

    check_kind(kind)
    layers = [info.name for info in pool.infos() if info.dtype.is_floating_point and len(info.shape) == 2]
    index: dict[str, Any] = {"format": FORMAT_VERSION, "kind": kind, "experts": expert_identities(pool),
                             "layers": {}}
    group: dict[str, torch.Tensor] = {}

    index["files"] = {}

    def flush() -> None:
        name = f"factors-{len(index['files']) + 1:05d}.safetensors"
        save_safetensors(group, directory / name)
        index["files"][name] = {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
        for key in group:
            index["layers"].setdefault(key.split("::", 1)[0], name)
        group.clear()

    for layer in progress_bar(layers, desc=f"subspace {kind}", disable=not progress):
        stopping.check()
        for key, tensor in layer_factors(kind, pool.task_vectors(layer)).items():
            group[f"{layer}::{key}"] = tensor.to("cpu").contiguous()
        if sum(t.numel() * t.element_size() for t in group.values()) >= group_bytes:
            flush()
    if group:
        flush()
    (directory / INDEX).write_text(json.dumps(index, indent=1))
    return index


def expert_identities(pool) -> list[str]:
    """Who the pool's experts are, in order: each checkpoint's content digest (its label for in-memory sources)."""
    return [getattr(source, "digest", None) or name for source, name in zip(pool.experts, pool.names)]


class SubspaceReader:
    """The stored factors of one subspace, read layer by layer: each factor file is opened, and verified against
    the sha256 its index records, only when a layer in it is first read. `experts` (see `expert_identities`): refuse
    factors of other experts or another order."""

    def __init__(self, directory: str | Path, experts: Sequence[str] | None = None):
        """A local directory written by `write_subspace`."""
        self.directory = Path(directory)
        self._init(json.loads((self.directory / INDEX).read_text()), str(self.directory), self._local_file)
        self.check_experts(experts)

    @classmethod
    def stored(cls, index: dict[str, Any], label: str, open_file: Callable[[str, str], Path],
               experts: Sequence[str] | None = None) -> SubspaceReader:
        """Factors whose `index` was read (and verified) elsewhere; `open_file(name, sha256)` returns a local copy
        of one factor file, verified against that digest (a store fetches it then, and only then)."""
        reader = cls.__new__(cls)
        reader.directory = None
        reader._init(index, label, open_file)
        reader.check_experts(experts)
        return reader

    def _init(self, index: dict[str, Any], label: str, open_file: Callable[[str, str], Path]) -> None:
        if index.get("format") != FORMAT_VERSION or "files" not in index:
            raise ValueError(f"{label}: subspace format {index.get('format')}, this version reads {FORMAT_VERSION} "
                             "(build the subspace again)")
        self.index, self.label, self._open_file = index, label, open_file
        self._files: dict[str, Any] = {}

    def _local_file(self, name: str, sha256: str) -> Path:
        from mergeflow.errors import IntegrityError
        from mergeflow.storage import sha256_file

        path = self.directory / name
        if (found := sha256_file(path)) != sha256:
            raise IntegrityError(f"{path}: sha256 {found} does not match the {sha256} its subspace index records")
        return path

    def check_experts(self, experts: Sequence[str] | None) -> None:
        if experts is not None and list(experts) != self.index["experts"]:
            raise ValueError(f"{self.label}: these factors are of other experts (or another order): "
                             f"{self.index['experts']}, not {list(experts)}")

    @property
    def kind(self) -> str:
        return self.index["kind"]

    def factors(self, layer: str) -> dict[str, torch.Tensor] | None:
        """The factors of `layer`, or None when the subspace has none for it."""
        from safetensors import safe_open

        file = self.index["layers"].get(layer)
        if file is None:
            return None
        if file not in self._files:
            path = self._open_file(file, self.index["files"][file]["sha256"])
            self._files[file] = safe_open(str(path), framework="pt")
        handle = self._files[file]
        prefix = f"{layer}::"
        return {key[len(prefix):]: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)}
