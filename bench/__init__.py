"""Benchmarks: kdgate against the bare-ASGI ceiling and a naive FastAPI server, in one run.

Run with `make bench` (= `python -m bench`); `python -m bench --help` lists the options and
docs/benchmarks.md the method and the latest figures. Not part of the installed package.
"""
