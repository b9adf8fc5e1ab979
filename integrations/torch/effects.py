"""Which nodes of a dynamo graph write memory, for the passes that drop or move nodes.

Dynamo's graph is torch-level: ``torch.relu_``, ``torch.add(.., out=)``,
``torch._foreach_add_``, ``y.copy_(x)``. FX's ``Node.is_impure`` only sees mutation in
``OpOverload`` targets, so each call is resolved to the ATen overloads its arguments
bind to, and their schemas decide (``Tensor(a!)`` arguments, ``out=``, RNG, effects),
as AOT autograd's functionalization would. A call that resolves to nothing known is
taken to write every tensor it is given.
"""

from __future__ import annotations

import inspect
import operator
import weakref
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._library.utils import is_impure as _op_is_impure
from torch.fx.operator_schemas import _torchscript_schema_to_signature, get_signature_for_torch_op

# operator functions that never write their operands (the ``i``-forms and setitem do)
_PURE_OPERATORS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
    operator.pow, operator.matmul, operator.neg, operator.pos, operator.abs, operator.invert,
    operator.and_, operator.or_, operator.xor, operator.lshift, operator.rshift, operator.not_,
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.getitem,
    operator.truth,
}
# dtype / device casts with no ATen op of their name
_PURE_METHODS = {"float", "double", "half", "bfloat16", "int", "long", "short", "bool", "byte", "char",
                 "cpu", "cuda", "type", "tolist"}
# torch.nn.functional helpers whose only ways to write are the arguments checked below
_PURE_FUNCTIONAL = {F.silu, F.relu, F.gelu, F.softmax, F.log_softmax, F.layer_norm, F.rms_norm, F.pad,
                    F.embedding, F.normalize, F.leaky_relu, F.hardtanh, F.elu}
_WRITING_KWARGS = {"inplace": False, "out": None, "max_norm": None}


_TENSOR_CLASSES = (torch.Tensor, torch._C.TensorBase)


def _is_method(node: fx.Node) -> bool:
    return node.op == "call_method" or getattr(node.target, "__objclass__", None) in _TENSOR_CLASSES


def _aten_overloads(target, op: str) -> Optional[list]:
    """The OpOverloads ``target`` may dispatch to, or None when it cannot be resolved."""
    if isinstance(target, torch._ops.OpOverload):
        return [target]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return [getattr(target, o) for o in target.overloads()]
    if op == "call_method" or getattr(target, "__objclass__", None) in _TENSOR_CLASSES:
        name = target if op == "call_method" else target.__name__
        packet = getattr(torch.ops.aten, name, None) if isinstance(name, str) else None
        return None if packet is None else [getattr(packet, o) for o in packet.overloads()]
    try:
        found = get_signature_for_torch_op(target, return_schemas=True)
    except Exception:  # an unrelated callable: not a torch op
        return None
    if not found or not found[1]:
        return None
    ops = []
    for schema in found[1]:
        ns, name = schema.name.split("::")
        packet = getattr(getattr(torch.ops, ns, None), name, None)
        ops.append(getattr(packet, schema.overload_name or "default", None) if packet is not None else None)
    return None if None in ops else ops


def _list_given_tensor(arg, value) -> bool:
    """A ``Tensor[]`` parameter bound to one tensor node: not this overload (``torch.sort(t)``
    also binds TorchScript's in-place list sort ``aten::sort.Tensor(Tensor[](a!) self)``)."""
    ev = value.meta.get("example_value", value.meta.get("val")) if isinstance(value, fx.Node) else None
    return isinstance(arg.type, torch._C.ListType) and isinstance(ev, torch.Tensor)


def _bound(node: fx.Node) -> Optional[list]:
    """[(overload, bound arguments)] of the overloads the call's arguments bind to."""
    ops = _aten_overloads(node.target, node.op)
    if ops is None:
        return None
    calls = [node.args]
    if _is_method(node) and len(node.args) > 1:  # x.view(1, -1): sizes as varargs
        calls.append((node.args[0], list(node.args[1:])))
    for args in calls:
        bound = []
        for op in ops:
            try:
                sig = _torchscript_schema_to_signature(op._schema)
                values = sig.bind(*args, **node.kwargs).arguments
            except (TypeError, RuntimeError, ValueError):
                continue
            # the signature renames ``self``: pair schema arguments with parameters by position
            pairs = [(a, values.get(p)) for a, p in zip(op._schema.arguments, sig.parameters)]
            if any(_list_given_tensor(a, v) for a, v in pairs):
                continue
            bound.append((op, pairs))
        if bound:
            return bound
    return None


def _writing_python_kwargs(node: fx.Node) -> Optional[bool]:
    """For a ``torch.nn.functional`` helper: whether this call writes (None: not one)."""
    if node.target not in _PURE_FUNCTIONAL:
        return None
    try:
        args = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except TypeError:
        return True
    args.apply_defaults()
    return any(k in args.arguments and args.arguments[k] is not v for k, v in _WRITING_KWARGS.items())


def _tensors(values) -> list:
    out = []
    for v in values:
        if isinstance(v, fx.Node):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out += _tensors(v)
        elif isinstance(v, dict):
            out += _tensors(v.values())
    return out


_MEMO: "weakref.WeakKeyDictionary[fx.Node, tuple]" = weakref.WeakKeyDictionary()


def effects(node: fx.Node) -> tuple[bool, list]:
    """(functional, written): whether ``node`` may be dropped when unused, and the
    argument nodes whose memory it may write (every input when unknown)."""
    # memoized while its arguments are the same objects (a pass checks each layer's window)
    memo = _MEMO.get(node)
    if memo is not None and memo[0] is node.args and memo[1] is node.kwargs:
        return memo[2]
    result = _effects(node)
    _MEMO[node] = (node.args, node.kwargs, result)
    return result


def _effects(node: fx.Node) -> tuple[bool, list]:
    if node.op not in ("call_function", "call_method"):
        return node.op in ("get_attr",), []
    unknown = (False, list(node.all_input_nodes))
    plain = not node.kwargs.get("out") and not node.kwargs.get("inplace")
    bound = _bound(node)
    if bound is None:
        if node.op == "call_function":
            if node.is_impure():  # FX's own list: setitem, asserts, grad mode, RNG
                return unknown
            if node.target in _PURE_OPERATORS and plain:
                return True, []
            writes = _writing_python_kwargs(node)
            if writes is not None:
                return unknown if writes else (True, [])
        elif node.target in _PURE_METHODS and plain:
            return True, []
        return unknown
    functional, written = node.op != "call_function" or not node.is_impure(), []
    for op, args in bound:
        if _op_is_impure(op):
            functional = False
        for a, value in args:
            if a.alias_info is not None and a.alias_info.is_write:
                written += _tensors([value])
    written = list(dict.fromkeys(written))
    return functional and not written, written


def is_functional(node: fx.Node) -> bool:
    """Nothing but its result: safe to drop when unused (as inductor's DCE would)."""
    return effects(node)[0]


def storage(node) -> Optional[int]:
    """A key for the memory ``node``'s example value lives in (views share it), or None."""
    ev = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    if not isinstance(ev, torch.Tensor):
        return None
    try:
        return ev.untyped_storage()._cdata
    except Exception:  # no storage (e.g. a sparse or nested example value)
        return None


def writes_any(node: fx.Node, targets: set, keys: Optional[set] = None) -> bool:
    """Whether ``node`` may write the memory of any of ``targets`` (nodes; ``keys``:
    their storages, when known); unknown storages count as shared."""
    _, written = effects(node)
    if not written:
        return False
    keys = {storage(t) for t in targets} - {None} if keys is None else keys
    return any(w in targets or storage(w) is None or storage(w) in keys for w in written)
