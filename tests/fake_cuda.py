"""A fake cuda:0 for CPU-only tests: catches the device mistakes that otherwise only show on a GPU.

Tensors stay on the CPU. `FakeCuda`, a torch function mode, keeps a registry of the tensors that are
"on cuda:0" (tagged) and checks what code does with them, following what a real GPU would do:

    what the code does                               on a GPU                       here
    -----------------------------------------------  -----------------------------  ---------------------------
    model on the GPU                                 .to("cuda")                    fake.place(model) (or
                                                                                    Module.to("cuda") under the mode)
    x.to("cuda"), x.cuda(), torch.zeros(.., device=  a copy on the GPU              a CPU copy, tagged
      "cuda"), any call with a cuda device= kwarg
    x.to("cpu"), x.cpu()                             a copy on the host             a CPU copy, untagged
    x.to(dtype), x.to(other_tensor)                  stays / follows other          keeps the tag / follows other
    op on a tagged input                             result on the GPU              every tensor output tagged
    x.grad of a tagged x                             on the GPU                     tagged
    op mixing a GPU and a CPU tensor                 RuntimeError "Expected all     the same RuntimeError, in
                                                     tensors to be on the same      strict code (below)
                                                     device ..."
      ... except: a CPU 0-dim tensor (a scalar)      allowed                        allowed
      ... except: CPU index tensors in x[i], x[i]=v,  allowed                        allowed (the values v must
          index, index_put(_)                                                       match, unless 0-dim)
      ... except: dst.copy_(src)                     crosses devices                allowed
    x.numpy(), np.asarray(x), matplotlib, pandas     TypeError "can't convert       the same TypeError, whoever
                                                     cuda:0 device type tensor..."  the caller is
    x.device, x.is_cuda, x.get_device()              cuda:0, True, 0                the same to strict code;
                                                                                    the real CPU values to others

Strict code is the code under test: a module named by `strict_prefixes` (default "grpo_lib" and its
submodules, and "__main__", which is what a notebook cell runs as). Whether an op is checked is decided by
the first frame, walking outwards from the op, that is neither torch's nor this module's: so
`torch.nn.functional.pad(x, ...)` or an `nn.Linear` called from grpo_lib is checked, while the ops that
transformers or peft run inside a model's forward are not (they only propagate tags). GPU index tensors
into a CPU tensor raise too (CUDA: "indices should be either on cpu or on the same device ...").

Third-party code (transformers, peft, and torch's own Python code, even when grpo_lib calls it) must not
believe it is on a GPU, or it would take CUDA-only branches (torch.cuda RNG states in checkpointing,
autocast, fused kernels). So only a strict *reader* (the frame reading `.device` itself) sees cuda:0; any
other reader of a tagged tensor's `.device` gets `SEEN_CPU`, one particular torch.device("cpu") object.
It says "cpu", and when code passes it back (`y.to(x.device)`, `torch.arange(n, device=x.device)`,
peft's `lora_layer.to(base.weight.device)`) the mode knows it came from a GPU tensor and tags the result,
as a GPU would have. torch internals therefore run their CPU paths (AdamW without foreach, checkpointing
without CUDA RNG states): the numbers are the CPU's, bit for bit. `nn.Parameter(tagged)` (how copy.deepcopy
copies a model's parameters) is tagged as well.

Limits of the simulation (what it does not catch, or could blame wrongly):
- torch.cuda itself is not faked: torch.cuda.is_available() stays False, so code that asks it (bf16
  support, memory stats, default_device(), GradScaler, torch.cuda.synchronize / manual_seed) takes its
  CPU branch; placed models compute in fp32, not the bf16/fp16 a GPU would use.
- Only the rules in the table are modelled: ops that CUDA accepts with other CPU arguments (beyond
  0-dim tensors, indices and copy_) raise here; Tensor.type("torch.cuda..."), pin_memory(), storages,
  torch.load(map_location="cuda"), torch.Generator(device="cuda") are not simulated; there is one device.
- Tensors are seen only through torch function calls, flattened with torch's pytree: tensors inside
  other objects (a KV cache) are opaque, tensors born in C++ (autograd's, except .grad) are untagged,
  other threads are not watched, and a torch Python function (F.softmax, Tensor.__repr__) is checked as a
  whole, its inner ops unseen. repr() of a tagged tensor shows no device.
- A device rebuilt from its string (torch.device(str(x.device))) loses the SEEN_CPU provenance; and
  third-party code that checks `x.device.type != "cpu"` before calling .numpy() would be blamed here.

Use:
    with FakeCuda() as fake:                      # or: fake = install() ... uninstall()
        model = fake.place(model)                 # or: fake.patch_loaders(), then grpo_lib.models.load_policy*
        ...                                       # the code under test
Notebooks: notebook_cell(repo_root) is the source of a cell that does all of that in a kernel.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import sys
import weakref

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

CUDA0 = torch.device("cuda", 0)
SEEN_CPU = torch.device("cpu")  # what non-strict code reads as the device of a tagged tensor
STRICT_PREFIXES = ("grpo_lib", "__main__")
MIX_MESSAGE = ("Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu! "
               "(simulated by tests/fake_cuda.py: {op})")
INDEX_MESSAGE = ("indices should be either on cpu or on the same device as the indexed tensor (cpu) "
                 "(simulated by tests/fake_cuda.py: {op})")
NUMPY_MESSAGE = ("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host "
                 "memory first.")
INDEX_OPS = frozenset({"__getitem__", "__setitem__", "index", "index_put", "index_put_"})
CROSSING_OPS = frozenset({"copy_"})  # ops that may take tensors of two devices
LOADERS = ("load_policy", "load_policy_from_config", "load_trained")  # those grpo_lib.models has


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _op_name(func) -> str:
    owner = getattr(func, "__self__", None)
    if type(owner).__name__ == "getset_descriptor":  # an attribute: Tensor.device, Tensor.grad, ...
        return owner.__name__
    return getattr(func, "__name__", repr(func))


def _attribute_access(func) -> str | None:
    """'get' / 'set' when func is a tensor attribute's getter / setter (x.device, x.data = y), else None."""
    if type(getattr(func, "__self__", None)).__name__ == "getset_descriptor":
        return {"__get__": "get", "__set__": "set"}.get(func.__name__)
    return None


def _module_of(frame) -> str:
    return frame.f_globals.get("__name__", "") or ""


def _is_torch(name: str) -> bool:
    return name == "torch" or name.startswith("torch.")


class FakeCuda(TorchFunctionMode):
    """A simulated cuda:0 (see the module docstring for the rules)."""

    def __init__(self, strict_prefixes=STRICT_PREFIXES):
        super().__init__()
        self.strict_prefixes = tuple(strict_prefixes)
        self._tags: dict[int, weakref.ref] = {}  # id(tensor) -> weak reference (identity check, cleanup)
        self._patched: list[tuple] = []  # (module, name, original) replaced by patch_loaders

    # ------------------------------------------------------------------------------------------
    # the registry of tensors on the fake GPU
    # ------------------------------------------------------------------------------------------

    def on_gpu(self, t) -> bool:
        """Whether tensor t is on the fake cuda:0."""
        ref = self._tags.get(id(t))
        return ref is not None and ref() is t

    def _tag(self, t: torch.Tensor) -> None:
        if self.on_gpu(t):
            return
        key = id(t)

        def forget(ref, key=key, tags=self._tags):
            if tags.get(key) is ref:
                del tags[key]

        self._tags[key] = weakref.ref(t, forget)

    def _untag(self, t: torch.Tensor) -> None:
        if self.on_gpu(t):
            del self._tags[id(t)]

    def _set_tag(self, t: torch.Tensor, on_gpu: bool) -> None:
        if on_gpu:
            self._tag(t)
        else:
            self._untag(t)

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        """Put a model's parameters and buffers on the fake cuda:0 (in place); returns the model."""
        for t in itertools.chain(module.parameters(), module.buffers()):
            self._tag(t)
        return module

    # ------------------------------------------------------------------------------------------
    # who is calling
    # ------------------------------------------------------------------------------------------

    def _caller(self, skip_torch: bool) -> str:
        """Module name of the first frame outside this module (and outside torch when skip_torch)."""
        frame = sys._getframe(1)
        while frame is not None:
            name = _module_of(frame)
            if name != __name__ and not (skip_torch and _is_torch(name)):
                return name
            frame = frame.f_back
        return ""

    def _is_strict(self, name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in self.strict_prefixes)

    def strict_op(self) -> bool:
        """Is the running op checked? Decided by the first frame that is neither torch's nor ours."""
        return self._is_strict(self._caller(skip_torch=True))

    def strict_reader(self) -> bool:
        """Does the code that reads .device see cuda:0? Only strict code itself, never torch internals."""
        return self._is_strict(self._caller(skip_torch=False))

    # ------------------------------------------------------------------------------------------
    # devices named in calls
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def _device_type(value) -> str | None:
        """'cuda' / 'cpu' for a device-like value (SEEN_CPU counts as cuda), None for anything else."""
        if value is SEEN_CPU:
            return "cuda"
        if isinstance(value, torch.device):
            return value.type if value.type in ("cuda", "cpu") else None
        if isinstance(value, str):
            try:
                kind = torch.device(value).type
            except RuntimeError:
                return None
            return kind if kind in ("cuda", "cpu") else None
        if isinstance(value, int) and not isinstance(value, bool):
            return "cuda"  # a bare device index
        return None

    def _real_device(self, value):
        """The device to really use: the CPU instead of a cuda one."""
        return "cpu" if self._device_type(value) == "cuda" else value

    # ------------------------------------------------------------------------------------------
    # the dispatcher
    # ------------------------------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        __tracebackhide__ = True  # pytest and IPython show the user's line, not these frames
        kwargs = kwargs or {}
        name = _op_name(func)
        access = _attribute_access(func)
        if access == "get":
            return self._get_attribute(name, func, args)
        if access == "set":
            return self._set_attribute(name, func, args)
        if name in ("numpy", "__array__"):
            return self._to_numpy(func, args, kwargs)
        if name in ("to", "cpu", "cuda", "get_device") and isinstance(args[0] if args else None, torch.Tensor):
            return getattr(self, f"_tensor_{name}")(func, args, kwargs)
        if "device" in kwargs and self._device_type(kwargs["device"]) is not None:
            return self._factory(func, args, kwargs)
        inputs = _tensors((args, kwargs))  # before the call: it may add its outputs to an input (deepcopy's memo)
        self._check_devices(name, args, kwargs, inputs)
        out = func(*args, **kwargs)
        self._propagate(inputs, out)
        return out

    def _propagate(self, inputs: list[torch.Tensor], out) -> None:
        """Any tagged input tags every tensor output (but not an untagged input returned as is)."""
        if not any(self.on_gpu(t) for t in inputs):
            return
        untagged_inputs = {id(t) for t in inputs if not self.on_gpu(t)}
        for t in _tensors(out):
            if id(t) not in untagged_inputs:
                self._tag(t)

    # attributes ------------------------------------------------------------------------------

    def _get_attribute(self, name: str, func, args):
        x = args[0]
        if name in ("device", "is_cuda", "is_cpu") and self.on_gpu(x):
            strict = self.strict_reader()
            return {"device": CUDA0 if strict else SEEN_CPU, "is_cuda": strict, "is_cpu": not strict}[name]
        out = func(*args)
        if isinstance(out, torch.Tensor) and self.on_gpu(x):  # x.grad, x.data, x.T, ...
            self._tag(out)
        return out

    def _set_attribute(self, name: str, func, args):
        out = func(*args)
        target, value = args[0], args[1]
        if name == "data" and isinstance(value, torch.Tensor):  # Module.to("cuda") swaps param.data
            self._set_tag(target, self.on_gpu(value))
        return out

    # transitions ------------------------------------------------------------------------------

    def _moved(self, x: torch.Tensor, out: torch.Tensor, on_gpu: bool) -> torch.Tensor:
        """out, tagged as on_gpu; a copy when out is x and x is on the other device (a transfer copies)."""
        if out is x and self.on_gpu(x) != on_gpu:
            out = x.clone()
        self._set_tag(out, on_gpu)
        return out

    def _to_target(self, args, kwargs) -> str | None:
        """Where Tensor.to(*args, **kwargs) goes: 'cuda', 'cpu', or None (dtype only: stays)."""
        for value in (*args, kwargs.get("device"), kwargs.get("other")):
            if isinstance(value, torch.Tensor):
                return "cuda" if self.on_gpu(value) else "cpu"
            kind = self._device_type(value)
            if kind is not None:
                return kind
        return None

    def _tensor_to(self, func, args, kwargs):
        x = args[0]
        target = self._to_target(args[1:], kwargs)
        real_args = [x] + [a if isinstance(a, torch.Tensor) else self._real_device(a) for a in args[1:]]
        real_kwargs = {k: self._real_device(v) if k == "device" else v for k, v in kwargs.items()}
        out = func(*real_args, **real_kwargs)
        if target is None:
            self._propagate([x], out)
            return out
        return self._moved(x, out, target == "cuda")

    def _tensor_cpu(self, func, args, kwargs):
        return self._moved(args[0], func(*args, **kwargs), on_gpu=False)

    def _tensor_cuda(self, func, args, kwargs):
        return self._moved(args[0], args[0], on_gpu=True)  # no CUDA to call: the tensor itself, then a copy

    def _tensor_get_device(self, func, args, kwargs):
        return 0 if self.on_gpu(args[0]) and self.strict_reader() else func(*args, **kwargs)

    def _factory(self, func, args, kwargs):
        """A call with device=...: runs on the CPU; the outputs are where device= says."""
        on_gpu = self._device_type(kwargs["device"]) == "cuda"
        inputs = _tensors(args)
        out = func(*args, **{**kwargs, "device": self._real_device(kwargs["device"])})
        if any(t is out for t in inputs):  # torch.as_tensor(t, device=...) may return t itself
            return self._moved(out, out, on_gpu)
        for t in _tensors(out):
            self._set_tag(t, on_gpu)
        return out

    def _to_numpy(self, func, args, kwargs):
        __tracebackhide__ = True
        if args and self.on_gpu(args[0]) and not kwargs.get("force", False):
            raise TypeError(NUMPY_MESSAGE)
        return func(*args, **kwargs)

    # the device check -------------------------------------------------------------------------

    def _check_devices(self, name: str, args, kwargs, inputs: list[torch.Tensor]) -> None:
        """Raise like CUDA when strict code mixes a tagged tensor with an untagged one (not a 0-dim one)."""
        __tracebackhide__ = True
        if name in CROSSING_OPS:
            return
        if name in INDEX_OPS and args and isinstance(args[0], torch.Tensor):
            base, indices = args[0], _tensors(args[1] if len(args) > 1 else kwargs.get("indices"))
            others = [base] + _tensors((args[2:], {k: v for k, v in kwargs.items() if k != "indices"}))
            if not self.on_gpu(base) and any(self.on_gpu(i) for i in indices) and self.strict_op():
                raise RuntimeError(INDEX_MESSAGE.format(op=name))
        else:
            others = inputs
        on_gpu = [t for t in others if self.on_gpu(t)]
        on_cpu = [t for t in others if not self.on_gpu(t) and t.dim() > 0]
        if on_gpu and on_cpu and self.strict_op():
            raise RuntimeError(MIX_MESSAGE.format(op=name))

    # ------------------------------------------------------------------------------------------
    # loaders and life cycle
    # ------------------------------------------------------------------------------------------

    def _placing(self, loader):
        """loader (a grpo_lib.models function returning (model, tokenizer)) that loads on the CPU and
        places the model on the fake cuda:0, unless the caller asked for device="cpu"."""
        signature = inspect.signature(loader)

        @functools.wraps(loader)
        def load(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            if self._device_type(bound.arguments.get("device")) == "cpu":
                return loader(*args, **kwargs)
            bound.arguments["device"] = "cpu"
            model, tokenizer = loader(*bound.args, **bound.kwargs)
            return self.place(model), tokenizer

        load.__fake_cuda_original__ = loader
        return load

    def patch_loaders(self) -> FakeCuda:
        """Make grpo_lib.models.load_policy / load_policy_from_config / load_trained place their model on
        the fake cuda:0, in grpo_lib.models and in every imported module that holds them (from ... import).
        Undone when the mode exits (uninstall())."""
        import grpo_lib.models as models

        for name in LOADERS:
            original = getattr(models, name, None)
            if original is None:
                continue
            original = getattr(original, "__fake_cuda_original__", original)
            wrapper = self._placing(original)
            for module in list(sys.modules.values()):
                namespace = getattr(module, "__dict__", {})
                current = namespace.get(name)
                if current is original or getattr(current, "__fake_cuda_original__", None) is original:
                    self._patched.append((module, name, current))
                    setattr(module, name, wrapper)
        return self

    def unpatch_loaders(self) -> None:
        while self._patched:
            module, name, previous = self._patched.pop()
            setattr(module, name, previous)

    def __enter__(self):
        self._hook_parameter()
        return super().__enter__()

    def __exit__(self, exc_type, exc_value, traceback):
        self.unpatch_loaders()
        self._unhook_parameter()
        return super().__exit__(exc_type, exc_value, traceback)

    def _hook_parameter(self) -> None:
        """nn.Parameter(tagged) is tagged, as a Parameter made from a GPU tensor is on the GPU (copy.deepcopy
        of a model makes its Parameters this way). Parameter() builds its object without a torch function."""
        if "_parameter_new" in self.__dict__:
            return
        original = torch.nn.Parameter.__dict__["__new__"]
        new = original.__func__ if isinstance(original, staticmethod) else original

        def parameter_new(cls, data=None, requires_grad=True):
            p = new(cls, data, requires_grad)
            if data is not None and self.on_gpu(data):
                self._tag(p)
            return p

        self._parameter_new = original
        torch.nn.Parameter.__new__ = staticmethod(parameter_new)

    def _unhook_parameter(self) -> None:
        original = self.__dict__.pop("_parameter_new", None)
        if original is not None:
            torch.nn.Parameter.__new__ = original


# ----------------------------------------------------------------------------------------------
# without a with block: a notebook cell installs the mode, the later cells run under it
# ----------------------------------------------------------------------------------------------

_installed: FakeCuda | None = None


def install(strict_prefixes=STRICT_PREFIXES) -> FakeCuda:
    """Enter a FakeCuda mode until uninstall(); returns it (call .patch_loaders() or .place(model))."""
    global _installed
    if _installed is None:
        _installed = FakeCuda(strict_prefixes)
        _installed.__enter__()
    return _installed


def uninstall() -> None:
    global _installed
    if _installed is not None:
        mode, _installed = _installed, None
        mode.__exit__(None, None, None)


def notebook_cell(repo_root: str) -> str:
    """Source of a cell to inject after a notebook's parameters cell: from there on the notebook runs on
    the fake cuda:0 (the models of grpo_lib.models.load_policy* are placed on it)."""
    path = f"{str(repo_root).rstrip('/')}/tests/fake_cuda.py"
    return (
        "# injected by tests/fake_cuda.py: a simulated cuda:0 (tensors stay on the CPU)\n"
        "import importlib.util as _importlib_util\n"
        "import sys as _sys\n"
        f"_sys.path.insert(0, {str(repo_root)!r})\n"
        f"_spec = _importlib_util.spec_from_file_location('fake_cuda', {path!r})\n"
        "fake_cuda = _importlib_util.module_from_spec(_spec)\n"
        "_sys.modules['fake_cuda'] = fake_cuda\n"
        "_spec.loader.exec_module(fake_cuda)\n"
        "fake_cuda.install().patch_loaders()\n"
    )
