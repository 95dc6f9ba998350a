import os

import pytest
import torch

# Triton kernels run under the CPU interpreter where there is no GPU; the
# variable must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def policy(tmp_path_factory):
    """A tiny random Llama over the character tokenizer (tests/tiny.py), saved once per run."""
    from tiny import save_tiny_policy

    folder = tmp_path_factory.mktemp("policy")
    save_tiny_policy(folder)
    return folder
