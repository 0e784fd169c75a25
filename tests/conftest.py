"""Test setup: the repository root on sys.path; one torch thread (tiny models run faster without OpenMP spinning);
the patch_compile fixture."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)


@pytest.fixture
def patch_compile(monkeypatch):
    """patch_compile(backend) makes torch.compile record every graph it captures (the list returned) and compile it
    with backend; the default runs the captured graph as it is (dynamo's "eager"), which keeps tests fast."""
    def patch(backend=lambda gm, example_inputs: gm.forward):
        graphs, real_compile = [], torch.compile

        def recording(gm, example_inputs):
            graphs.append(gm)
            return backend(gm, example_inputs)
        monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kw: real_compile(fn, backend=recording, **kw))
        return graphs
    return patch
