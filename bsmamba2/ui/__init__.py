"""`bsmamba2 ui`: a local web page for separating songs, on top of `bsmamba2.api.Separator`.

Needs the `ui` extra (Starlette and uvicorn): `pip install "bsmamba2[ui]"`. The command module imports neither,
so `bsmamba2 --help` works without them.
"""
