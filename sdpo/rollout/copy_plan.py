"""A model's weight load, recorded once and replayed as plain copies.

vLLM's `model.load_weights` maps every checkpoint name to its parameter (stacked q/k/v and
gate/up projections, renamed prefixes) through generic Python on every call: at the quickstart's
size that mapping cost more than the copies it ends in. The in-place CPU load
(`vllm_ext.py`) records, on its first call, which slice of which parameter each incoming tensor is
copied into, and from then on copies straight there.

A recording is only kept when it provably replays the load: every copy went from a whole incoming
tensor into a view of a parameter, nothing but constant fills (padding rows) wrote to a parameter
otherwise, and replaying it over parameters filled with NaN gives back exactly what `load_weights`
gave them. Anything else (a loader that transposes, splits a tensor, or writes some other way) keeps
`load_weights` for every load. This module only touches torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.overrides import TorchFunctionMode

Load = Callable[[Iterable[tuple[str, torch.Tensor]]], Iterable[str] | None]


class CopyPlan:
    def __init__(self, targets: dict[str, list[tuple[torch.Tensor, torch.nn.Parameter, str]]], ignored: set[str],
                 fills: list[tuple[torch.Tensor, float, torch.nn.Parameter]]):
        self.targets = targets  # incoming name -> (view of a parameter, the parameter, its name) per copy
        self.ignored = ignored  # names the model's loader took and wrote nowhere (e.g. a tied lm_head)
        self.fills = fills  # (view of a parameter, the constant the loader filled it with, the parameter)

    @classmethod
    def record(cls, model: torch.nn.Module, load: Load, weights: Iterable[tuple[str, torch.Tensor]]) -> tuple[set[str], CopyPlan | None]:
        """``load(weights)`` (the model's own loader), watched. Returns the parameter names it
        loaded and the plan, or None where the load cannot be replayed as copies."""
        seen: list[tuple[str, torch.Tensor]] = []

        def watched():
            for name, tensor in weights:
                seen.append((name, tensor))  # kept alive: data pointers identify the sources below
                yield name, tensor

        params = dict(model.named_parameters())
        with _Copies({p.untyped_storage().data_ptr() for p in params.values()}) as copies:
            loaded = set(load(watched()) or ())
        plan = None if copies.foreign else cls._from_copies(copies.pairs, copies.fills, seen, params)
        if plan is not None and not plan._replays(seen, params):
            plan = None
        return loaded, plan

    @classmethod
    def _from_copies(cls, pairs: list, fills: list, seen: list, params: dict) -> CopyPlan | None:
        by_pointer = {tensor.data_ptr(): (name, tensor) for name, tensor in seen}
        owner = {p.untyped_storage().data_ptr(): (name, p) for name, p in params.items()}
        targets: dict[str, list] = {}
        for dst, src in pairs:
            name, tensor = by_pointer.get(src.data_ptr(), (None, None))
            param = owner.get(dst.untyped_storage().data_ptr())
            if tensor is None or param is None or src.shape != tensor.shape or src.stride() != tensor.stride():
                return None  # a copy of part of a tensor, or into something that is not a parameter
            targets.setdefault(name, []).append((dst, param[1], param[0]))
        return cls(targets, {name for name, _ in seen} - set(targets),
                   [(view, value, owner[view.untyped_storage().data_ptr()][1]) for view, value in fills])

    def _replays(self, seen: list, params: dict) -> bool:
        """Replaying over NaN-filled parameters gives exactly what the load gave them (so the plan
        writes every element the load wrote, and nothing else), then leaves them as the load did."""
        loaded = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for p in params.values():
                if p.is_floating_point():
                    p.fill_(float("nan"))
            self.apply(seen, load=None)
            same = all(torch.equal(p, loaded[name]) for name, p in params.items())
            if not same:
                for name, p in params.items():
                    p.copy_(loaded[name])
        return same

    def apply(self, weights: Iterable[tuple[str, torch.Tensor]], load: Load | None) -> set[str]:
        """Copy each tensor where the recording put it; a name it never saw goes through ``load``.
        Returns the parameter names written."""
        written: set[str] = set()
        unknown = []
        with torch.no_grad():
            for view, value, _ in self.fills:  # first: a fill the copies overlap would fail the replay check
                view.fill_(value)
            for name, tensor in weights:
                targets = self.targets.get(name)
                if targets is None:
                    if name not in self.ignored:
                        unknown.append((name, tensor))
                    continue
                for view, _, param_name in targets:
                    view.copy_(tensor)
                    written.add(param_name)
        if unknown:
            if load is None:
                raise RuntimeError(f"no recorded copy for {unknown[0][0]}")
            written |= set(load(unknown) or ())
        return written

    def still_valid(self) -> bool:
        """False once any parameter was given new memory (its recorded views would write nowhere)."""
        views = [(view, param) for targets in self.targets.values() for view, param, _ in targets]
        return all(view.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
                   for view, param in views + [(view, param) for view, _, param in self.fills])


class _Copies(TorchFunctionMode):
    """Every `copy_` made while active, every fill of part of a parameter with a constant (vLLM zeroes
    the padding rows of an embedding), and whether anything else wrote in place to a parameter."""

    def __init__(self, param_storages: set[int]):
        super().__init__()
        self.param_storages, self.pairs, self.fills, self.foreign = param_storages, [], [], False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.copy_:
            self.pairs.append((args[0], args[1]))
        elif func is torch.Tensor.__setitem__ or _in_place(getattr(func, "__name__", "")):
            target = args[0] if args else None
            if isinstance(target, torch.Tensor) and target.untyped_storage().data_ptr() in self.param_storages:
                value = 0 if func is torch.Tensor.zero_ else args[1] if func is torch.Tensor.fill_ and len(args) == 2 else None
                if isinstance(value, (int, float)) and not kwargs:
                    self.fills.append((target, value))
                else:
                    self.foreign = True
        return func(*args, **kwargs)


def _in_place(name: str) -> bool:
    return name.endswith("_") and not name.startswith("__")  # fill_, add_, ... (not __getitem__)
