"""A live session's output audio at 48 kHz without letting go of the GIL on every chunk.

The output is resampled on the server's event loop, 20 ms at a time per talking session.
libswresample (through PyAV) releases the GIL around each conversion, so every chunk hands the
GIL to whichever of the process's threads wants it and the loop waits until that thread lets
go, up to the switch interval: 16 us of work cost ~350 us beside one busy thread
(bench/gil_release_cost.py, docs/benchmarks.md). For mono input at an integer fraction of
48 kHz (8, 12, 16, 24 kHz: what speech producers send) :class:`OutputResampler` upsamples with a
windowed-sinc polyphase filter in numpy instead, which on arrays this small keeps the GIL. Other
input (44.1 kHz, several channels, 48 kHz itself) goes through :class:`MonoResampler` as before.
The features' 16 kHz path is not touched: live and offline features stay identical.

Timing matches :class:`MonoResampler`: output sample ``m`` is the input at time ``m / L`` (no
filter delay in the timeline; the filter's look-ahead is held back and released by
:meth:`OutputResampler.flush`), and a stream's total is exactly ``L`` times its input.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from pipeline.audio.decode import MonoResampler, _join

#: Input samples each side of an output sample that the filter reads. 16 (a 2 ms look-ahead at
#: 8 kHz, 1 ms at 16 kHz) with the Kaiser window below keeps the images of a 16 kHz stream at
#: -76 dB or lower (a 7 kHz tone's first image, at 9 kHz; tests/test_upsample.py).
HALF_TAPS = 16
KAISER_BETA = 8.6
#: Passband edge as a fraction of the input's sample rate (Nyquist is 0.5): 0.45 keeps speech
#: to 7.2 kHz of a 16 kHz stream and leaves the transition band room below Nyquist.
CUTOFF = 0.45


def polyphase_bank(factor: int, half_taps: int = HALF_TAPS) -> np.ndarray:
    """float32 [2 * half_taps + 1, factor]: column ``k`` weighs the input window around position
    ``i`` to make output ``i * factor + k`` (window index ``p`` is input ``i - half_taps + p``)."""
    p = np.arange(2 * half_taps + 1)[:, None]
    k = np.arange(factor)[None, :]
    t = half_taps - p + k / factor  # distance from the output's time to each input sample
    window = np.kaiser(2 * (2 * half_taps + 1) + 1, KAISER_BETA)  # sampled finely enough for t
    span = half_taps + 1.0
    w = np.interp(t, np.linspace(-span, span, len(window)), window, left=0.0, right=0.0)
    bank = 2 * CUTOFF * np.sinc(2 * CUTOFF * t) * w
    bank /= bank.sum(axis=0, keepdims=True)  # every phase passes DC at exactly 1
    return bank.astype(np.float32)


class PolyphaseUpsampler:
    """Streams mono float32 up by an integer ``factor``; output aligned to the input (module)."""

    def __init__(self, factor: int, half_taps: int = HALF_TAPS) -> None:
        if factor < 1:
            raise ValueError("factor must be >= 1")
        self.factor = factor
        self._half = half_taps
        self._bank = polyphase_bank(factor, half_taps)
        self._reset()

    def _reset(self) -> None:
        # The buffer starts at the window of the next position to make: position 0's window
        # reaches half_taps samples before the stream, which read as silence.
        self._buffer = np.zeros(self._half, np.float32)
        self._done = 0  # input positions already turned into output
        self._in = 0  # input samples of this stream

    def push(self, samples: np.ndarray) -> np.ndarray:
        """The output samples ready after ``samples`` (those whose look-ahead has arrived)."""
        samples = np.asarray(samples, np.float32).reshape(-1)
        self._in += len(samples)
        self._buffer = np.concatenate([self._buffer, samples])
        return self._emit()

    def flush(self) -> np.ndarray:
        """End of stream: the held-back samples, so that the stream's total is ``factor`` times
        its input; the next push starts a fresh stream."""
        self._buffer = np.concatenate([self._buffer, np.zeros(self._half, np.float32)])
        tail = self._emit()
        self._reset()
        return tail

    def _emit(self) -> np.ndarray:
        width = 2 * self._half + 1
        ready = min(len(self._buffer) - width + 1, self._in - self._done)
        if ready <= 0:
            return np.zeros(0, np.float32)
        # Measured, not obvious: the product over sliding_window_view's windows kept the GIL
        # beside a busy thread (75-93 us per 20 ms chunk), while the same windows built with
        # np.ndarray(buffer=..., strides=...) took 6.5 instead of 12 us alone but 205-316 us
        # beside it, and a contiguous copy (BLAS) 195 us: those release the GIL.
        out = (sliding_window_view(self._buffer, width)[:ready] @ self._bank).reshape(-1)
        self._done += ready
        self._buffer = self._buffer[ready:]
        return out


class OutputResampler:
    """A live session's output audio as mono float32 at ``rate`` (48 kHz), chunk by chunk: the
    polyphase path for mono input at ``rate / L`` (module docstring), libswresample for the rest.
    A change of rate or layout mid-stream flushes the old path first, as MonoResampler does."""

    def __init__(self, rate: int = 48000) -> None:
        self.rate = rate
        self._source: tuple[int, str] | None = None
        self._path: PolyphaseUpsampler | MonoResampler | None = None

    def push_planar(self, planar: np.ndarray, sample_rate: int, layout: str) -> np.ndarray:
        out = []
        if self._source is not None and self._source != (sample_rate, layout):
            out.append(self.flush())
        if self._path is None:
            self._source = (sample_rate, layout)
            factor = self.rate // sample_rate if sample_rate and self.rate % sample_rate == 0 else 0
            if layout == "mono" and factor > 1:
                self._path = PolyphaseUpsampler(factor)
            else:
                self._path = MonoResampler(self.rate)
        if isinstance(self._path, PolyphaseUpsampler):
            out.append(self._path.push(planar[0]))
        else:
            out.append(self._path.push_planar(planar, sample_rate, layout))
        return _join(out)

    def flush(self) -> np.ndarray:
        """End of the producer's stream: the remaining samples; the next push starts afresh."""
        path, self._path, self._source = self._path, None, None
        if path is None:
            return np.zeros(0, np.float32)
        return path.flush()
