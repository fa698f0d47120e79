"""The process's one OpenVINO Core, shared by the runtime loader (utils.runtimes) and the IR writer
(utils.openvino_model), below both so that neither imports the other."""
from __future__ import annotations

import functools

__all__ = ["openvino_core"]


@functools.cache
def openvino_core():
    """One OpenVINO Core per process, as OpenVINO advises: each Core loads its plugins, and compiled models
    outliving the Core that made them have crashed the interpreter when collected later."""
    import openvino as ov

    return ov.Core()
