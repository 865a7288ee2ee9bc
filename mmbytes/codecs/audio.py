"""Audio codec: WAV/FLAC/OGG -> mono 16-bit PCM at one sample rate -> little-endian int16 bytes.

Both bytes of every sample are modeled (MEGABYTE section 8): no mu-law, no 65,536-way softmax. Input that is not
already mono 16-bit PCM at the target rate is converted and the conversions are recorded in the metadata, or refused
with a message naming the file when ``convert`` is False.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmbytes.codecs import CodecError


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

    def read(self, path: Path) -> tuple[np.ndarray, int, list[str]]:
        """(samples,) int16 mono at the target rate, the rate, and the conversions applied."""
        import soundfile as sf

        try:
            info = sf.info(str(path))
            if info.frames <= 0:
                raise CodecError(f"{path}: no audio frames")
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
            if not changes:
                data, _ = sf.read(str(path), frames=frames, dtype="int16", always_2d=True)
                return data[:, 0], rate, changes
            data, _ = sf.read(str(path), frames=frames, dtype="float32", always_2d=True)
        except CodecError:
            raise
        except Exception as e:  # libsndfile: not audio, truncated, or a header that lies
            raise CodecError(f"{path}: not readable audio ({e})") from e
        if len(data) == 0:
            raise CodecError(f"{path}: no audio frames")
        mono = data.mean(axis=1)
        if rate != info.samplerate:
            import torch
            import torchaudio.functional as AF

            mono = AF.resample(torch.from_numpy(mono), info.samplerate, rate).numpy()
        return np.clip(np.round(mono * 32768.0), -32768, 32767).astype(np.int16), rate, changes

    def encode(self, path: Path) -> tuple[bytes, dict]:
        samples, rate, changes = self.read(path)
        meta = {"sample_rate": rate, "channels": 1, "sample_width": 2, "converted": changes}
        return samples.astype("<i2").tobytes(), meta

    def decode(self, data: bytes, meta: dict, out_path: Path) -> Path:
        import soundfile as sf

        samples = np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2")  # whole samples only
        sf.write(str(out_path), samples, meta["sample_rate"], subtype="PCM_16", format="WAV")
        return out_path
