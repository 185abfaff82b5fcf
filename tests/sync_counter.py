"""Counting host-device synchronisations on a CPU, where there is no device to wait for.

On a CPU every tensor lives on the host, so ``torch.cuda.set_sync_debug_mode`` has nothing to say. ``SyncCounter``
is a ``TorchFunctionMode`` that tracks which tensors *would* live on an accelerator and counts the calls that would
make the host wait for it there:

Device tensors are

- the parameters and buffers of the modules given to ``SyncCounter(...)``, and their gradients;
- the result of moving a host tensor to a device (``Tensor.to`` naming a device or a tensor, ``.cuda()``,
  ``torch.tensor(data, device=...)``);
- tensors a factory makes with an explicit ``device=`` (``torch.arange(n, device=x.device)``), when called from
  outside torch (``torch.load`` makes host tensors so too);
- whatever a torch function computes from a device tensor.

Everything else (a collator's batch, ``torch.tensor(list)``, an optimizer's step counter) is a host tensor, as it
would be on a GPU. A *sync* is then

- ``read``: a device tensor's values reaching Python or host memory: ``item``, ``tolist``, ``numpy``, ``bool()``,
  ``int()``, ``float()``, ``format()``, ``.cpu()`` or ``.to("cpu")`` (a device tensor's ``.to(device)`` is taken
  as device to device: on the CPU both are "cpu");
- ``shape``: an op whose output size depends on a device tensor's values (``nonzero``, ``masked_select``,
  ``unique``, indexing with a boolean tensor, ...), ``torch.equal`` and ``allclose``;
- ``upload``: a blocking host-to-device copy: ``.to(device)`` of a host tensor without ``non_blocking=True``,
  ``new_tensor``/``torch.tensor``/``as_tensor`` of host data onto a device (PyTorch waits for the stream after a
  copy that is not ``non_blocking``).

Each sync is recorded with its kind and the first frame outside torch that made it (``where``), so a test that
pins a count can say what changed.
"""

from __future__ import annotations

import collections
import sys
import traceback
import weakref

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

_READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__format__", "cpu"}
_SHAPES = {
    "nonzero",
    "nonzero_static",
    "argwhere",
    "masked_select",
    "unique",
    "unique_consecutive",
    "equal",
    "allclose",
    "repeat_interleave",
    "bincount",
}
_UPLOADS = {"new_tensor", "tensor", "as_tensor"}
_FACTORIES = {
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "rand",
    "randn",
    "randint",
    "linspace",
    "eye",
    "new_ones",
}
_FACTORIES |= {"new_zeros", "new_empty", "new_full"}


class SyncCounter(TorchFunctionMode):
    def __init__(self, *modules: torch.nn.Module):
        super().__init__()
        self._device: dict[int, weakref.ref] = {}  # id -> the tensor (ids are reused: the ref tells)
        self._hooks = []
        self.syncs: list[tuple[str, str, str]] = []
        """(kind, function, where) of every sync, in order."""
        for module in modules:
            self.watch(module)

    def watch(self, module: torch.nn.Module) -> None:
        """Take ``module``'s parameters, buffers and (once computed) gradients as device tensors."""
        for tensor in [*module.parameters(), *module.buffers()]:
            self._mark(tensor)
            if tensor.requires_grad:
                self._hooks.append(tensor.register_post_accumulate_grad_hook(self._mark_grad))

    def _mark_grad(self, parameter: torch.Tensor) -> None:
        self._mark(parameter.grad)

    def __exit__(self, *args):
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*args)

    @property
    def count(self) -> int:
        return len(self.syncs)

    def by_kind(self) -> dict[str, int]:
        return dict(collections.Counter(kind for kind, _, _ in self.syncs))

    def made_by(self, package: str) -> int:
        """Syncs whose innermost frame outside torch is in ``package`` (a directory name: "mrpo", "transformers")."""
        return sum(f"/{package}/" in where for _, _, where in self.syncs)

    def table(self) -> str:
        counts = collections.Counter(self.syncs)
        return "\n".join(
            f"{n:3d} x {kind:6s} {name:14s} {'/'.join(where.rsplit('/', 2)[-2:])}"
            for (kind, name, where), n in counts.items()
        )

    def reset(self) -> None:
        self.syncs.clear()

    def _mark(self, tensor: torch.Tensor) -> None:
        self._device[id(tensor)] = weakref.ref(tensor)

    def is_device(self, tensor: object) -> bool:
        reference = self._device.get(id(tensor))
        return reference is not None and reference() is tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        tensors = [leaf for leaf in tree_flatten((args, kwargs))[0] if isinstance(leaf, torch.Tensor)]
        on_device = any(self.is_device(t) for t in tensors)
        kind = self._sync_kind(name, args, kwargs, on_device)
        if kind is not None:
            self.syncs.append((kind, name, _caller()))
        result = func(*args, **kwargs)
        if kind == "read" and result is args[0]:
            result = (
                result.clone()
            )  # on the CPU .cpu() returns its input: the copy on the host is a host tensor
        if self._makes_device_tensor(name, args, kwargs, on_device):
            if name in ("to", "cuda") and not on_device and result is args[0]:
                result = (
                    result.clone()
                )  # on the CPU .to() returns its input: keep the host tensor a host tensor
            for leaf in tree_flatten(result)[0]:
                if isinstance(leaf, torch.Tensor):
                    self._mark(leaf)
        return result

    def _sync_kind(self, name: str, args, kwargs, on_device: bool) -> str | None:
        if on_device:
            if name in _READS or (name == "to" and _target_device(args, kwargs) == "cpu-literal"):
                return "read"
            if name in _SHAPES or (name in ("__getitem__", "__setitem__") and _boolean_index(args)):
                return "shape"
            if name == "where" and len(args) + len(kwargs) == 1:
                return "shape"
            if name == "new_tensor":
                return "upload"
            return None
        if _moves_to_device(name, args, kwargs) and not kwargs.get("non_blocking", False):
            return "upload" if args and isinstance(args[0], torch.Tensor) else None
        if name in _UPLOADS and kwargs.get("device") is not None:
            return "upload"
        return None

    def _makes_device_tensor(self, name: str, args, kwargs, on_device: bool) -> bool:
        if name == "cpu" or (name == "to" and _target_device(args, kwargs) == "cpu-literal"):
            return False
        if on_device:
            return name not in _READS
        if name in ("to", "cuda"):
            return _moves_to_device(name, args, kwargs)
        if name in _FACTORIES and kwargs.get("device") is not None:
            return "/torch/" not in traceback.extract_stack(sys._getframe(2), limit=1)[0].filename
        return name in _UPLOADS and kwargs.get("device") is not None


def _target_device(args, kwargs) -> str | None:
    """Whether a ``Tensor.to`` call names a device: "cpu-literal" for the string "cpu", "device" for any other."""
    candidates = [*args[1:], kwargs.get("device"), kwargs.get("other")]
    for value in candidates:
        if isinstance(value, str):
            return "cpu-literal" if value == "cpu" else "device"
        if isinstance(value, (torch.device, int)) and not isinstance(value, bool):
            return "device"
        if isinstance(value, torch.Tensor):
            return "device"
    return None


def _moves_to_device(name: str, args, kwargs) -> bool:
    return name == "cuda" or (name == "to" and _target_device(args, kwargs) == "device")


def _boolean_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def _caller() -> str:
    """The innermost frame outside torch and this file: file:line function."""
    for frame in reversed(traceback.extract_stack(sys._getframe(2))):
        if "/torch/" in frame.filename or frame.filename == __file__:
            continue
        return f"{frame.filename}:{frame.lineno} {frame.name}"
    return "?"
