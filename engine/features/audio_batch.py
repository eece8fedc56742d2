"""The 1140 music features of `engine.features.audio`, for a batch of tracks, as tensor ops.

Same steps and layout as `music_features_naive` (the librosa oracle in the tests): decode the
centred 29.12 s at 12 kHz (parallel CPU processes, `load_excerpt`), then on `device` (CUDA
when present): STFT, HPSS by median filtering, inverse STFT, one re-analysis STFT per
component, and every Table I feature derived from it. Filter matrices come from librosa
(mel, chroma, CQT wavelets, CQT-to-chroma) and scipy (DCT, Savitzky-Golay), so the numbers
are librosa's up to float32 rounding; the CQT is librosa's multirate algorithm (one octave
at a time, halving the rate between octaves; each octave's FFT-and-wavelet-spectra product
done as one real matmul on the frames), with a windowed-sinc half-band filter in place of
soxr's, the only deliberate difference.

Where the CPU time goes (one track, one core, 2026-11-28, ~110 ms): decoding 44.1 kHz stereo
Vorbis ~30%, the chroma-CENS CQT ~25% (its matmuls are ~1.4 GFLOP), the tuning estimates,
STFTs and the CQT's rate halving ~10% each; the HPSS medians, once ~25%, are ~4%.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import math
import os
import sys
import warnings
from pathlib import Path

import librosa
import numba
import numpy as np
import scipy.fft
import scipy.signal
import torch

from engine.devices import best_device
from engine.features.audio import (
    DURATION,
    HOP,
    N_FEATURES,
    N_FFT,
    N_MELS,
    N_MFCC,
    SR,
    load_excerpt,
    warm_numba_cache,
)
from engine.files import written_whole
from engine.processes import batches_computed_ahead, using_shared_pool

CQT_BINS_PER_OCTAVE = 36
CQT_OCTAVES = 7
CQT_N_FFT = 512  # librosa's FFT size for these wavelets at every octave
TUNING_STEPS = np.linspace(-0.5, 0.5, 101)  # librosa.pitch_tuning's histogram edges


def music_features_batch(sources, device=None, batch_size: int = 32, workers=None) -> np.ndarray:
    """(n, 1140) float32 music vectors of file paths or `(waveform, sample_rate)` tuples.

    `workers` processes (default: one per CPU; 0 runs everything in this process) decode a
    few batches ahead. On an accelerator this process computes the features, `batch_size`
    tracks at a time. On the CPU each worker computes its own share too, on one thread,
    which keeps every core busy with no thread synchronisation, and one track at a time
    (a track's arrays stay in the core's cache: 4-track batches cost 10% more per track,
    8-track ones 35%); `batch_size` is then the number of tracks handed to a worker at once.
    The workers stay alive for the next call (see `engine.processes.shared_pool`). A row
    does not depend on the rest of its batch.
    """
    device = best_device(device)
    sources = list(sources)
    out = np.empty((len(sources), N_FEATURES), np.float32)
    workers = os.cpu_count() or 1 if workers is None else workers
    if device.type == "cpu" and (workers == 0 or len(sources) <= 1):
        return _cpu_rows(sources) if sources else out
    if device.type == "cpu":
        warm_numba_cache()  # the workers then read numba's cache instead of racing to write it
        size = max(1, min(batch_size, math.ceil(len(sources) / (2 * workers))))
        starts = range(0, len(sources), size)
        chunks = (sources[start : start + size] for start in starts)
        with using_shared_pool(workers) as pool:
            for start, rows in zip(starts, pool.map(_cpu_rows, chunks), strict=True):
                out[start : start + len(rows)] = rows
        return out
    for start, waves in _decoded_batches(sources, batch_size, workers):
        y = torch.from_numpy(waves).to(device)
        out[start : start + len(waves)] = batch_features(y).cpu().numpy()
    return out


def _cpu_rows(sources) -> np.ndarray:
    """Decode and compute track by track, in this process, on the CPU."""
    rows = [batch_features(torch.from_numpy(load_excerpt(s))[None]) for s in sources]
    return torch.cat(rows).numpy()


@contextlib.contextmanager
def one_torch_thread():
    """Run torch's CPU kernels on one thread inside the block."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _decoded_batches(sources, batch_size, workers):
    """`(start, excerpts)`, an array of `batch_size` sources' excerpts at a time, decoded by
    `workers` processes a few batches ahead (0: in this process)."""
    if workers == 0 or len(sources) <= 1:
        for start in range(0, len(sources), batch_size):
            yield start, np.stack([load_excerpt(s) for s in sources[start : start + batch_size]])
    else:
        samples = (int(round(DURATION * SR)),)
        yield from batches_computed_ahead(load_excerpt, sources, workers, batch_size, samples)


@torch.no_grad()
def batch_features(y: torch.Tensor) -> torch.Tensor:
    """(B, 349440) excerpts -> (B, 1140): mean, variance and max of the 380 frame features."""
    k = _kernels(y.device)
    y = y.float()
    mix = torch.stft(y, N_FFT, HOP, window=k.hann, return_complex=True, pad_mode="constant")
    parts = torch.stack(_hpss(mix), 1).flatten(0, 1)  # (B*2, F, T): harmonic, percussive
    y2 = _istft(parts, k.hann, y.shape[-1])
    frames = _component_frames(y2, k).unflatten(0, (y.shape[0], 2)).flatten(1, 2)
    mean = frames.mean(-1, keepdim=True)
    variance = (frames - mean).square().mean(-1)  # two passes: 10x faster than torch's var
    return torch.cat([mean[..., 0], variance, frames.amax(-1)], 1)


def _istft(stft: torch.Tensor, window: torch.Tensor, length: int) -> torch.Tensor:
    """torch.istft(stft, N_FFT, HOP, window, center=True, length=length), written out for
    a hop of half the window: each output block of HOP samples is the second half of one
    frame plus the first half of the next (torch's general overlap-add is 4x slower)."""
    frames = torch.fft.irfft(stft, N_FFT, dim=-2) * window[:, None]  # (C, N_FFT, T)
    first, second = frames[..., :HOP, :].mT, frames[..., HOP:, :].mT  # (C, T, HOP)
    blocks = torch.nn.functional.pad(first, (0, 0, 0, 1)) + torch.nn.functional.pad(
        second, (0, 0, 1, 0)
    )
    squared = window**2
    envelope = torch.zeros(blocks.shape[-2:], device=stft.device)
    envelope[:-1] += squared[:HOP]
    envelope[1:] += squared[HOP:]
    envelope = torch.where(envelope > 1e-11, envelope, 1.0)
    y = (blocks / envelope).flatten(-2)
    return y[..., N_FFT // 2 : N_FFT // 2 + length]


def _power(z: torch.Tensor) -> torch.Tensor:
    """|z|**2 of a complex tensor (torch's complex abs is several times slower on the CPU)."""
    if z.device.type == "cpu":  # the STFT's own (frame, bin) layout, in one pass
        return torch.from_numpy(_power_cpu(z.mT.contiguous().numpy())).mT
    return z.real**2 + z.imag**2


@numba.njit(cache=True, nogil=True)
def _power_cpu(z):  # pragma: no cover - compiled
    """`_power` in one pass (3x torch's two strided squares and a sum), the same float32
    operations."""
    out = np.empty(z.shape, np.float32)
    flat, values = out.reshape(-1), z.reshape(-1)
    for i in range(flat.size):
        flat[i] = values[i].real * values[i].real + values[i].imag * values[i].imag
    return out


def _hpss(stft: torch.Tensor):
    """librosa.decompose.hpss: 31-bin median filters across time and frequency, soft masks
    of power 2 (margin 1, so frames silent in both get 0.5 each)."""
    mag = stft.abs()  # as librosa's np.abs
    harm = _median(mag, dim=-1)
    perc = _median(mag, dim=-2)
    if stft.device.type == "cpu":  # the STFT's own (frame, bin) layout, in one pass
        contiguous = (x.mT.contiguous().numpy() for x in (stft, harm, perc))
        return tuple(torch.from_numpy(part).mT for part in _soft_masks_cpu(*contiguous))
    return _soft_masks(stft, harm, perc)


def _soft_masks(stft: torch.Tensor, harm: torch.Tensor, perc: torch.Tensor):
    z = torch.maximum(harm, perc)
    silent = z < torch.finfo(z.dtype).tiny
    z = torch.where(silent, 1.0, z)
    h, p = (harm / z) ** 2, (perc / z) ** 2
    mask_h = torch.where(silent, 0.5, h / (h + p))
    mask_p = torch.where(silent, 0.5, p / (h + p))
    return stft * mask_h, stft * mask_p


@numba.njit(cache=True, nogil=True)
def _soft_masks_cpu(stft, harm, perc):  # pragma: no cover - compiled
    """`_soft_masks` elementwise, the same float32 operations (tested against it)."""
    out_h = np.empty_like(stft)
    out_p = np.empty_like(stft)
    tiny = np.finfo(np.float32).tiny
    flat, flat_h, flat_p = stft.ravel(), harm.ravel(), perc.ravel()
    res_h, res_p = out_h.ravel(), out_p.ravel()
    for i in range(flat.size):
        z = max(flat_h[i], flat_p[i])
        if z < tiny:
            mask_h = mask_p = np.float32(0.5)
        else:
            h = flat_h[i] / z
            p = flat_p[i] / z
            h, p = h * h, p * p
            mask_h, mask_p = h / (h + p), p / (h + p)
        res_h[i] = flat[i] * mask_h
        res_p[i] = flat[i] * mask_p
    return out_h, out_p


def _median(x: torch.Tensor, dim: int, width: int = 31) -> torch.Tensor:
    """Running median along `dim` with scipy.ndimage's 'reflect' edges (the edge sample
    repeated), as librosa's HPSS filters: `_median_network`'s compare-exchanges, on the CPU
    as a compiled kernel (`_median_kernel`), on CUDA as a Triton kernel (`_median_triton`),
    elsewhere as tensor ops (`_median_exchanges`). Minima and maxima are exact: every path
    gives scipy's numbers, bit for bit."""
    if x.device.type == "cuda":
        return _cuda_median(x, dim, width)
    if x.device.type != "cpu":
        return _median_exchanges(x, dim, width)
    lines = x.movedim(dim, -2).contiguous()  # (..., sequence, lanes)
    filtered = _median_kernel(width)(lines.reshape(-1, *lines.shape[-2:]).numpy())
    return torch.from_numpy(filtered).view(lines.shape).movedim(-2, dim)


_triton_failure: Exception | None = None


def _cuda_median(x: torch.Tensor, dim: int, width: int) -> torch.Tensor:
    """`_median_triton`, or the tensor ops where it cannot run (no Triton, no compiler):
    the first failure is told once, and the process keeps to the tensor ops."""
    global _triton_failure
    if _triton_failure is None:
        try:
            return _median_triton(x, dim, width)
        except Exception as exc:  # noqa: BLE001 - whatever stops the kernel, the ops still work
            _triton_failure = exc
            message = f"HPSS medians run as tensor ops: the Triton kernel failed ({exc!r})"
            warnings.warn(message, stacklevel=2)
    return _median_exchanges(x, dim, width)


def _reflected(x: torch.Tensor, dim: int, half: int) -> torch.Tensor:
    """`x` with `half` samples mirrored onto each end of `dim` (the edge sample repeated)."""
    n = x.shape[dim]
    idx = torch.arange(-half, n + half, device=x.device)
    idx = torch.where(idx < 0, -1 - idx, torch.where(idx >= n, 2 * n - 1 - idx, idx))
    return x.index_select(dim, idx)


def _median_sorted(x: torch.Tensor, dim: int, width: int = 31) -> torch.Tensor:
    """`_median` as torch's median of unfolded windows: another formulation, for the tests
    (and the bench: on CUDA, a selection per window of 31 values is slow)."""
    return _reflected(x, dim, width // 2).unfold(dim, width, 1).median(-1).values


def _median_exchanges(x: torch.Tensor, dim: int, width: int = 31) -> torch.Tensor:
    """`_median` as elementwise minima and maxima of whole shifted views of `x`, one pair
    per compare-exchange of `_median_network(width)`: 304 elementwise kernels
    that stream memory at full speed, where torch's median of unfolded windows runs a
    selection per window. (torch.compile would fuse them into one kernel, but it compiled
    for 20-40 s per input shape, and for over 15 min with dynamic shapes, on this CPU.)"""
    n = x.shape[dim]
    padded = _reflected(x, dim, width // 2)
    wires = [padded.narrow(dim, r, n) for r in range(width)]
    for i, j in _median_network(width):
        wires[i], wires[j] = torch.minimum(wires[i], wires[j]), torch.maximum(wires[i], wires[j])
    return wires[width // 2]


@functools.cache
def _median_network(width: int) -> tuple[tuple[int, int], ...]:
    """Compare-exchanges (low wire, high wire) after which wire width // 2 holds the median
    of `width` inputs: Batcher's odd-even merge sort of the next power of two (the missing
    inputs count as +inf, so their comparators do nothing), pruned to the comparators the
    middle wire depends on (152 of 191 for 31)."""
    size = 1 << (width - 1).bit_length()
    network, p = [], 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p) and i + j + k < width:
                        network.append((i + j, i + j + k))
            k //= 2
        p *= 2
    needed, kept = {width // 2}, []
    for low, high in reversed(network):
        if low in needed or high in needed:
            kept.append((low, high))
            needed |= {low, high}
    return tuple(kept[::-1])


@functools.cache
def _median_kernel(width: int):
    """A compiled running median of `width` along axis 1 of (count, length, lanes) float32.

    The window's values go through `_median_network` as straight-line min/max code, which
    LLVM vectorises across the lanes with every value in a register: 7x scipy's running
    median (a sorted window per line, one sample at a time). The code is generated from the
    network into a module file (`_generated_module`), so that numba caches its compiled form
    on disk like any other (compiling it takes 2-3 s); where no file can be written, it is
    compiled in each process."""
    module = _generated_module(f"median{width}", _median_source(width))
    if module is not None:
        return module.median
    scope: dict = {}
    uncached = _median_source(width, cache=False)  # numba caches only code from a file
    exec(compile(uncached, "median", "exec"), scope)  # noqa: S102 - our own generated source
    return scope["median"]


def _generated_module(prefix: str, source: str):
    """`source` imported as a module from a file under this package's `__pycache__`, named
    by its content's hash (numba's cache and Triton read a function's file); None where the
    folder cannot be written."""
    name = f"{prefix}_{hashlib.sha256(source.encode()).hexdigest()[:16]}"
    path = Path(__file__).parent / "__pycache__" / f"{name}.py"
    try:
        if not path.exists():  # written whole, once: numba's cache is keyed by its mtime
            path.parent.mkdir(exist_ok=True)
            with written_whole(path) as f:
                f.write(source.encode())
    except OSError:
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # numba's cached code refers to its module by name
    spec.loader.exec_module(module)
    return module


def _median_source(width: int, cache: bool = True) -> str:
    half = width // 2
    lines = [
        "import numba",
        "import numpy as np",
        "",
        "",
        f"@numba.njit(cache={cache}, nogil=True)",
        "def median(a):",
        "    count, length, lanes = a.shape",
        f"    assert length > {half}, 'the reflected edges need a longer line'",
        "    out = np.empty_like(a)",
        "    for c in range(count):",
        "        for s in range(length):",
        "            o = out[c, s]",
    ]
    for r in range(width):  # the window's rows, reflected at the edges
        lines.append(f"            i = s + {r - half}")
        lines.append(
            f"            x{r} = a[c, -1 - i if i < 0 else (2 * length - 1 - i if i >= length else i)]"
        )
    lines.append("            for lane in range(lanes):")
    lines += [f"                v{r} = x{r}[lane]" for r in range(width)]
    for i, j in _median_network(width):
        lines.append(f"                low = min(v{i}, v{j})")
        lines.append(f"                v{j} = max(v{i}, v{j})")
        lines.append(f"                v{i} = low")
    lines += [f"                o[lane] = v{half}", "    return out", ""]
    return "\n".join(lines)


def _median_triton(x: torch.Tensor, dim: int, width: int = 31) -> torch.Tensor:
    """`_median` on CUDA as one Triton kernel: a thread per output loads its window (from
    cache: neighbours share it) and runs `_median_network` in registers, where the tensor
    ops (`_median_exchanges`) write 304 whole tensors. The lines go to axis 1 as on the CPU,
    so that a warp's loads are neighbouring lanes."""
    kernel = _median_triton_kernel(width)
    lines = x.movedim(dim, -2).contiguous()
    flat = lines.reshape(-1, *lines.shape[-2:])
    if flat.shape[1] <= width // 2:
        raise ValueError("the reflected edges need a longer line")
    if flat.numel() >= 2**31:
        raise ValueError("a batch this large overflows the kernel's 32-bit offsets")
    out = torch.empty_like(flat)
    block = 256
    grid = (-(-flat.numel() // block),)
    kernel[grid](flat, out, flat.shape[1], flat.shape[2], flat.numel(), BLOCK=block)
    return out.view(lines.shape).movedim(-2, dim)


@functools.cache
def _median_triton_kernel(width: int):
    module = _generated_module(f"median{width}_triton", _median_triton_source(width))
    if module is None:
        raise OSError("no writable folder for the generated Triton kernel")
    return module.median


def _median_triton_source(width: int) -> str:
    half = width // 2
    lines = [
        "import triton",
        "import triton.language as tl",
        "",
        "",
        "@triton.jit",
        "def median(a, out, length, lanes, total, BLOCK: tl.constexpr):",
        "    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)",
        "    inside = offsets < total",
        "    lane = offsets % lanes",
        "    s = (offsets // lanes) % length",
        "    base = (offsets // (lanes * length)) * (length * lanes) + lane",
    ]
    for r in range(width):  # the window's rows, reflected at the edges
        lines.append(f"    i = s + {r - half}")
        lines.append(
            "    i = tl.where(i < 0, -1 - i, tl.where(i >= length, 2 * length - 1 - i, i))"
        )
        lines.append(f"    v{r} = tl.load(a + base + i * lanes, mask=inside, other=0.0)")
    for i, j in _median_network(width):
        lines.append(f"    low = tl.minimum(v{i}, v{j})")
        lines.append(f"    v{j} = tl.maximum(v{i}, v{j})")
        lines.append(f"    v{i} = low")
    lines += [f"    tl.store(out + offsets, v{half}, mask=inside)", ""]
    return "\n".join(lines)


def _component_frames(y: torch.Tensor, k) -> torch.Tensor:
    """(C, N) component waveforms -> (C, 190, T) frame features in Table I order."""
    power = _power(
        torch.stft(y, N_FFT, HOP, window=k.hann, return_complex=True, pad_mode="constant")
    )
    mag = power.sqrt()
    mel = k.mel @ power
    mfcc = k.dct @ _db(mel, top_db=80.0)
    deltas = _deltas(mfcc, k.savgol)
    norm1 = mag / _norm_length(mag.sum(-2, keepdim=True))
    centroid = (k.freqs[:, None] * norm1).sum(-2, keepdim=True)
    bandwidth = ((k.freqs[:, None] - centroid) ** 2 * norm1).sum(-2, keepdim=True).sqrt()
    cumulative = mag.cumsum(-2)  # non-decreasing: the first bin at 85% is the count below
    rolloff = k.freqs[(cumulative < 0.85 * cumulative[..., -1:, :]).sum(-2, keepdim=True)]
    rms = _rms(y)
    zcr = _zcr(y)
    rows = [
        _db(_chroma_stft(power, k)),
        _db(_chroma_cens(y, k)),
        _db(mel),
        mfcc,
        deltas[0],
        deltas[1],
        _db(rms),
        _db(centroid),
        _db(bandwidth),
        _db(rolloff),
        k.poly1 @ mag,
        k.poly2 @ mag,
        _db(zcr),
    ]
    return torch.cat(rows, 1)


def _block_sums(x: torch.Tensor) -> torch.Tensor:
    """(C, N) -> (C, 1 + N // HOP) sums over each centred frame of N_FFT = 2 * HOP samples
    (as librosa frames with center=True), from sums over blocks of HOP samples."""
    frames = 1 + (x.shape[-1] - N_FFT) // HOP
    x = torch.nn.functional.pad(x, (0, (frames + 1) * HOP - x.shape[-1]))
    blocks = x.unflatten(-1, (-1, HOP)).sum(-1)
    return blocks[..., :-1] + blocks[..., 1:]


def _rms(y: torch.Tensor) -> torch.Tensor:
    """librosa.feature.rms(y, frame_length=N_FFT, hop_length=HOP): (C, 1, T)."""
    padded = torch.nn.functional.pad(y, (N_FFT // 2, N_FFT // 2))
    return (_block_sums(padded**2) / N_FFT).sqrt()[:, None]


def _zcr(y: torch.Tensor) -> torch.Tensor:
    """librosa.feature.zero_crossing_rate(y, frame_length=N_FFT, hop_length=HOP): (C, 1, T).
    Sign changes between neighbours inside each edge-padded frame (|y| <= 1e-10 counts as
    0, which is positive), over N_FFT; the pair straddling the frame's start is left out."""
    padded = torch.nn.functional.pad(y[:, None], (N_FFT // 2, N_FFT // 2), "replicate")[:, 0]
    signs = torch.signbit(torch.where(padded.abs() <= 1e-10, 0.0, padded))
    changes = torch.nn.functional.pad(signs[:, 1:] != signs[:, :-1], (1, 0)).float()
    counts = _block_sums(changes) - changes[:, : -N_FFT + 1 : HOP]
    return counts[:, None] / N_FFT


def _db(x: torch.Tensor, top_db: float | None = None) -> torch.Tensor:
    """librosa.power_to_db(ref=1.0, amin=1e-10), top_db clipping per track."""
    db = 10.0 * torch.log10(x.clamp_min(1e-10))
    if top_db is not None:
        dims = tuple(range(1, db.dim()))
        db = torch.maximum(db, db.amax(dims, keepdim=True) - top_db)
    return db


def _norm_length(length: torch.Tensor) -> torch.Tensor:
    """librosa.util.normalize's divisor: frames below float32's tiny are left as they are."""
    return torch.where(length < torch.finfo(length.dtype).tiny, 1.0, length)


def _chroma_stft(power: torch.Tensor, k) -> torch.Tensor:
    """librosa.feature.chroma_stft(S=power): tuning estimated per component, max-normalised."""
    tuning = _estimate_tuning(power, bins_per_octave=12)
    chroma = k.chroma(tuning) @ power
    return chroma / _norm_length(chroma.amax(-2, keepdim=True))


def _chroma_cens(y: torch.Tensor, k) -> torch.Tensor:
    """librosa.feature.chroma_cens(y=y): tuning estimated per component, CQT, CENS."""
    wide = _power(
        torch.stft(y, 2048, 512, window=k.hann2048, return_complex=True, pad_mode="constant")
    ).sqrt()
    tuning = _estimate_tuning(wide, bins_per_octave=CQT_BINS_PER_OCTAVE, n_fft=2048)
    chroma = k.cq_to_chroma @ _cqt(y, tuning, k)
    chroma = chroma / _norm_length(chroma.sum(-2, keepdim=True))
    quantised = sum(0.25 * (chroma > step) for step in (0.4, 0.2, 0.1, 0.05))
    smooth = torch.nn.functional.conv1d(
        quantised.flatten(0, 1)[:, None], k.cens_window, padding=k.cens_window.shape[-1] // 2
    ).view_as(quantised)
    return smooth / _norm_length(smooth.norm(dim=-2, keepdim=True))


def _cqt(y: torch.Tensor, tuning: torch.Tensor, k) -> torch.Tensor:
    """|librosa.cqt| (hop 256, C1, 7 octaves of 36 bins): octave by octave from the top,
    halving the rate and the hop between octaves. librosa takes each octave's rectangular
    512-sample frames to the FFT and multiplies by the wavelet spectra; that is one linear
    map of the frame, applied here as one real matmul with its time-domain matrix (no FFT,
    no complex arithmetic). Every octave uses the same matrix: its frequencies relative to
    its rate are the top octave's."""
    filters = k.cqt_filters(tuning)  # (C, 512, 72): real and imaginary parts of 36 bins
    frames = 1 + y.shape[-1] // HOP
    octaves = []
    hop = HOP
    for octave in range(CQT_OCTAVES):
        padded = torch.nn.functional.pad(y, (CQT_N_FFT // 2, CQT_N_FFT // 2))
        response = padded.unfold(-1, CQT_N_FFT, hop)[:, :frames] @ filters
        # librosa scales octave j's basis by 2**(j/2) and soxr's halving (scale=True) the
        # signal by 2**(1/2) per octave: 2**j in all
        power = response[..., :CQT_BINS_PER_OCTAVE] ** 2 + response[..., CQT_BINS_PER_OCTAVE:] ** 2
        octaves.append(power.sqrt() * 2.0**octave)
        if octave + 1 < CQT_OCTAVES:
            hop //= 2
            y = _halve_rate(y, k.halfband)
    cqt = torch.cat(octaves[::-1], -1).mT  # (C, 252, T), lowest octave first
    return cqt / k.cqt_lengths(tuning)[..., None].sqrt()


def _halve_rate(y: torch.Tensor, taps: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Low-pass (zero phase) and keep every other sample. The linear convolution runs by
    overlap-save in short FFT blocks, several times faster than one FFT of the signal."""
    m, n = taps.shape[-1], y.shape[-1]
    step = block - m + 1
    blocks = -(-(n + m - 1) // step)
    right = (blocks - 1) * step + block - (m - 1) - n
    frames = torch.nn.functional.pad(y, (m - 1, right)).unfold(-1, block, step)
    spectra = torch.fft.rfft(frames) * torch.fft.rfft(taps, block)
    full = torch.fft.irfft(spectra, block)[..., m - 1 :].flatten(-2)
    return full[..., m // 2 : m // 2 + n : 2]


def _estimate_tuning(S: torch.Tensor, bins_per_octave: int, n_fft: int = N_FFT) -> torch.Tensor:
    """librosa.estimate_tuning(S=S) per item of the batch, as indices into TUNING_STEPS:
    piptrack's interpolated peaks above a tenth of the frame maximum between 150 and
    4000 Hz, the stronger half of them, and the most common deviation from the pitch grid."""
    # Only bins inside 150..4000 Hz can be peaks; keep one neighbour each side.
    lo, hi = math.ceil(150 * n_fft / SR) - 1, min(math.ceil(4000 * n_fft / SR), S.shape[-2] - 1) + 1
    if S.device.type == "cpu":
        peaks = _spectral_peaks_cpu(S.mT.contiguous().numpy(), lo, hi, n_fft)
        return _tuning_numpy(*peaks, S.shape[0], bins_per_octave)
    return _tuning_tensors(*_spectral_peaks(S, lo, hi, n_fft), S.shape[0], bins_per_octave)


def _tuning_numpy(item, pitch, mag, items: int, bins_per_octave: int) -> torch.Tensor:
    """`_estimate_tuning`'s histograms of the peaks (listed item by item) with numpy, as
    librosa.pitch_tuning: per item, the residuals of the peaks at or above the median
    magnitude, and the first of the fullest bins."""
    residual = _residual(pitch, bins_per_octave)
    result = []
    # item i's peaks are one slice (a mask per item would cost items x peaks)
    bounds = np.searchsorted(item, np.arange(items + 1))
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        if start == stop:
            result.append(50)  # librosa's empty case: tuning 0.0
            continue
        strong = mag[start:stop] >= np.median(mag[start:stop])
        # the edges of TUNING_STEPS, by numpy's faster path for equal bins (same counts)
        counts, _ = np.histogram(residual[start:stop][strong], len(TUNING_STEPS) - 1, (-0.5, 0.5))
        result.append(int(counts.argmax()))  # ties: the first, as numpy's argmax
    return torch.tensor(result)


def _residual(pitch: np.ndarray, bins_per_octave: int) -> np.ndarray:
    """librosa.pitch_tuning's deviations from the pitch grid, in float32 as librosa computes
    them (the histogram's mode is sensitive to the last bit near its bin edges)."""
    residual = np.mod(bins_per_octave * np.log2(pitch / np.float32(27.5)), np.float32(1.0))
    residual[residual >= 0.5] -= 1.0
    return residual


def _tuning_tensors(item, pitch, mag, items: int, bins_per_octave: int) -> torch.Tensor:
    """`_tuning_numpy` as tensor ops on the peaks' device, the same numbers:
    on a GPU the host's per-item loop cost 2 ms a track, more than the rest of the
    features. numpy's median (the mean of the middle two) from one sort by item and
    magnitude; numpy's bins (edges[i] <= x < edges[i + 1], in float64) by searchsorted. The
    device's float32 log2 may differ from numpy's in the last bit, which moves a residual by
    up to ~3e-5 (the value before the modulo reaches ~260): residuals that close to a bin
    edge are computed again on the host, as numpy does."""
    counts = torch.bincount(item, minlength=items)
    ends = counts.cumsum(0)
    by_magnitude = torch.argsort(mag, stable=True)
    ordered = mag[by_magnitude[torch.argsort(item[by_magnitude], stable=True)]]
    middle = (ends - counts + (counts - 1).clamp(min=0) // 2, ends - counts + counts // 2)
    middle = tuple(m.clamp(max=max(len(mag) - 1, 0)) for m in middle)
    median = (ordered[middle[0]] + ordered[middle[1]]) / 2 if len(mag) else counts.float()
    strong = mag >= median[item]
    item, pitch = item[strong], pitch[strong]
    residual = torch.remainder(bins_per_octave * torch.log2(pitch / 27.5), 1.0)
    residual = torch.where(residual >= 0.5, residual - 1.0, residual)
    edges = torch.as_tensor(TUNING_STEPS, device=residual.device)
    position = (residual.double() + 0.5) * (len(TUNING_STEPS) - 1)
    near = ((position - position.round()).abs() < 1e-2).nonzero()[:, 0]  # 1e-4 of a residual
    if len(near):
        exact = _residual(pitch[near].cpu().numpy(), bins_per_octave)
        residual = residual.double().index_put((near,), torch.from_numpy(exact).to(edges))
    bins = (torch.searchsorted(edges, residual.double(), right=True) - 1).clamp(0, len(edges) - 2)
    histogram = torch.zeros(items, len(edges) - 1, dtype=torch.long, device=item.device)
    histogram.index_put_((item, bins), torch.ones_like(bins), accumulate=True)
    # argmax: the first of equal counts, as numpy's; no peaks: librosa's tuning 0.0
    return torch.where(counts > 0, histogram.argmax(1), 50)


def _spectral_peaks(S: torch.Tensor, lo: int, hi: int, n_fft: int):
    """piptrack's peaks of S (C, F, T) in bins lo+1 .. hi-2: (item, pitch Hz, magnitude).
    Peaks are sparse, so the interpolation runs on the peaks only."""
    floor = 0.1 * S.amax(-2, keepdim=True)
    S = S[..., lo:hi, :]
    gated = S * (floor < S)
    peak = (gated[..., 1:-1, :] > gated[..., :-2, :]) & (gated[..., 1:-1, :] >= gated[..., 2:, :])
    hz = torch.arange(lo + 1, hi - 1, device=S.device)[:, None] * (SR / n_fft)
    peak &= (hz >= 150) & (hz < 4000)
    item, row, frame = peak.nonzero(as_tuple=True)
    below, centre, above = (S[item, row + d, frame] for d in range(3))
    a = above + below - 2 * centre
    b = (above - below) / 2  # also np.gradient's central difference at the peak
    shift = torch.where(b.abs() < a.abs(), -b / a, 0.0)
    # float32 like librosa's arrays, except the bin + shift sum (numpy promotes it)
    pitch = ((row + lo + 1).double() + shift.double()) * (SR / n_fft)
    mag = centre + 0.5 * b * shift
    return item, pitch.float(), mag


@numba.njit(cache=True, nogil=True)
def _spectral_peaks_cpu(S, lo, hi, n_fft):  # pragma: no cover - compiled
    """`_spectral_peaks` in one pass over S laid out (C, T, F), as the STFT gives it, with
    the same float32 operations; the peaks come frame by frame (tests/engine/
    test_audio_batch.py checks they are the same)."""
    count, frames, bins = S.shape
    size = count * frames * ((hi - lo) // 2 + 1)  # peaks are never neighbours
    items = np.empty(size, np.int64)
    pitches = np.empty(size, np.float32)
    mags = np.empty(size, np.float32)
    found = 0
    for i in range(count):
        for t in range(frames):
            column = S[i, t]
            floor = column[0]
            for f in range(1, bins):
                floor = max(floor, column[f])
            floor *= np.float32(0.1)
            for f in range(lo + 1, hi - 1):
                hz = f * (SR / n_fft)
                below, centre, above = column[f - 1], column[f], column[f + 1]
                g = centre if floor < centre else np.float32(0)
                gb = below if floor < below else np.float32(0)
                ga = above if floor < above else np.float32(0)
                if not (g > gb and g >= ga) or hz < 150 or hz >= 4000:
                    continue
                a = above + below - np.float32(2) * centre
                b = (above - below) / np.float32(2)
                shift = -b / a if abs(b) < abs(a) else np.float32(0)
                items[found] = i
                pitches[found] = np.float32((f + np.float64(shift)) * (SR / n_fft))
                mags[found] = centre + np.float32(0.5) * b * shift
                found += 1
    return items[:found], pitches[:found], mags[:found]


class _Kernels:
    """Every constant matrix of the pipeline, built once per device with librosa/scipy; the
    tuning-dependent ones on first use of a tuning (one of 100 steps, most never occur)."""

    def __init__(self, device: torch.device):
        def t(x, dtype=torch.float32):
            return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)

        self.device = device
        self.hann = torch.hann_window(N_FFT, device=device)
        self.hann2048 = torch.hann_window(2048, device=device)
        self.freqs = t(librosa.fft_frequencies(sr=SR, n_fft=N_FFT))
        self.mel = t(librosa.filters.mel(sr=SR, n_fft=N_FFT, n_mels=N_MELS))
        self.dct = t(scipy.fft.dct(np.eye(N_MELS), type=2, norm="ortho", axis=0)[:N_MFCC])
        self.savgol = t(_savgol())
        freqs64 = librosa.fft_frequencies(sr=SR, n_fft=N_FFT)
        self.poly1 = t(np.linalg.pinv(np.vander(freqs64, 2)))
        self.poly2 = t(np.linalg.pinv(np.vander(freqs64, 3)))
        self.cq_to_chroma = t(
            librosa.filters.cq_to_chroma(
                CQT_BINS_PER_OCTAVE * CQT_OCTAVES, bins_per_octave=CQT_BINS_PER_OCTAVE
            )
        )
        window = scipy.signal.get_window("hann", 43, fftbins=False)
        self.cens_window = t(window / window.sum())[None, None]
        self.halfband = t(scipy.signal.firwin(255, 0.48, window=("kaiser", 12.0)))
        self._per_tuning: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _tuned(self, tuning: torch.Tensor, which: int) -> torch.Tensor:
        for step in tuning.unique().tolist():
            if step not in self._per_tuning:
                self._per_tuning[step] = tuple(
                    torch.as_tensor(x, dtype=torch.float32, device=self.device)
                    for x in _tuned_kernels(TUNING_STEPS[step])
                )
        return torch.stack([self._per_tuning[step][which] for step in tuning.tolist()])

    def chroma(self, tuning: torch.Tensor) -> torch.Tensor:
        """(C, 12, n_fft // 2 + 1) chroma filter banks."""
        return self._tuned(tuning, 0)

    def cqt_filters(self, tuning: torch.Tensor) -> torch.Tensor:
        """(C, 512, 72) time-domain CQT matrices of one octave (see `_cqt_filters`)."""
        return self._tuned(tuning, 1)

    def cqt_lengths(self, tuning: torch.Tensor) -> torch.Tensor:
        """(C, 252) wavelet lengths, for librosa.cqt's scale=True normalisation."""
        return self._tuned(tuning, 2)


def _tuned_kernels(tuning: float):
    chroma = librosa.filters.chroma(sr=SR, n_fft=N_FFT, tuning=tuning)
    lengths = librosa.filters.wavelet_lengths(freqs=_cqt_freqs(tuning), sr=SR)[0]
    return chroma, _cqt_filters(tuning), lengths


def _cqt_filters(tuning: float) -> np.ndarray:
    """(512, 72): the top octave's FFT basis as librosa.vqt builds it (sparsified), as a
    matrix on the time-domain frame: sum_f basis[k, f] * rfft(frame)[f] = frame @ w_k, with
    w_k[n] = sum_f basis[k, f] exp(-2 pi i f n / 512); real parts, then imaginary parts."""
    bpo = CQT_BINS_PER_OCTAVE
    freqs = _cqt_freqs(tuning)[-bpo:]
    basis, lengths = librosa.filters.wavelet(freqs=freqs, sr=SR, gamma=0)
    n_fft = basis.shape[1]
    assert n_fft == CQT_N_FFT, n_fft
    basis *= lengths[:, None] / n_fft
    spectra = np.fft.fft(basis, n=n_fft, axis=1)[:, : n_fft // 2 + 1]
    spectra = librosa.util.sparsify_rows(spectra, quantile=0.01).toarray()
    spectra = spectra.astype(np.complex64).astype(np.complex128)  # librosa's dtype
    w = np.fft.fft(spectra, n=n_fft, axis=1).T  # the sum over f, zero above n_fft // 2
    return np.concatenate([w.real, w.imag], axis=1)


def _cqt_freqs(tuning: float) -> np.ndarray:
    fmin = librosa.note_to_hz("C1") * 2.0 ** (tuning / CQT_BINS_PER_OCTAVE)
    n_bins = CQT_BINS_PER_OCTAVE * CQT_OCTAVES
    return librosa.cqt_frequencies(n_bins, fmin=fmin, bins_per_octave=CQT_BINS_PER_OCTAVE)


def _savgol() -> np.ndarray:
    """(2, 9, 9): librosa.feature.delta's Savitzky-Golay filters (width 9, order 1 and 2,
    'interp' edges) applied to 9 frames: row 4 is the running filter, rows 0-3 and 5-8
    the polynomial fits at the first and last four frames."""
    eye = np.eye(9)
    return np.stack(
        [scipy.signal.savgol_filter(eye, 9, o, deriv=o, axis=0, mode="interp") for o in (1, 2)]
    )


def _deltas(x: torch.Tensor, savgol: torch.Tensor) -> torch.Tensor:
    """(C, D, T) -> (2, C, D, T): librosa.feature.delta of order 1 and 2 along frames."""
    inner = torch.nn.functional.conv1d(x.flatten(0, 1)[:, None], savgol[:, 4, None])
    inner = inner.movedim(1, 0).unflatten(1, x.shape[:2])
    head = x[None, ..., :9] @ savgol[:, None, :4].mT
    tail = x[None, ..., -9:] @ savgol[:, None, 5:].mT
    return torch.cat([head, inner, tail], -1)


@functools.cache
def _kernels(device: torch.device) -> _Kernels:
    return _Kernels(device)
