"""The merge-method registry.

A method is a small object registered under a name. The engine streams keys and calls the method per key; a
method never sees whole models. Two kinds exist:

* ``linear``: the result is ``sum_i c_i * x_i`` with coefficients from :meth:`MergeMethod.coefficients`. The
  engine fuses the conversion to fp32 and the accumulation in cache-sized chunks, so a linear method costs one
  read of each input and one write of the output (weighted sum, add difference).
* ``tensor``: :meth:`MergeMethod.merge_tensor` receives the fp32 tensors of one key from every input that has
  it (on the merge device) and returns the merged fp32 tensor. Memory is N tensors of that key. A method whose
  function is element-wise sets ``chunkable = True`` and is then called on slices of the key instead (CPU). Off
  the CPU a method that sets ``streams_on_device`` gets the inputs' host views and ``KeyContext.load``, which
  brings slices of them to the device, so that its device memory does not grow with N (every built-in one does).

Inputs are typed: :meth:`MergeMethod.input_kinds` says which input is the base (``takes_base``: input 0), which
are role-bound (A, B, C) and which are ordinary models, and the plan refuses a key the base lacks instead of
shifting roles.

Methods are looked up with :func:`get_method`; :func:`register` adds one (one module per method, imported by the
package).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import ManifestError


@dataclass(frozen=True)
class Param:
    """A float parameter of a method. ``per_block`` parameters may be given per UNet block."""

    name: str
    default: float
    min: float
    max: float
    doc: str = ""
    per_block: bool = True


@dataclass
class KeyContext:
    """What a method may know about the key it is merging."""

    key: str
    seed: int = 0
    input_names: Sequence[str] = ()
    sources: Sequence[int] = ()  # manifest indices of the inputs passed in, in order
    offset: int = 0  # element offset of the slices passed in (chunkable methods), so per-element randomness is chunk-independent
    # A contiguous fp32 buffer of at least as many elements as the tensors passed in, on the merge device, that a
    # tensor method may write its result into and return (a view of): a caller that keeps one between keys (or
    # chunks) saves the allocation and the page faults of a fresh result each time. The caller must be done with the
    # previous result before it passes the buffer again. None: the method allocates its result.
    out: Any = None
    # Off the CPU, for a method with ``streams_on_device``: ``load(j, s, e)`` gives elements s..e of input j as an
    # fp32 tensor on ``device`` (read only), and the tensors passed in are the inputs' host views (file dtype), only
    # for their sizes. The method merges in slices it loads, so no input is ever whole on the device. The engine's
    # ``load`` also has ``load.hold(j)``: input j crosses the bus once, whole, in its file dtype, for a method that
    # reads it several times (later loads widen slices of that copy; same values).
    load: Optional[Callable[[int, int, int], Any]] = None
    device: Any = None


class MergeMethod:
    name: str = ""
    description: str = ""
    kind: str = "linear"  # "linear" or "tensor"
    chunkable: bool = False
    native_inputs: bool = False  # CPU: receive the inputs' views in their file dtype and widen slices itself (memory flat in N)
    streams_on_device: bool = False  # off the CPU: load slices through KeyContext.load (device memory flat in N)
    params: Tuple[Param, ...] = ()
    min_inputs: int = 2
    max_inputs: Optional[int] = None
    roles: Optional[Tuple[str, ...]] = None  # names of fixed input positions (e.g. A, B, C)
    uses_weights: bool = True
    takes_base: bool = False  # input 0 is a common base model (task arithmetic, TIES, DARE)
    memory_note: str = ""

    def coefficients(self, weights: Sequence[float], params: Dict[str, float]) -> List[float]:
        raise NotImplementedError

    def merge_tensor(self, tensors, weights: Sequence[float], params: Dict[str, float], ctx: KeyContext):
        raise NotImplementedError

    # -- helpers --------------------------------------------------------------------------------------------------
    def default_params(self) -> Dict[str, float]:
        return {p.name: p.default for p in self.params}

    def check_params(self, params: Dict[str, float]) -> Dict[str, float]:
        """Fill defaults and validate ranges; raises ManifestError naming the parameter."""
        known = {p.name: p for p in self.params}
        out = self.default_params()
        for k, v in (params or {}).items():
            if k not in known:
                raise ManifestError(
                    f"method {self.name!r} has no parameter {k!r}; it takes: {', '.join(known) or 'none'}"
                )
            p = known[k]
            values = v if isinstance(v, (list, tuple)) else [v]
            for x in values:
                if not isinstance(x, (int, float)) or isinstance(x, bool) or x != x or not (p.min <= x <= p.max):
                    raise ManifestError(f"parameter {k!r} of {self.name!r} must be a number in [{p.min}, {p.max}], got {x!r}")
            out[k] = v
        return out

    def input_kinds(self, n: int) -> List[str]:
        """What each of ``n`` inputs is: ``"base"`` (input 0 of a base-taking method), a role name, or ``"model"``."""
        if self.roles:
            return list(self.roles[:n])
        if self.takes_base:
            return ["base"] + ["model"] * (n - 1)
        return ["model"] * n

    def check_inputs(self, n: int) -> None:
        if n < self.min_inputs or (self.max_inputs is not None and n > self.max_inputs):
            want = (
                str(self.min_inputs)
                if self.max_inputs == self.min_inputs
                else f"{self.min_inputs}..{self.max_inputs if self.max_inputs is not None else 'N'}"
            )
            raise ManifestError(f"method {self.name!r} takes {want} models, got {n}")


_REGISTRY: Dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if not method.name or method.name in _REGISTRY:
        raise ValueError(f"bad or duplicate method name {method.name!r}")
    if method.kind not in ("linear", "tensor"):
        raise ValueError(f"method {method.name!r}: kind must be 'linear' or 'tensor'")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ManifestError(f"unknown merge method {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def list_methods() -> List[str]:
    return sorted(_REGISTRY)
