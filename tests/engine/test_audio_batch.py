"""Batched tensor music features against the librosa oracle, on real decoded songs.

The songs are Debian's `fretsonfire-songs-sectoid` (OGG Vorbis), or those SONGS_GLOB names
(a GPU host's carried excerpts); the tests skip without them, unless REQUIRE_SONGS=1 (CI).
"""

import glob
import os
import warnings

import numpy as np
import pytest
import scipy.ndimage
import torch

from engine import processes
from engine.features import audio_batch
from engine.features.audio import N_FFT, SR, decode_audio, load_excerpt, music_features_naive
from engine.features.audio_batch import (
    TUNING_STEPS,
    _decoded_batches,
    _hpss,
    _median,
    _median_exchanges,
    _median_kernel,
    _median_sorted,
    _median_triton,
    _median_triton_kernel,
    _power,
    _soft_masks,
    _spectral_peaks,
    _spectral_peaks_cpu,
    _tuning_numpy,
    _tuning_tensors,
    batch_features,
    music_features_batch,
)
from engine.processes import shared_pool

SONGS_GLOB = os.environ.get("SONGS_GLOB", "/usr/share/games/fretsonfire/data/songs/sectoid/*/*.ogg")
SONGS = sorted(glob.glob(SONGS_GLOB))
if not SONGS and os.environ.get("REQUIRE_SONGS") == "1":
    pytest.fail(f"REQUIRE_SONGS=1 but no songs at {SONGS_GLOB}", pytrace=False)
pytestmark = pytest.mark.skipif(
    not SONGS, reason="apt-get install fretsonfire-songs-sectoid for real music"
)

# Per component, the 190 frame features in Table I order.
GROUPS = {
    "chroma_stft": 12,
    "chroma_cens": 12,
    "mel": 96,
    "mfcc": 20,
    "delta_mfcc": 20,
    "delta2_mfcc": 20,
    "rms": 1,
    "centroid": 1,
    "bandwidth": 1,
    "rolloff": 1,
    "poly1": 2,
    "poly2": 3,
    "zcr": 1,
}


def group_columns():
    """{group: column indices of that group in the 1140 vector (both components, 3 stats)}."""
    columns, start = {name: [] for name in GROUPS}, 0
    for _stat in range(3):
        for _component in range(2):
            for name, width in GROUPS.items():
                columns[name].extend(range(start, start + width))
                start += width
    assert start == 1140
    return columns


@pytest.fixture(scope="module")
def clips():
    """Eight real 29.12 s excerpts (waveform, rate): four songs, mix and guitar stem each.

    None has digital silence in a component: chroma-CENS of silence is rounding noise
    normalised to unit chroma (librosa's too), so no implementation can agree with another
    there (the guitar stem 80 s into "Feelings" shows it)."""
    return [(decode_audio(path, SR, offset=20.0, duration=29.12), SR) for path in SONGS]


@pytest.fixture(scope="module")
def oracle(clips):
    return np.stack([music_features_naive(clip) for clip in clips])


@pytest.fixture(scope="module")
def batched(clips):
    return music_features_batch(clips, device="cpu", batch_size=4, workers=0)


@pytest.mark.slow
def test_every_feature_group_agrees_with_the_librosa_oracle(oracle, batched):
    """Against `music_features_naive` (each librosa call on its own). Reached on Debian's
    eight excerpts, every group: correlation across tracks per dimension >= 0.999999,
    deviation <= 3e-4 of the dimension's spread across tracks (float32 rounding; the CQT's
    half-band filter differs from soxr's). Asserted: correlation >= 0.999 (the issue asks
    0.99), deviation < 1% of the spread; for chroma-CENS < 10%: CENS quantises each
    normalised chroma at fixed thresholds, and a value within rounding of one lands on
    either side (on the AAC excerpts of bench/device_bundle.py one percussive CENS maximum
    moves by 5.9% of the spread, correlation still 0.99986)."""
    assert batched.shape == (len(oracle), 1140) and batched.dtype == np.float32
    assert np.isfinite(batched).all()
    for name, cols in group_columns().items():
        ref, got = oracle[:, cols], batched[:, cols]
        spread = np.maximum(ref.std(axis=0), 1e-3 * np.abs(ref).max(axis=0) + 1e-12)
        worst = (np.abs(got - ref) / spread).max()
        limit = 0.1 if name == "chroma_cens" else 0.01
        assert worst < limit, f"{name}: max deviation {worst:.3g} of the across-track spread"
        varying = ref.std(axis=0) > 1e-6 * (np.abs(ref).max(axis=0) + 1e-12)
        corr = [np.corrcoef(ref[:, j], got[:, j])[0, 1] for j in np.flatnonzero(varying)]
        assert min(corr) >= 0.999, f"{name}: correlation across tracks {min(corr):.5f}"


@pytest.mark.slow
def test_a_batch_of_one_equals_its_row_in_a_larger_batch(clips, batched):
    # The CPU path computes track by track; an accelerator takes whole batches.
    alone = music_features_batch(clips[2:3], device="cpu", workers=0)
    np.testing.assert_array_equal(alone[0], batched[2])
    waves = torch.from_numpy(np.stack([load_excerpt(clip) for clip in clips[:4]]))
    together = batch_features(waves).numpy()
    np.testing.assert_allclose(together[2], batched[2], rtol=1e-4, atol=1e-4)


def test_worker_processes_equal_this_process():
    # CPU: the workers decode and compute their own batches (files: decode included).
    paths = SONGS[:3]
    pooled = music_features_batch(paths, device="cpu", batch_size=2, workers=2)
    here = music_features_batch(paths, device="cpu", batch_size=2, workers=0)
    np.testing.assert_allclose(pooled, here, rtol=1e-5, atol=1e-5)


def test_the_pool_outlives_a_call():
    music_features_batch(SONGS[:2], device="cpu", batch_size=1, workers=2)
    pool = processes._shared[2]
    pids = set(pool._processes)
    music_features_batch(SONGS[:2], device="cpu", batch_size=1, workers=2)
    assert shared_pool(2) is pool and set(pool._processes) == pids


@pytest.mark.parametrize("n_fft", [N_FFT, 2048])
def test_cpu_peak_picking_equals_the_tensor_version(clips, n_fft):
    """The compiled CPU peak picker of the tuning estimate against the tensor ops that run
    on an accelerator: the same peaks, pitches and magnitudes, bit for bit."""
    y = torch.from_numpy(np.stack([wave for wave, _ in clips[:2]]))
    window = torch.hann_window(n_fft)
    S = _power(torch.stft(y, n_fft, n_fft // 4, window=window, return_complex=True)).sqrt()
    lo, hi = int(np.ceil(150 * n_fft / SR)) - 1, int(np.ceil(4000 * n_fft / SR)) + 1
    tensor = [v.numpy() for v in _spectral_peaks(S, lo, hi, n_fft)]
    compiled = _spectral_peaks_cpu(S.mT.contiguous().numpy(), lo, hi, n_fft)
    assert len(tensor[0]) > 1000
    # the same peaks (bin by bin from the tensor ops, frame by frame compiled): sorted by
    # item, pitch, magnitude, equal tuples are the only ties
    orders = [np.lexsort((v[2], v[1], v[0])) for v in (tensor, compiled)]
    for a, b in zip(tensor, compiled, strict=True):
        np.testing.assert_array_equal(a[orders[0]], b[orders[1]])


@pytest.mark.parametrize(("n_fft", "bins_per_octave"), [(N_FFT, 12), (2048, 36)])
def test_tuning_histograms_as_tensors_equal_numpys(clips, n_fft, bins_per_octave):
    """The tuning estimate's histograms as the tensor ops an accelerator runs against the
    numpy loop the CPU runs, on the real songs' peaks."""
    y = torch.from_numpy(np.stack([wave for wave, _ in clips]))
    window = torch.hann_window(n_fft)
    S = _power(torch.stft(y, n_fft, n_fft // 4, window=window, return_complex=True)).sqrt()
    lo, hi = int(np.ceil(150 * n_fft / SR)) - 1, int(np.ceil(4000 * n_fft / SR)) + 1
    peaks = _spectral_peaks_cpu(S.mT.contiguous().numpy(), lo, hi, n_fft)
    expected = _tuning_numpy(*peaks, len(clips), bins_per_octave)
    assert len(expected.unique()) > 1  # the songs do not all share one tuning
    tensors = [torch.from_numpy(v) for v in peaks]
    assert torch.equal(_tuning_tensors(*tensors, len(clips), bins_per_octave), expected)


@pytest.mark.parametrize("bins_per_octave", [12, 36])
def test_tuning_histograms_as_tensors_at_the_edges(monkeypatch, bins_per_octave):
    """Where numpy's histogram has to be followed to the bit: a residual exactly on a bin
    edge (440 Hz: 0.0, bin 50), the mean of the middle two magnitudes as the median (the
    lower one would admit the 40th bin's peak), an item without peaks, and residuals 2e-5
    below an edge with a device whose log2 is 2e-6 off (the host recomputes them)."""

    def peaks(residuals, mags):
        semitones = np.arange(20, 20 + len(residuals)) + np.asarray(residuals)
        return (27.5 * 2 ** (semitones / bins_per_octave)).astype(np.float32), mags

    edge = TUNING_STEPS
    items = [
        (np.full(5, 440, np.float32), np.ones(5, np.float32)),
        peaks([edge[40] + 0.003, edge[70] + 0.003, edge[60] + 0.003, edge[45]], [2, 4, 3, 1]),
        (np.zeros(0, np.float32), []),
        peaks([edge[60] - 2e-5] * 3 + [edge[62] + 0.003] * 2 + [0.3] * 5, [5] * 5 + [1] * 5),
    ]
    item = np.repeat(np.arange(len(items)), [len(p) for p, _ in items])
    pitch = np.concatenate([p for p, _ in items])
    mag = np.concatenate([np.asarray(m, np.float32) for _, m in items])
    expected = _tuning_numpy(item, pitch, mag, len(items), bins_per_octave)
    assert expected.tolist() == [50, 60, 50, 59]
    log2 = torch.log2
    monkeypatch.setattr(torch, "log2", lambda x: log2(x) + 2e-6)
    got = _tuning_tensors(*map(torch.from_numpy, (item, pitch, mag)), len(items), bins_per_octave)
    assert torch.equal(got, expected)


def test_cpu_soft_masks_equal_the_tensor_version(clips):
    """HPSS's compiled CPU masking against the tensor ops that run on an accelerator."""
    y = torch.from_numpy(np.stack([wave for wave, _ in clips[:2]]))
    stft = torch.stft(y, N_FFT, N_FFT // 2, window=torch.hann_window(N_FFT), return_complex=True)
    mag = stft.abs()
    tensor = _soft_masks(stft, _median(mag, dim=-1), _median(mag, dim=-2))
    for a, b in zip(tensor, _hpss(stft), strict=True):
        assert torch.equal(a, b)


def magnitudes(clips) -> torch.Tensor:
    y = torch.from_numpy(np.stack([wave for wave, _ in clips[:2]]))
    stft = torch.stft(y, N_FFT, N_FFT // 2, window=torch.hann_window(N_FFT), return_complex=True)
    return stft.abs()


def test_cpu_medians_equal_librosas_filter_and_the_tensor_versions(clips):
    """HPSS's running medians: the compiled sorting network on the CPU against the filter
    librosa runs (scipy.ndimage.median_filter, 'reflect' edges), the same network as the
    tensor ops an accelerator runs, and torch's median of unfolded windows, bit for bit,
    along time and along frequency."""
    mag = magnitudes(clips)
    for dim, size in ((-1, (1, 1, 31)), (-2, (1, 31, 1))):
        compiled = _median(mag, dim)
        assert torch.equal(compiled, _median_exchanges(mag, dim))
        assert torch.equal(compiled, _median_sorted(mag, dim))
        librosa_filter = scipy.ndimage.median_filter(mag.numpy(), size=size, mode="reflect")
        np.testing.assert_array_equal(compiled.numpy(), librosa_filter)


def test_triton_medians_equal_the_cpu_kernel(monkeypatch):
    """The CUDA kernel's code, run by Triton's interpreter on the CPU, gives the kernel's
    medians (a small input: the interpreter is slow)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the kernel is decorated
    _median_triton_kernel.cache_clear()
    try:
        x = torch.rand(2, 40, 24, generator=torch.Generator().manual_seed(0))
        for dim in (-1, -2):
            assert torch.equal(_median_triton(x, dim), _median(x, dim))
        with pytest.raises(ValueError, match="longer line"):
            _median_triton(x[:, :15], -2)
    finally:
        _median_triton_kernel.cache_clear()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_medians_equal_the_cpu_kernel(clips):
    mag = magnitudes(clips)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the Triton kernel must run, not its fallback
        for dim in (-1, -2):
            expected = _median(mag, dim)
            assert torch.equal(_median(mag.cuda(), dim).cpu(), expected)
            assert torch.equal(_median_exchanges(mag.cuda(), dim).cpu(), expected)


def test_median_kernel_compiles_without_a_writable_cache_folder(monkeypatch):
    """Where the package's __pycache__ cannot be written (here: under /proc), the generated
    median kernel is compiled in the process instead, and gives the same medians."""
    x = np.random.default_rng(0).random((2, 40, 5), dtype=np.float32)
    expected = scipy.ndimage.median_filter(x, size=(1, 31, 1), mode="reflect")
    monkeypatch.setattr(audio_batch, "__file__", "/proc/no-such-folder/audio_batch.py")
    _median_kernel.cache_clear()
    try:
        np.testing.assert_array_equal(_median_kernel(31)(x), expected)
    finally:
        _median_kernel.cache_clear()


def test_cpu_power_equals_the_tensor_version(clips):
    """The compiled |z|**2 against the tensor ops that run on an accelerator, bit for bit,
    in the STFT's layout and in a plain contiguous one."""
    y = torch.from_numpy(np.stack([wave for wave, _ in clips[:2]]))
    stft = torch.stft(y, 2048, 512, window=torch.hann_window(2048), return_complex=True)
    for z in (stft, stft.contiguous()):
        assert torch.equal(_power(z), z.real**2 + z.imag**2)


def test_parallel_decoding_keeps_order_and_equals_in_process_decoding():
    paths = SONGS[:3]
    batches = list(_decoded_batches(paths, batch_size=2, workers=2))
    assert [start for start, _ in batches] == [0, 2]
    decoded = [wave for _, waves in batches for wave in waves]
    for path, wave in zip(paths, decoded, strict=True):
        np.testing.assert_array_equal(wave, load_excerpt(path))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu(clips, batched):
    on_gpu = music_features_batch(clips, device="cuda", workers=0)
    for name, cols in group_columns().items():
        np.testing.assert_allclose(
            on_gpu[:, cols], batched[:, cols], rtol=1e-3, atol=1e-3, err_msg=name
        )
