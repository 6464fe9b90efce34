import os

import torch

# The Triton interpreter must be chosen before triton is first imported; without a GPU it is the only way
# the Triton kernels run (BUILD_NOTES.md).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
