"""Re-export of :mod:`mdlm_kernels.step_budget` (host reads, launches and saved bytes of a step)."""
from mdlm_kernels.step_budget import StepBudget, host_side

__all__ = ["StepBudget", "host_side"]
