"""Separation metrics, as "Mamba2 Meets Silence" reports them: uSDR, the Music Demixing Challenge's "new SDR",
and cSDR, BSS Eval v4 as in SiSEC 2018 / MUSDB18 (museval).

Signals are arrays shaped (channels, samples). A score that cannot be defined is `nan`:
- uSDR when the reference is digitally silent (the ratio would only measure the estimate's energy against δ);
- cSDR when the reference or the estimate is digitally silent over the whole track (museval refuses such a
  source: it would make the projection ambiguous), or when every 1 s frame is undefined (museval leaves a frame
  undefined when any source in it is silent).

cSDR needs the optional `museval` package (`pip install "bsmamba2[eval]"`) and, because museval imports musdb
and stempeg, an `ffmpeg` executable on the PATH; museval is imported only when cSDR is asked for.
"""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np

from .errors import BSMamba2Error

USDR_DELTA = 1e-7
CSDR_FILTER_TAPS = 512  # museval's default `filters_len`, the SiSEC 2018 setting


def usdr(reference: np.ndarray, estimate: np.ndarray, delta: float = USDR_DELTA) -> float:
    """10·log10((Σ s² + δ) / (Σ (s − ŝ)² + δ)) over all channels and samples; nan for a silent reference."""
    reference = np.asarray(reference, dtype=np.float64)
    estimate = np.asarray(estimate, dtype=np.float64)
    if reference.shape != estimate.shape:
        raise ValueError(f"reference {reference.shape} and estimate {estimate.shape} differ in shape")
    if not np.any(reference):
        return float("nan")
    signal = np.sum(reference ** 2) + delta
    distortion = np.sum((reference - estimate) ** 2) + delta
    return float(10 * np.log10(signal / distortion))



def band_snrs(reference: np.ndarray, estimate: np.ndarray, sample_rate: int, edges_hz) -> list:
    """The SNR (dB) of `estimate` in each band between consecutive `edges_hz`: the reference's energy there over the
    error's; (channels, samples) arrays. Where a stem's estimate goes wrong, in frequency."""
    frequencies = np.fft.rfftfreq(reference.shape[-1], 1 / sample_rate)
    reference_power = np.sum(np.abs(np.fft.rfft(reference)) ** 2, axis=0)
    error_power = np.sum(np.abs(np.fft.rfft(reference - estimate)) ** 2, axis=0)
    snrs = []
    for low, high in zip(edges_hz, edges_hz[1:]):
        band = (frequencies >= low) & (frequencies < high)
        snrs.append(float(10 * np.log10(max(reference_power[band].sum(), 1e-12) / max(error_power[band].sum(), 1e-12))))
    return snrs

def museval_missing_reason() -> Optional[str]:
    """Why cSDR cannot be computed here, or None when museval imports."""
    try:
        import museval  # noqa: F401
    except ImportError as error:
        return f"museval is not installed ({error}); install it with: pip install \"bsmamba2[eval]\""
    except RuntimeError as error:  # museval imports musdb → stempeg, which refuses to import without ffmpeg
        return f"museval cannot be imported: {str(error).splitlines()[0]}"
    return None


def csdr(references: np.ndarray, estimates: np.ndarray, sample_rate: int) -> np.ndarray:
    """cSDR of each source: BSS Eval v4 over all sources together, one score per source.

    `references` and `estimates` are (sources, channels, samples). As museval's `evaluate` (the MUSDB18 / SiSEC
    2018 protocol): every estimate is projected on all references with 512-tap time-invariant filters computed
    over the whole track, SDR is measured in frames of window = hop = 1 s, and a source's score is the median
    over its defined frames. Sources whose reference or estimate is silent are left out and scored nan.
    """
    reason = museval_missing_reason()
    if reason is not None:
        raise BSMamba2Error(f"cSDR unavailable: {reason}")
    import museval

    references = np.asarray(references, dtype=np.float64)
    estimates = np.asarray(estimates, dtype=np.float64)
    if references.ndim != 3 or references.shape != estimates.shape:
        raise ValueError(f"expected references and estimates of one shape (sources, channels, samples), got "
                         f"{references.shape} and {estimates.shape}")
    scores = np.full(len(references), np.nan)
    # museval's own silence test (a source whose channels sum to zero at every sample), so it never refuses
    # what we pass it.
    scorable = [i for i in range(len(references))
                if np.any(references[i].sum(axis=0)) and np.any(estimates[i].sum(axis=0))]
    if not scorable:
        return scores
    framewise_sdr, _, _, _ = museval.evaluate(
        references[scorable].transpose(0, 2, 1),  # museval wants (sources, samples, channels)
        estimates[scorable].transpose(0, 2, 1),
        win=int(sample_rate), hop=int(sample_rate), mode="v4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "All-NaN slice": a track without a defined frame
        scores[scorable] = np.nanmedian(framewise_sdr, axis=1)
    return scores


def score_track(references: dict, estimates: dict, mixture: np.ndarray, sample_rate: int,
                with_csdr: bool = True) -> dict:
    """uSDR and cSDR of every estimated stem of one track: {stem: {"usdr": float, "csdr": float}} (nan = undefined).

    cSDR follows museval's MUSDB18 evaluation of a track (`eval_mus_track`): the estimated stems are evaluated
    together. A single stem is evaluated together with its complement, rest = mixture − stem (reference and
    estimate alike), as MUSDB18 scores a vocals model on vocals + accompaniment; only the model's own stems are
    reported. (A stem's SDR depends on its own reference only; the other sources count through museval's rule
    that a frame where any source is silent is undefined, e.g. the a-cappella seconds of a song.)
    """
    stems = list(estimates)
    scores = {stem: {"usdr": usdr(references[stem], estimates[stem]), "csdr": float("nan")} for stem in stems}
    if with_csdr:
        reference_sources = [references[stem] for stem in stems]
        estimated_sources = [estimates[stem] for stem in stems]
        if len(stems) == 1:
            reference_sources.append(mixture - reference_sources[0])
            estimated_sources.append(mixture - estimated_sources[0])
        track_csdr = csdr(np.stack(reference_sources), np.stack(estimated_sources), sample_rate)
        for stem, value in zip(stems, track_csdr):
            scores[stem]["csdr"] = float(value)
    return scores
