"""One op per module: Triton kernel, host launchers, public function."""

from .philox import philox4x32, philox_uniform  # noqa: F401
