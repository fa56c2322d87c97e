"""dtype codes shared with csrc/include/mdlm/common.h (enum mdlm::DType)."""

import torch

FLOAT32 = 0
BFLOAT16 = 1
FLOAT16 = 2
FLOAT64 = 3
INT64 = 4
INT32 = 5

_CODES = {
    torch.float32: FLOAT32,
    torch.bfloat16: BFLOAT16,
    torch.float16: FLOAT16,
    torch.float64: FLOAT64,
    torch.int64: INT64,
    torch.int32: INT32,
}


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return _CODES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no mdlm_kernels dtype code (supported: {list(_CODES)})") from None
