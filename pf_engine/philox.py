"""The random-stream contract: every draw of a search, and where in Philox it comes from.

Every draw is Triton's ``tl.rand(seed, offset)`` (Philox4x32-10, first word, as a
float32 in [0, 1)), so the CPU, the GPU and the plain-Python reference in the
tests make the same draws. A search keys each draw by what it is for, never by
how problems were batched::

    offset bits   63 | 62 ........ 43 | 42 ........ 23 | 22 ...... 12 | 11 ....... 0
                   0 |    problem     |     round      |     slot     | token in step
                     |    20 bits     |    20 bits     |   11 bits    |   12 bits

    token in step   0 .. 4091   the policy's token draws (seed = the search's seed)
                    4093        particle Gibbs: the next reference      } seed ^ SEARCH_STREAM,
                    4094        particle Gibbs: the reference's ancestor } the search stream
                    4095        resampling                               }

A round is ``sweep * max_steps + step``. Token draws go through inverse-CDF
sampling (:func:`pf_engine.sampling.sample`); the others are uniforms handed to
the resampling step or to a one-row inverse-CDF draw.

The fused resampling step, called without uniforms, draws particle ``i``'s own
uniform at ``offset = (counter << 32) + i``: that is its own contract (a caller
that names a call by ``counter``), not a search's.
"""

import numpy as np
import torch

from pf_engine._native import _C

PROBLEM_BITS, ROUND_BITS, SLOT_BITS, TOKEN_BITS = 20, 20, 11, 12
MAX_PROBLEMS = 1 << PROBLEM_BITS  # problems of one solve call
MAX_ROUNDS = 1 << ROUND_BITS  # iterations * max_steps
MAX_SLOTS = 1 << SLOT_BITS  # particles of one problem
REFERENCE_TOKEN = 4093  # particle Gibbs: the next reference
ANCESTOR_TOKEN = 4094  # particle Gibbs: the reference's ancestor
RESAMPLE_TOKEN = 4095  # resampling
MAX_STEP_TOKENS = REFERENCE_TOKEN - 1  # a step's tokens: 4092 and up are reserved
SEARCH_STREAM = 0x5DEECE66D  # xor-ed into the seed of the draws that are not tokens

_M32 = 0xFFFFFFFF


def philox_key(problem, round_, slot, token) -> torch.Tensor:
    """int64 offsets of the bit layout above; each field an int, an int tensor or an int array (all
    numpy or ints: composed in numpy, a few small ops where torch would take tens of microseconds)."""
    fields = (problem, round_, slot, token)
    if any(isinstance(x, torch.Tensor) for x in fields):
        problem, round_, slot, token = (torch.as_tensor(x, dtype=torch.int64) for x in fields)
    else:
        problem, round_, slot, token = (np.asarray(x, dtype=np.int64) for x in fields)
    key = (problem << (ROUND_BITS + SLOT_BITS + TOKEN_BITS)) | (round_ << (SLOT_BITS + TOKEN_BITS)) \
        | (slot << TOKEN_BITS) | token
    return key if isinstance(key, torch.Tensor) else torch.from_numpy(np.asarray(key))


def search_uniforms(seed: int, problem, round_, slot, token: int) -> torch.Tensor:
    """Uniforms of the draws that are not tokens (resampling, particle Gibbs): the search stream
    at the reserved ``token`` field."""
    return philox_uniform(seed ^ SEARCH_STREAM, philox_key(problem, round_, slot, token))


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.rand(seed, offsets)`` bit for bit: natively for CPU offsets (the torch replica costs
    ~100 small ops), else :func:`philox_uniform_reference`.

    offsets: int64 tensor; returns float32 in [0, 1) of the same shape.
    """
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if offsets.device.type != "cpu":
        return philox_uniform_reference(seed, offsets)
    offsets = offsets.to(torch.int64).contiguous()
    out = torch.empty(offsets.shape, dtype=torch.float32)
    _C.philox_uniforms(seed=seed, offsets=offsets.data_ptr(), n=offsets.numel(), out=out.data_ptr())
    return out


def philox_uniform_reference(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Bit-exact torch replica of ``tl.rand(seed, offsets)`` (Philox4x32-10): the test oracle.

    offsets: int64 tensor; returns float32 in [0, 1) of the same shape.
    """
    c0, c1 = offsets & _M32, (offsets >> 32) & _M32
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        # 32 x 32-bit products wrap in int64, but their low 64 bits stay exact.
        pa, pb = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((pb >> 32) & _M32) ^ c1 ^ k0, pb & _M32, ((pa >> 32) & _M32) ^ c3 ^ k1, pa & _M32
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # as int32
    x = torch.where(x < 0, ~x, x)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)
