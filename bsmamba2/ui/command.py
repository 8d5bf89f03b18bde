"""`bsmamba2 ui`: a web page on this machine to separate songs, follow their progress, and listen to, look at and
download the stems.

    bsmamba2 ui                        # http://127.0.0.1:8765/ opens in the browser
    bsmamba2 ui --model bsmamba2-vocals-msst --port 9000 --no-browser

One model is loaded and kept; jobs are separated one at a time, in the order received (docs/ui.md).
"""
from __future__ import annotations

import argparse

from ..errors import BSMamba2Error
from ..separate import add_model_flags

DEFAULT_PORT = 8765
DEFAULT_MAX_UPLOAD_MB = 500


def add_arguments(parser: argparse.ArgumentParser) -> None:
    web = parser.add_argument_group("web app")
    web.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default: %(default)s, this machine only; another address lets "
                          "other machines use the app, with no login)")
    web.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s; 0: any free one)")
    web.add_argument("--no-browser", action="store_true", help="only print the address, do not open a browser")
    web.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, metavar="MB",
                     help="largest file accepted, in MB = 10^6 bytes (default: %(default)s)")
    web.add_argument("--keep", action="store_true",
                     help="keep the working folder (uploads and results) when the app stops (default: delete it)")
    add_model_flags(parser)


def run(args: argparse.Namespace) -> int:
    try:
        from . import server
    except ImportError as missing:
        raise BSMamba2Error(f"the web app needs {missing.name.partition('.')[0]}: pip install \"bsmamba2[ui]\"") from None
    return server.run(args)
