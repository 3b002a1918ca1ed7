"""What a reader of a run's store may rely on at any moment, checked from outside: the checkpoint pointer names
only complete, loadable checkpoints, and metrics.json (the "finished" mark) lies only beside a complete model."""

from __future__ import annotations

import os
import shutil

import tensorflow as tf

from trainer.run_dir import METRICS, MODEL, MODEL_MARKERS, POINTER, parse_pointer
from trainer.storage import GCSStore


def observe(url: str, workdir: str) -> str:
    """One observation of the store at `url`: 'checked', 'empty' (no pointer yet) or 'superseded' (the pointer
    moved on while it was read: not an observation); AssertionError for a violation."""
    store = GCSStore(url)
    finished = store.read(METRICS) is not None
    if finished:
        present = store.list(f"{MODEL}/")
        missing = [m for m in MODEL_MARKERS if f"{MODEL}/{m}" not in present]
        assert not missing, f"{METRICS} in the store beside an incomplete model (no {missing})"
    pointer = store.read(POINTER)
    if pointer is None:
        assert not finished, f"{METRICS} in the store without a checkpoint pointer"
        return "empty"
    latest, kept = parse_pointer(pointer)
    os.makedirs(workdir, exist_ok=True)
    try:
        for name in [latest] + kept:
            files = list(store.list(f"checkpoints/{name}."))
            try:
                for file in files:
                    store.download(file, os.path.join(workdir, file.split("/")[-1]))
                reader = tf.train.load_checkpoint(os.path.join(workdir, name))
                for variable in reader.get_variable_to_shape_map():
                    reader.get_tensor(variable)
            except Exception:
                if store.read(POINTER) != pointer:
                    return "superseded"
                raise AssertionError(f"the pointer names a missing or partial checkpoint {name}: {files}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return "checked"
