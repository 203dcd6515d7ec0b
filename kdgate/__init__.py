"""kdgate: serve a distilled ONNX student, shadow its teacher, watch fidelity.

The distribution claims this one import name. Its parts live in the repository's top-level
folders and are reached here through links, so the repository keeps its layout and an installed
kdgate claims no generic top-level names (`service`, `monitoring`) in a user's environment:

    kdgate.service      HTTP layer and hot path
    kdgate.monitoring   fidelity maths, instruments, windows, drift, outbox + webhook
    kdgate.distill      teacher -> student -> ONNX -> gates -> model card (needs the `train` extra)
    kdgate/models       the embedded default model pair (package data)
    kdgate/runbooks     the alerts' runbooks, docs/runbooks (package data, served at /runbooks)
"""

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"
RUNBOOKS_DIR = Path(__file__).resolve().parent / "runbooks"
