"""How the package says a number of bytes: in MB = 10^6 bytes (GB = 10^9), as pip, Hugging Face and browsers count
them; files, downloads, uploads and memory alike, so that one figure reads the same in the CLI, the page and docs.
(scripts/gpu_check.py counts in MiB: the limits of the GPU machine it packs its results into are set in MiB.)"""

MB = 10 ** 6
GB = 10 ** 9


def megabytes(size: float) -> str:
    """`size` bytes for a person: "192.6 MB"."""
    return f"{size / MB:.1f} MB"
