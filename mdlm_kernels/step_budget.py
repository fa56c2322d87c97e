"""What a step costs besides FLOPs, counted at the dispatcher: host reads, launches, saved activations.

``StepBudget`` is a context manager (a ``TorchDispatchMode`` plus ``saved_tensors_hooks``) that counts, for
everything run inside it, on any device (CPU counts stand for what the same code does on a GPU):

- ``host_reads``: operations that copy device data to the host and therefore synchronise a GPU stream with
  the CPU: scalar reads (``.item()``, ``float(t)``, ``bool(t)``, ``if t:``), data-sized ``nonzero`` /
  ``masked_select`` / ``unique``, and ``Tensor.tolist``; plus copies from pageable (unpinned) host memory to
  a device, which wait for the stream too (counted as "copy from pageable host memory": visible on a GPU
  only, since a CPU run has no device);
- ``launches``: dispatched operations that do work on the device (views, allocations and metadata ops
  excluded; a fused ``mdlm::`` op counts once even if it launches a few kernels): a proxy for kernel launches;
- ``saved_bytes``: bytes of the distinct storages autograd saved for backward while the context was open
  (each storage counted once, at its full size).

Counts are kept per phase: ``budget.phase("backward")`` attributes what follows to that phase until the next
call (the default phase is "step"). ``budget.summary()`` gives the totals and the per-phase split.

Host-side computations on CPU tensors that stand for no device work (the host's own draw of the masking
kernel's times, a seed from torch's CPU generator) run inside ``host_side()`` and are not counted: in a CPU
test every tensor is a CPU tensor, so the code says which computations are the host's own.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["StepBudget", "host_side"]

_HOST_SIDE: contextvars.ContextVar[bool] = contextvars.ContextVar("mdlm_host_side", default=False)


@contextlib.contextmanager
def host_side():
    """Mark a computation as the host's own (CPU tensors, no device data): StepBudget does not count it."""
    token = _HOST_SIDE.set(True)
    try:
        yield
    finally:
        _HOST_SIDE.reset(token)

_READ_PREFIXES = ("aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.nonzero.", "aten.nonzero_numpy",
                  "aten.masked_select", "aten.unique", "aten._unique", "aten.equal")
# ops that launch no device work: allocation and metadata (views are recognised by their schema)
_NO_WORK = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default",
            "aten.new_empty.default", "aten.new_empty_strided.default", "aten.detach.default",
            "aten.lift_fresh.default", "aten._to_copy.default_noop", "aten.set_.source_Storage_storage_offset",
            "aten.resize_.default", "aten.sym_size.int", "aten.sym_stride.int", "aten.sym_numel.default",
            "aten.sym_storage_offset.default", "aten.is_same_size.default", "aten.result_type.Tensor",
            "prim.device.default", "aten.record_stream.default", "aten.nonzero_static.default_noop"}


def _is_host_read(name: str) -> bool:
    return name.startswith(_READ_PREFIXES) and not name.startswith("aten.nonzero_static")


def _pageable_upload(name: str, args, kwargs) -> bool:
    """A copy from unpinned CPU memory to a non-CPU device (synchronous with respect to the stream)."""
    if name == "aten._to_copy.default":
        src, dst_dev = args[0], kwargs.get("device")
    elif name == "aten.copy_.default":
        dst, src = args[0], args[1]
        dst_dev = dst.device if torch.is_tensor(dst) else None
    else:
        return False
    if not torch.is_tensor(src) or dst_dev is None or src.device.type != "cpu":
        return False
    if torch.device(dst_dev).type in ("cpu", "meta"):
        return False
    try:
        return not src.is_pinned()
    except Exception:
        return True


class StepBudget(TorchDispatchMode):
    """Counts host reads, device launches and saved-activation bytes of the code run inside it (see module)."""

    def __init__(self):
        super().__init__()
        self._phase = "step"
        self.reads = collections.Counter()        # phase -> host reads
        self.work = collections.Counter()         # phase -> launches
        self.read_ops = collections.Counter()     # op name -> host reads (to say where they come from)
        self._saved: dict = {}                    # storage key -> bytes
        self._stack = contextlib.ExitStack()
        self._tolist = None

    # -- phases and results ------------------------------------------------------------------------------
    def phase(self, name: str) -> None:
        self._phase = name

    @property
    def host_reads(self) -> int:
        return sum(self.reads.values())

    @property
    def launches(self) -> int:
        return sum(self.work.values())

    @property
    def saved_bytes(self) -> int:
        return sum(self._saved.values())

    def summary(self) -> dict:
        return {"host_reads": self.host_reads, "launches": self.launches, "saved_bytes": self.saved_bytes,
                "host_reads_by_phase": dict(self.reads), "launches_by_phase": dict(self.work),
                "host_reads_by_op": dict(self.read_ops)}

    # -- counting ----------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if _HOST_SIDE.get():
            pass
        elif _pageable_upload(name, args, kwargs or {}):
            self.reads[self._phase] += 1
            self.read_ops["copy from pageable host memory"] += 1
            self.work[self._phase] += 1
        elif _is_host_read(name):
            self.reads[self._phase] += 1
            self.read_ops[name] += 1
        elif not (getattr(func, "is_view", False) or name in _NO_WORK):
            self.work[self._phase] += 1
        return func(*args, **(kwargs or {}))

    def _pack(self, t: torch.Tensor):
        try:
            st = t.untyped_storage()
            key = (t.device, st.data_ptr(), st.nbytes()) if st.data_ptr() else id(st)
            self._saved[key] = st.nbytes()
        except Exception:  # tensors without storage (e.g. subclasses): count their own bytes
            self._saved[id(t)] = t.numel() * t.element_size()
        return t

    def __enter__(self):
        real = torch.Tensor.tolist
        budget = self

        def tolist(t):  # Tensor.tolist reads the data without dispatching an aten op
            if not _HOST_SIDE.get():
                budget.reads[budget._phase] += 1
                budget.read_ops["Tensor.tolist"] += 1
            return real(t)

        self._tolist = real
        torch.Tensor.tolist = tolist
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            torch.Tensor.tolist = self._tolist
            self._stack.close()
