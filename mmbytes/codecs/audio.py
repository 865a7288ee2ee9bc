"""Audio codec: WAV/FLAC/OGG -> mono 16-bit PCM at one sample rate -> little-endian int16 bytes.

Both bytes of every sample are modeled (MEGABYTE section 8): no mu-law, no 65,536-way softmax. Input that is not
already mono 16-bit PCM at the target rate is converted and the conversions are recorded in the metadata, or refused
with a message naming the file when ``convert`` is False.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmbytes.codecs import CodecError, check_decoded
from mmbytes.errors import OptionError


@dataclass
class AudioCodec:
    sample_rate: int | None = None
    """Target rate in Hz; None keeps each file's own rate."""
    convert: bool = True
    """Convert stereo, 8/24/32-bit and float input, and resample; False refuses such files."""
    max_seconds: float | None = None
    """Keep at most this many seconds from the start (a whole number of samples)."""

    name = "audio"
    modality = "audio"

    def __post_init__(self) -> None:
        if self.sample_rate is not None and (isinstance(self.sample_rate, bool) or not isinstance(self.sample_rate, int)
                                             or self.sample_rate < 1):
            raise OptionError(f"sample_rate must be a positive whole number of Hz, not {self.sample_rate!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise OptionError(f"max_seconds must be more than 0, not {self.max_seconds!r}")

    def read(self, path: Path) -> tuple[np.ndarray, int, list[str]]:
        """(samples,) int16 mono at the target rate, the rate, and the conversions applied. The decoded size (the
        float32 frames read and the int16 samples after resampling) is checked from the header before it is taken."""
        import soundfile as sf

        try:
            info = sf.info(str(path))
            if info.frames <= 0:
                raise CodecError(f"{path}: no audio frames")
            if info.samplerate <= 0:
                raise CodecError(f"{path}: sample rate {info.samplerate} Hz in the header")
            changes = []
            if info.subtype != "PCM_16":
                changes.append(f"{info.subtype} -> PCM_16")
            if info.channels != 1:
                changes.append(f"{info.channels} channels -> mono")
            rate = self.sample_rate or info.samplerate
            if rate != info.samplerate:
                changes.append(f"{info.samplerate} Hz -> {rate} Hz")
            if changes and not self.convert:
                raise CodecError(f"{path}: needs {', '.join(changes)} and conversion is off")
            frames = -1 if self.max_seconds is None else int(self.max_seconds * info.samplerate)
            kept = info.frames if frames < 0 else min(frames, info.frames)
            cut = [] if kept == info.frames else [
                f"first {kept:,} of {info.frames:,} frames kept (max_seconds={self.max_seconds:g})"]
            check_decoded(path, kept * info.channels * (4 if changes else 2), f"{kept:,} frames x {info.channels}"
                          " channels")
            check_decoded(path, -(-kept * rate // info.samplerate) * 2, f"{info.samplerate} Hz -> {rate} Hz")
            if not changes:
                data, _ = sf.read(str(path), frames=frames, dtype="int16", always_2d=True)
                return data[:, 0], rate, cut
            data, _ = sf.read(str(path), frames=frames, dtype="float32", always_2d=True)
        except CodecError:
            raise
        except Exception as e:  # libsndfile: not audio, truncated, or a header that lies
            raise CodecError(f"{path}: not readable audio ({e})") from e
        if len(data) == 0:
            raise CodecError(f"{path}: no audio frames")
        bad = ~np.isfinite(data)
        if bad.any():  # float files can hold NaN and infinities; int16 cannot
            changes.append(f"{int(bad.sum())} NaN or infinite values -> 0")
            data = np.where(bad, np.float32(0), data)
        mono = data.mean(axis=1)
        if rate != info.samplerate:
            mono = resample(mono, info.samplerate, rate)
        scaled = np.round(mono.astype(np.float64) * 32768.0)
        clipped = int(((scaled < -32768) | (scaled > 32767)).sum())
        if clipped:
            changes.append(f"{clipped} samples beyond full scale clipped")
        return np.clip(scaled, -32768, 32767).astype(np.int16), rate, changes + cut

    def encode(self, path: Path) -> tuple[bytes, dict]:
        samples, rate, changes = self.read(path)
        meta = {"sample_rate": rate, "channels": 1, "sample_width": 2, "converted": changes}
        return samples.astype("<i2").tobytes(), meta

    def decode(self, data: bytes, meta: dict, out_path: Path) -> Path:
        import soundfile as sf

        samples = np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2")  # whole samples only
        sf.write(str(out_path), samples, meta["sample_rate"], subtype="PCM_16", format="WAV")
        return out_path


def resample(x: np.ndarray, orig: int, new: int, zeros: int = 16) -> np.ndarray:
    """(N,) float32 at ``orig`` Hz -> (ceil(N * new / orig),) at ``new`` Hz. torchaudio's polyphase sinc resampler
    when the reduced rate ratio is small (its kernel has new/g x orig/g taps: 44,100 -> 16,000 is 441 x 160); for a
    ratio of coprime rates (16,001 -> 8,000) a windowed-sinc interpolation whose cost is ``2 * zeros`` taps per output
    sample, whatever the rates."""
    import math

    import torch

    g = math.gcd(orig, new)
    if (orig // g) * (new // g) <= 2**20:
        import torchaudio.functional as AF

        return AF.resample(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), orig, new).numpy()
    n_out = -(-len(x) * new // orig)
    cutoff = min(1.0, new / orig)  # low-pass below the lower Nyquist frequency
    width = zeros / cutoff  # in input samples, each side
    k = np.arange(-math.ceil(width) + 1, math.ceil(width) + 1)  # tap offsets
    padded = np.concatenate([np.zeros(len(k), np.float64), x.astype(np.float64), np.zeros(len(k), np.float64)])
    out = np.empty(n_out, np.float32)
    step = max(1, 2**22 // len(k))  # outputs per block: bounded memory
    for a in range(0, n_out, step):
        t = np.arange(a, min(a + step, n_out), dtype=np.float64) * orig / new  # (B,) positions in input samples
        base = np.floor(t).astype(np.int64)
        d = (t - base)[:, None] - k[None, :]  # (B, K) distance to each tap
        window = np.where(np.abs(d) < width, np.cos(np.pi * d / (2 * width)) ** 2, 0.0)  # Hann
        weights = cutoff * np.sinc(cutoff * d) * window
        out[a : a + len(t)] = (padded[base[:, None] + k[None, :] + len(k)] * weights).sum(1)
    return out
