"""Open a ``.pt2`` (``torch.export.save``) without running code from the file.

``torch.export.load`` is not safe on a file from someone else: it unpickles weights and
constants the archive marks ``use_pickle``, opaque and TorchScript objects, sample inputs
that fail the weights-only unpickler, whole legacy archives; it ``sympify``s (``eval``)
symbolic shape expressions, compiles the archive's guard code into Python, and resolves
node targets by attribute lookup on ``torch`` (``torch.ops.load_library`` is one). So
without trust this module reads the archive itself, checks every one of those inputs
against what a plain export of a model contains, and only then hands the checked parts
to torch's deserializer, from the same bytes it checked:

* weights and constants: plain tensors only (``use_pickle`` false, ``tensor_*`` files);
* sample inputs: the weights-only unpickler (tensors and containers), no fallback;
* no AOTInductor libraries, no legacy ``.pt`` payloads, one program named ``model``;
* node targets: ``torch.ops`` operators, a fixed set of ``operator``/``math``/``torch.sym_*``
  functions; symbolic expressions: numbers, symbols and a fixed set of sympy functions;
  names that become Python code: identifiers; guard code and stack traces: dropped;
* pytree types in the signature: already registered, or a Hugging Face output type, whose
  defining module (``transformers.modeling_outputs`` or a ``transformers.models.*``
  modeling module, installed library code) is imported first to register it.

With ``trust_pickle=True`` the file is trusted and torch's own loader reads it.
"""
from __future__ import annotations

import io
import json
import logging
import math
import operator
import re
from pathlib import Path
from typing import Any, Iterator

import torch

from rosafx.errors import RosafxError
from rosafx.io.reading import read_bytes

MODEL_NAME = "model"
TRUST_HINT = ("If you trust the file (unpickling runs code from it), pass --trust-pickle "
              "(API: trust_pickle=True); otherwise re-export the model with torch.export.save.")

SAFE_OPERATOR_FUNCTIONS = frozenset({
    "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs",
    "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift",
    "matmul", "truth", "is_", "is_not",
})
SAFE_TORCH_FUNCTIONS = frozenset({
    "torch.sym_float", "torch.sym_int", "torch.sym_max", "torch.sym_min", "torch.sym_not",
    "torch.sym_ite", "torch.sym_sqrt", "torch._sym_sqrt", "torch.sym_sum", "torch.sym_fresh_size",
    "torch._C._set_grad_enabled", "torch.amp.autocast_mode._enter_autocast",
    "torch.amp.autocast_mode._exit_autocast", "torch._assert_async", "torch._assert",
})
SAFE_SYMPY_NAMES = frozenset({
    "Max", "Min", "Mod", "Abs", "floor", "ceiling", "sqrt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge",
    "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "Equality", "Unequality",
    "And", "Or", "Not", "True", "False", "oo", "zoo", "nan", "Integer", "Rational", "Float", "Piecewise",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal",
    "ToFloat", "Identity", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or", "OpaqueUnaryFn_sqrt",
    # torch writes expressions as sympy srepr: Mul(Integer(2), Symbol('s0', positive=True, integer=True))
    "Add", "Mul", "Pow", "Symbol", "Dummy", "One", "Zero", "NegativeOne", "Half", "Infinity", "NegativeInfinity",
    "BooleanTrue", "BooleanFalse", "positive", "negative", "nonnegative", "nonpositive", "integer", "real",
    "finite", "infinite", "zero", "nonzero", "even", "odd", "rational", "commutative", "extended_real",
    "extended_positive", "extended_negative", "extended_nonnegative", "extended_nonpositive", "precision",
})
SYMPY_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<number>\d+(?:\.\d+)?(?:e[+-]?\d+)?)"
                         r"|'(?P<quoted>[A-Za-z0-9_.+-]{0,40})'|(?P<op>\*\*|//|<=|>=|==|!=|[-+*/%(),<>&|~=]))")
SYMBOL_NAME = re.compile(r"[a-z]{1,4}\d+")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
HF_OUTPUT_MODULE = re.compile(r"transformers\.(?:modeling_outputs|models\.[a-z0-9_]+\.modeling_[a-z0-9_]+)")


def load_pt2(path, *, trust_pickle: bool = False) -> torch.export.ExportedProgram:
    """The ``ExportedProgram`` in ``path``; see the module docstring for what is checked."""
    path = Path(path)
    # a regular file only: /dev/zero would be read until memory runs out, a FIFO blocks
    data = read_bytes(path, "a torch.export archive (.pt2)")
    try:
        return _load(path, data, trust_pickle)
    except RosafxError:
        raise
    except Exception as exc:  # a corrupt or foreign archive: torch's errors are not for users
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise RosafxError(f"Cannot read {path} as a torch.export archive ({type(exc).__name__}: {first}). "
                          "Re-create it with torch.export.save(torch.export.export(model, args), 'model.pt2').") \
            from exc


def _load(path: Path, data: bytes, trust_pickle: bool) -> torch.export.ExportedProgram:
    from torch.export.pt2_archive import constants as C
    from torch.export.pt2_archive._package import PT2ArchiveReader
    with _quiet_torch_logs():
        reader = PT2ArchiveReader(io.BytesIO(data))
    names = set(reader.get_file_names())
    model_file = C.MODELS_FILENAME_FORMAT.format(MODEL_NAME)
    if model_file not in names:
        raise RosafxError(f"{path} holds no exported program named '{MODEL_NAME}' ({model_file}): "
                          "save it with torch.export.save.")
    program = json.loads(reader.read_string(model_file))
    if not isinstance(program, dict) or "graph_module" not in program:
        raise RosafxError(f"{path}: {model_file} is not a serialized ExportedProgram.")
    register_output_types(program, path)
    if trust_pickle:
        with _quiet_torch_logs():
            return torch.export.load(io.BytesIO(data))
    _check_layout(path, names, C)
    weights = _payload_config(reader, C.WEIGHTS_CONFIG_FILENAME_FORMAT.format(MODEL_NAME), path)
    constants = _payload_config(reader, C.CONSTANTS_CONFIG_FILENAME_FORMAT.format(MODEL_NAME), path)
    _check_payloads(weights, "weight", path, lambda meta: True)
    _check_payloads(constants, "constant", path,
                    lambda meta: str(meta.get("path_name", "")).startswith(C.TENSOR_CONSTANT_FILENAME_PREFIX))
    program = check_program(program, path)
    sample_inputs = _sample_inputs(reader, C.SAMPLE_INPUTS_FILENAME_FORMAT.format(MODEL_NAME), names, path)
    return _deserialize(reader, program, sample_inputs)


def _check_layout(path: Path, names: set[str], C) -> None:
    for name in sorted(names):
        if name.startswith(C.AOTINDUCTOR_DIR) or name.startswith(C.EXECUTORCH_DIR):
            raise RosafxError(f"{path} contains compiled code ({name}); rosafx never loads compiled "
                              f"libraries from a file. {TRUST_HINT}")
        if name.startswith(C.MODELS_DIR) and name != C.MODELS_FILENAME_FORMAT.format(MODEL_NAME):
            raise RosafxError(f"{path} holds more than one program ({name}); rosafx reads one named "
                              f"'{MODEL_NAME}'.")
    for legacy in (f"{C.WEIGHTS_DIR}{MODEL_NAME}.pt", f"{C.CONSTANTS_DIR}{MODEL_NAME}.pt"):
        if legacy in names:
            raise RosafxError(f"{path} stores {legacy} in torch's legacy pickled format. {TRUST_HINT}")


def _payload_config(reader, name: str, path: Path) -> dict:
    try:
        config = json.loads(reader.read_string(name))["config"]
    except Exception as exc:
        raise RosafxError(f"{path}: cannot read {name} ({type(exc).__name__}); the archive is damaged or not "
                          "from torch.export.save.") from exc
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        raise RosafxError(f"{path}: {name} is not a torch.export payload config.")
    return config


def _check_payloads(config: dict, what: str, path: Path, plain_file) -> None:
    pickled = [fqn for fqn, meta in config.items() if meta.get("use_pickle") is not False or not plain_file(meta)
               or not isinstance(meta.get("tensor_meta"), dict)]
    if pickled:
        shown = ", ".join(pickled[:5]) + (f" and {len(pickled) - 5} more" if len(pickled) > 5 else "")
        raise RosafxError(f"{path} stores {what}(s) {shown} as pickles or objects, and unpickling runs code "
                          f"from the file. {TRUST_HINT}")


def _sample_inputs(reader, name: str, names: set[str], path: Path):
    if name not in names:
        return None
    raw = reader.read_bytes(name)
    if not raw:
        return None
    try:
        inputs = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as exc:
        raise RosafxError(f"{path}: its sample inputs hold objects other than tensors, which only unpickling "
                          f"(running code from the file) could read. {TRUST_HINT}") from exc
    if not isinstance(inputs, (tuple, dict)):
        raise RosafxError(f"{path}: its sample inputs are a {type(inputs).__name__}, not (args, kwargs).")
    return inputs


def _deserialize(reader, program: dict, sample_inputs) -> torch.export.ExportedProgram:
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass
    from torch.export.pt2_archive._package import _load_constants, _load_state_dict
    state_dict = _load_state_dict(reader, MODEL_NAME)      # checked: no use_pickle entry
    constants = _load_constants(reader, MODEL_NAME)        # checked: tensor files only
    serialized = _dict_to_dataclass(schema.ExportedProgram, program)
    with _quiet_torch_logs():
        exported = ExportedProgramDeserializer(None).deserialize(serialized, state_dict, constants,
                                                                 sample_inputs if sample_inputs is not None else b"")
    exported._guards_code = []
    return exported


# ---------------------------------------------------------------- the program's JSON
def check_program(program: dict, path: Path) -> dict:
    """Check what the deserializer would evaluate, resolve or turn into code; return a copy
    without guard code and stack traces (text that would otherwise reach generated code)."""
    program = json.loads(json.dumps(program))
    program["guards_code"] = []
    for node in _dicts(program):
        if "target" in node and "inputs" in node and "outputs" in node:
            check_target(node["target"], path)
        if "expr_str" in node:
            check_sympy_expression(node["expr_str"], path)
        metadata = node.get("metadata")
        if isinstance(metadata, dict):
            metadata.pop("stack_trace", None)
        for key in ("forward_arg_names",):
            for name in node.get(key) or []:
                _check_identifier(name, key, path)
        if "name" in node and isinstance(node["name"], str) and ("as_tensor" in node or set(node) == {"name"}):
            _check_identifier(node["name"], "name", path)
    for key in program.get("range_constraints") or {}:
        check_sympy_expression(key, path)
    return program


def _dicts(value: Any) -> Iterator[dict]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _check_identifier(name: Any, what: str, path: Path) -> None:
    if not isinstance(name, str) or not IDENTIFIER.fullmatch(name) or name.startswith("__"):
        raise RosafxError(f"{path}: the program has {what} {str(name)[:80]!r}, which is not a plain Python "
                          "identifier; the file was not written by torch.export.save.")


def check_target(target: Any, path: Path) -> None:
    """A node may call a registered torch operator or a fixed set of pure functions."""
    if isinstance(target, str):
        if target.startswith("torch.ops.") and _is_operator(target):
            return
        module, _, name = target.partition(".")
        if module == "_operator" and name in SAFE_OPERATOR_FUNCTIONS:
            return
        if module == "math" and "." not in name and callable(getattr(math, name, None)) \
                and not name.startswith("_"):
            return
        if target in SAFE_TORCH_FUNCTIONS:
            return
    raise RosafxError(f"{path}: a graph node calls {str(target)[:120]!r}, which is neither a registered torch "
                      "operator nor a known pure function. If it is a custom operator, import the library that "
                      "registers it before loading; rosafx calls nothing else from a file.")


def _is_operator(target: str) -> bool:
    from torch._ops import HigherOrderOperator, OpOverload, OpOverloadPacket
    parts = target.split(".")[2:]
    if not 2 <= len(parts) <= 3 or not all(IDENTIFIER.fullmatch(p) for p in parts):
        return False
    obj: Any = torch.ops
    for part in parts:
        try:
            obj = getattr(obj, part)
        except (AttributeError, RuntimeError):
            return False
        if not isinstance(obj, (torch._ops._OpNamespace, torch._ops._HigherOrderNamespace, OpOverload,
                                OpOverloadPacket, HigherOrderOperator)):
            return False
    return isinstance(obj, (OpOverload, OpOverloadPacket, HigherOrderOperator))


def check_sympy_expression(text: Any, path: Path) -> None:
    """sympy parses with ``eval``: allow only numbers, symbols, operators and known functions."""
    if not isinstance(text, str) or len(text) > 10_000:
        raise RosafxError(f"{path}: a symbolic shape expression is not a short string.")
    position = 0
    while position < len(text):
        match = SYMPY_TOKEN.match(text, position)
        if match is None or match.end() == position:
            if text[position:].strip() == "":
                break
            raise RosafxError(f"{path}: symbolic shape expression {text[:80]!r} has {text[position:position + 10]!r}, "
                              "which torch.export never writes; refusing to evaluate it.")
        quoted = match.group("quoted")  # Symbol('s0', ...) and Float('1.5', precision=53)
        if quoted is not None and not (SYMBOL_NAME.fullmatch(quoted) or re.fullmatch(r"[0-9.e+-]+", quoted)):
            raise RosafxError(f"{path}: symbolic shape expression {text[:80]!r} quotes {quoted!r}, which is not a "
                              "shape symbol; refusing to evaluate it.")
        name = match.group("name")
        if name is not None and name not in SAFE_SYMPY_NAMES and not SYMBOL_NAME.fullmatch(name):
            raise RosafxError(f"{path}: symbolic shape expression {text[:80]!r} names {name!r}, which is neither a "
                              "shape symbol nor a known sympy function; refusing to evaluate it.")
        position = match.end()


# ---------------------------------------------------------------- pytree output types
def register_output_types(program: dict, path: Path) -> None:
    """Make the pytree types in the program's signature known. A Hugging Face output type
    registers itself when its module is imported; any other unknown type is refused."""
    import importlib

    import torch.utils._pytree as pytree
    for type_name in _treespec_types(program):
        if type_name in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            continue
        module_name = type_name.rpartition(".")[0]
        if HF_OUTPUT_MODULE.fullmatch(module_name):
            try:
                importlib.import_module(module_name)
            except ImportError as exc:
                raise RosafxError(f"{path} returns {type_name}, and {module_name} cannot be imported ({exc}); "
                                  "install the transformers version the model was exported with.") from exc
        if type_name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            raise RosafxError(f"{path}: the program's inputs or outputs use the type {type_name[:120]!r}, which "
                              "is not registered with torch's pytree. Import the module that registers it before "
                              "loading (rosafx imports only Hugging Face output types itself).")


def _treespec_types(program: dict) -> set[str]:
    found: set[str] = set()
    for node in _dicts(program):
        for key in ("in_spec", "out_spec"):
            spec = node.get(key)
            if isinstance(spec, str) and spec.startswith("["):
                try:
                    parsed = json.loads(spec)
                except json.JSONDecodeError:
                    continue
                for item in _dicts(parsed):
                    if isinstance(item.get("type"), str):
                        found.add(item["type"])
    return found


class _quiet_torch_logs:
    """torch logs whole tracebacks on some archive errors; the user gets one line instead."""

    def __enter__(self):
        self.loggers = [logging.getLogger(n) for n in ("torch.export", "torch._export", "torch.export.pt2_archive")]
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.CRITICAL)
        return self

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)
        return False
