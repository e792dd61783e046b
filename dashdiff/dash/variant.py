"""LoRA-Dash on one ``DashdiffLinear``: its per-adapter state, forward, launch and export.

Per adapter (all registered under ``lora_*`` names, so PEFT keeps them with the adapter):
``lora_dash_delta`` δ (s,) trainable from injection; ``lora_dash_U`` U_s (out, s) and
``lora_dash_V`` V_sᵀ (s, in) frozen buffers, zero before launch; ``lora_dash_step`` (optimizer
steps counted) and ``lora_dash_launch_step`` (-1 before launch). ``lora_A``/``lora_B`` weights and
U_s/V_sᵀ are views into one (r+s × in) and one (out × r+s) storage, so the forward is a single
rank-(r+s) product (``kernel.FusedDashLinear``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import torch
from torch import nn

from ..ops import compute_dtype
from ..variant import ExportedFactors, MethodVariant, TensorSpec
from .config import LoraDashConfig
from .kernel import DashKernelArgs, FusedDashLinear, operands
from .selection import Selection, select_directions

if TYPE_CHECKING:
    from ..layer import DashdiffLinear

RECORD_FIELDS = ("indices", "sigma", "change_rate")


class FusedStorage(NamedTuple):
    """One adapter's fused storage: ``a_cat`` = [A; V_sᵀ] (r+s, in), ``b_cat`` = [B, U_s] (out, r+s),
    ``c_cat`` = [scaling·1_r; δ] (r+s,), all views of ``flat``; ``key``: the data pointers of A, B
    and δ when fused (a mismatch means something replaced them: re-fuse)."""

    a_cat: torch.Tensor
    b_cat: torch.Tensor
    c_cat: torch.Tensor
    key: tuple[int, int, int]
    flat: torch.Tensor


class CastOperands(NamedTuple):
    """The kernel's operands in one compute dtype: ``src`` is ``flat`` itself or its low-precision
    copy (refreshed each forward), ``args`` the kernel's arguments on views of ``src`` at runtime
    scale λ = 1 (``kernel.DashKernelArgs``)."""

    flat: torch.Tensor
    src: torch.Tensor
    launched: bool
    args: DashKernelArgs


class LoraDashVariant(MethodVariant):
    """LoRA-Dash (Si et al., ICLR 2025): plain LoRA until launch, then ``+ U_s diag(δ) V_sᵀ x``."""

    kind = "dash"
    label = "LoRA-Dash"
    config_class = LoraDashConfig
    containers = {
        "lora_dash_delta": "parameter",
        "lora_dash_U": "buffer",
        "lora_dash_V": "buffer",
        "lora_dash_step": "buffer",
        "lora_dash_launch_step": "buffer",
    }
    settings = ("dash_directions", "dash_warmup_steps")
    state_names = ("lora_dash_delta", "lora_dash_U", "lora_dash_V", "lora_dash_step", "lora_dash_launch_step")
    # _dash_steps / _dash_launched: Python mirrors of the step buffers (reading a GPU scalar per
    # forward would sync); _dash_storage: adapter -> FusedStorage; _dash_operands: (adapter, compute
    # dtype) -> CastOperands; eig_cache: adapter -> GramEig filled ahead of launch by the prefetch;
    # dash_prefetch: adapter -> the SpectrumPrefetcher whose results the launch must collect;
    # dash_record: adapter -> the launch record (indices, sigma, change_rate) for inspection.
    caches = ("_dash_steps", "_dash_launched", "_dash_storage", "_dash_operands", "eig_cache", "dash_prefetch",
              "dash_record")

    # ------------------------------------------------------------------ creation
    @staticmethod
    def check(module: "DashdiffLinear", adapter_name: str, config: Any, where: str) -> None:
        if config.dash_directions > min(module.in_features, module.out_features):
            raise ValueError(
                f"dashdiff: dash_directions s={config.dash_directions} exceeds min(out, in)="
                f"{min(module.in_features, module.out_features)} of {where} ({module.out_features}x"
                f"{module.in_features}): lower dash_directions or remove this module from target_modules."
            )

    @staticmethod
    def init(module: "DashdiffLinear", adapter_name: str, config: Any = None, **kwargs: Any) -> None:
        a = module.lora_A[adapter_name].weight
        s = config.dash_directions
        module.dash_directions[adapter_name] = s
        module.dash_warmup_steps[adapter_name] = config.dash_warmup_steps
        module.lora_dash_U[adapter_name] = torch.zeros(module.out_features, s, dtype=a.dtype, device=a.device)
        module.lora_dash_V[adapter_name] = torch.zeros(s, module.in_features, dtype=a.dtype, device=a.device)
        module.lora_dash_delta[adapter_name] = nn.Parameter(torch.zeros(s, dtype=a.dtype, device=a.device))
        module.lora_dash_step[adapter_name] = torch.zeros((), dtype=torch.long, device=a.device)
        module.lora_dash_launch_step[adapter_name] = torch.full((), -1, dtype=torch.long, device=a.device)
        module._dash_steps[adapter_name] = 0
        module._dash_launched[adapter_name] = False
        LoraDashVariant.fuse(module, adapter_name)

    # ------------------------------------------------------------------ fused storage
    @staticmethod
    def fuse(module: "DashdiffLinear", adapter: str) -> FusedStorage:
        """(Re)build the fused storage from the current tensors and re-point the views.

        One flat storage per adapter holds ``a_cat = [A; V_sᵀ]`` (r+s, in), then ``[B, U_s]``
        (out, r+s) as the transpose of a row-major (r+s, out) block (so B's view is dense), then
        ``c_cat = [base_scaling·1_r; δ]`` (r+s,): under autocast one cast per forward covers all
        three. ``Module.to`` / ``cast_training_params`` replace each parameter's and buffer's data
        separately, which breaks the aliasing; the tensors themselves stay the source of truth, so
        re-fusing loses nothing.
        """
        r = module.r[adapter]
        a_p, b_p = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        delta = module.lora_dash_delta[adapter]
        v, u = module.lora_dash_V[adapter], module.lora_dash_U[adapter]
        k, n_in, n_out = r + v.shape[0], module.in_features, module.out_features
        n_a, n_b = k * n_in, k * n_out
        flat = torch.empty(n_a + n_b + k, dtype=a_p.dtype, device=a_p.device)
        a_cat, _, b_t, coef, _ = operands(flat, r, k - r, n_in, n_out, launched=True)
        b_cat, c_cat = b_t.t(), coef[:, 0]
        with torch.no_grad():
            a_cat[:r].copy_(a_p.data)
            a_cat[r:].copy_(v)
            b_cat[:, :r].copy_(b_p.data)
            b_cat[:, r:].copy_(u)
            c_cat[:r].fill_(module._base_scaling[adapter])
            c_cat[r:].copy_(delta.data)
        a_p.data = a_cat[:r]
        b_p.data = b_cat[:, :r]
        delta.data = c_cat[r:]
        module.lora_dash_V[adapter] = a_cat[r:]
        module.lora_dash_U[adapter] = b_cat[:, r:]
        key = (a_p.data_ptr(), b_p.data_ptr(), delta.data_ptr())
        module._dash_storage[adapter] = FusedStorage(a_cat, b_cat, c_cat, key, flat)
        return module._dash_storage[adapter]

    @staticmethod
    def storage(module: "DashdiffLinear", adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The (r+s × in) and (out × r+s) storages, re-fused if anything moved the views apart."""
        a_cat, b_cat, _, key, _ = module._dash_storage[adapter]
        a_p, b_p = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        delta = module.lora_dash_delta[adapter]
        views = (module.lora_dash_V[adapter].data_ptr(), module.lora_dash_U[adapter].data_ptr())
        r = module.r[adapter]
        if (a_p.data_ptr(), b_p.data_ptr(), delta.data_ptr()) != key or views != (
            a_cat[r:].data_ptr(), b_cat[:, r:].data_ptr()
        ):
            a_cat, b_cat = LoraDashVariant.fuse(module, adapter)[:2]
        return a_cat, b_cat

    @staticmethod
    def after_state_load(module: "DashdiffLinear") -> None:
        """Re-read the Python mirrors from the step buffers (after a state dict was loaded)."""
        for adapter in module.lora_dash_step.keys():
            module._dash_steps[adapter] = int(module.lora_dash_step[adapter])
            module._dash_launched[adapter] = int(module.lora_dash_launch_step[adapter]) >= 0

    # ------------------------------------------------------------------ launch
    @staticmethod
    def is_launched(module: "DashdiffLinear", adapter: str) -> bool:
        return module._dash_launched.get(adapter, False)

    @staticmethod
    def advance(module: "DashdiffLinear", adapter: str) -> bool:
        """Count one optimizer step; True if this adapter should launch now."""
        module._dash_steps[adapter] += 1
        module.lora_dash_step[adapter].add_(1)
        return not module._dash_launched[adapter] and module._dash_steps[adapter] >= module.dash_warmup_steps[adapter]

    @staticmethod
    def compute_launch(module: "DashdiffLinear", adapter: str) -> Selection:
        """The selection for this adapter from the frozen ``W0`` and ``scaling·B A`` now (consumes a
        prefetched decomposition, nothing else)."""
        if module.merged:
            raise RuntimeError("dashdiff: unmerge the adapters before launching LoRA-Dash (the SVD is of W0 only)")
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        return select_directions(
            module.get_base_layer().weight, a, b, module.base_scaling(adapter), module.dash_directions[adapter],
            eig=module.eig_cache.pop(adapter, None),
        )

    @staticmethod
    def apply_launch(module: "DashdiffLinear", adapter: str, sel: Selection, step: Optional[int] = None) -> None:
        """Install a selection: U_s, V_sᵀ into the storage, δ = 0, the record kept for inspection."""
        a_cat, b_cat = LoraDashVariant.storage(module, adapter)
        r = module.r[adapter]
        with torch.no_grad():
            a_cat[r:].copy_(sel.v_s_t)
            b_cat[:, r:].copy_(sel.u_s)
            module.lora_dash_delta[adapter].zero_()
        step = module._dash_steps[adapter] if step is None else step
        module.lora_dash_launch_step[adapter].fill_(step)
        module._dash_launched[adapter] = True
        module.dash_record[adapter] = {
            "indices": sel.indices.detach().cpu().long(),
            "sigma": sel.sigma.detach().cpu().to(torch.float64),
            "change_rate": sel.change_rate.detach().cpu().to(torch.float64),
        }

    # ------------------------------------------------------------------ forward
    @staticmethod
    def forward(module: "DashdiffLinear", active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
        # Hot path (every forward of every targeted layer): C-level dict lookups instead of
        # ModuleDict / ParameterDict __getitem__, cached views, one cast under autocast.
        # (module._modules[...] rather than module.lora_A: Module.__getattr__ is a Python-level fallback)
        adapter = active_adapter
        a_cat, b_cat, c_cat, key, flat = module._dash_storage[adapter]
        mods = module._modules
        a_p = mods["lora_A"]._modules[adapter]._parameters["weight"]
        b_p = mods["lora_B"]._modules[adapter]._parameters["weight"]
        delta = mods["lora_dash_delta"]._parameters[adapter]
        # Module.to() / PEFT's adapter-dtype cast replace data or whole Parameters: re-fuse then.
        if (a_p.data_ptr(), b_p.data_ptr(), delta.data_ptr()) != key:
            a_cat, b_cat, c_cat, _, flat = LoraDashVariant.fuse(module, adapter)
        launched, r = module._dash_launched[adapter], module.r[adapter]
        # Under autocast everything enters in the autocast dtype, so autocast has nothing left to
        # cast inside. That copy lives in a persistent buffer with cached views: one copy kernel per
        # forward, no allocation, no view ops on this host-bound path. A backward reads the copy of
        # the latest forward, which holds the same values unless the weights were changed between
        # this forward and its backward (which the optimizer never does).
        dtype = compute_dtype(x, flat.dtype)
        base = module._base_scaling[adapter]
        cached = module._dash_operands.get((adapter, dtype))
        if cached is None or cached.flat is not flat or cached.launched != launched:
            src = flat if dtype == flat.dtype else torch.empty(flat.shape, dtype=dtype, device=flat.device)
            views = operands(src, r, c_cat.shape[0] - r, a_cat.shape[1], b_cat.shape[0], launched)
            args = DashKernelArgs(*views, base, 1.0, r)
            cached = module._dash_operands[(adapter, dtype)] = CastOperands(flat, src, launched, args)
        if cached.src is not flat:  # neither requires grad (the parameters are views of flat), so no graph
            cached.src.copy_(flat)
        args = cached.args
        lam = module.scaling[adapter] / base
        if lam != 1.0:  # the runtime scale λ multiplies the whole update, dash term included
            args = args._replace(coef=args.coef * lam, scale=base * lam, lam=lam)
        x = module._adapter_input(x, adapter, args.a_cat.dtype)  # one dropout mask for the LoRA and dash parts
        return result + FusedDashLinear.apply(x, a_p, b_p, delta, args)

    # ------------------------------------------------------------------ export
    @staticmethod
    def plain_factors(module: "DashdiffLinear", adapter: str, a: torch.Tensor, b: torch.Tensor,
                      keep: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank r+s after launch: ``A' = [A; V_sᵀ]``, ``B' = [scaling·B, U_s diag(δ)]``; rank r before."""
        if not LoraDashVariant.is_launched(module, adapter):
            return a, b
        dt = a.dtype
        u = module.lora_dash_U[adapter].detach().to(dt)
        v = module.lora_dash_V[adapter].detach().to(dt)
        d = module.lora_dash_delta[adapter].detach().to(dt)
        return torch.cat([a, v], 0), torch.cat([b, u * d], 1)

    @classmethod
    def export(cls, module: "DashdiffLinear", adapter: str, threshold: Optional[float]) -> ExportedFactors:
        launched = cls.is_launched(module, adapter)
        record = {"method": cls.kind, "r": module.r[adapter],
                  "s": module.dash_directions[adapter] if launched else 0, "launched": launched}
        a, b = module.plain_factors(adapter)
        return ExportedFactors(a, b, record, caveat=not launched)

    @staticmethod
    def caveat(adapter: str, count: int, example: str) -> str:
        return (f"dashdiff: LoRA-Dash adapter {adapter!r} has not launched yet in {count} layer(s) "
                f"(e.g. {example}): exporting them as plain rank-r LoRA with no dash term.")

    # ------------------------------------------------------------------ training state
    @staticmethod
    def header(module: "DashdiffLinear", adapter: str) -> dict[str, Any]:
        return {"s": module.dash_directions[adapter], "launched": LoraDashVariant.is_launched(module, adapter)}

    @staticmethod
    def check_header(meta: dict[str, Any]) -> bool:
        s = meta.get("s")
        return isinstance(s, int) and not isinstance(s, bool) and s >= 1

    @staticmethod
    def expected_tensors(meta: dict[str, Any], n_in: int, n_out: int) -> dict[str, TensorSpec]:
        s = meta["s"]
        return {"lora_dash_delta": ((s,), True), "lora_dash_U": ((n_out, s), True),
                "lora_dash_V": ((s, n_in), True), "lora_dash_step": ((), False),
                "lora_dash_launch_step": ((), False)}

    @staticmethod
    def record_tensors(module: "DashdiffLinear", adapter: str) -> dict[str, torch.Tensor]:
        record = module.dash_record.get(adapter)
        if not LoraDashVariant.is_launched(module, adapter) or record is None:
            return {}
        return {f"dash_record.{f}": record[f] for f in RECORD_FIELDS}

    @staticmethod
    def check_record(file: Any, name: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor], k: int,
                     check_tensor: Any) -> set[str]:
        if f"{name}.dash_record.indices" not in tensors:
            return set()
        idx = tensors[f"{name}.dash_record.indices"]
        check_tensor(file, f"{name}.dash_record.indices", idx, (min(idx.numel(), meta["s"]),), False)
        if idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < k):
            raise ValueError(f"dashdiff: {file}: {name}.dash_record.indices out of range 0..{k - 1}")
        for field_name in ("sigma", "change_rate"):
            key = f"{name}.dash_record.{field_name}"
            if key not in tensors:
                raise ValueError(f"dashdiff: {file} lacks tensor {key} (a damaged or hand-edited file)")
            check_tensor(file, key, tensors[key], (k,), True)
        return {f"{name}.dash_record.{f}" for f in RECORD_FIELDS}

    @staticmethod
    def load_record(module: "DashdiffLinear", adapter: str, name: str, tensors: dict[str, torch.Tensor]) -> None:
        if f"{name}.dash_record.indices" in tensors:
            module.dash_record[adapter] = {f: tensors[f"{name}.dash_record.{f}"].clone() for f in RECORD_FIELDS}
        else:
            module.dash_record.pop(adapter, None)
        LoraDashVariant.after_state_load(module)

    @staticmethod
    def layer_config(module: "DashdiffLinear", adapter: str, common: dict[str, Any]) -> Any:
        return LoraDashConfig(**common, dash_directions=module.dash_directions[adapter],
                              dash_warmup_steps=module.dash_warmup_steps[adapter])
