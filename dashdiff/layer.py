"""dashdiff's tuner layer: one PEFT LoRA ``Linear`` subclass that holds, per adapter, a plain
LoRA, a LoRA-Dash or an AutoLoRA adapter (so the three can share a model).

Per-adapter state (all registered under ``lora_*`` names, so PEFT keeps them with the adapter):

- LoRA-Dash: ``lora_dash_delta`` δ (s,) trainable from injection; ``lora_dash_U`` U_s (out, s) and
  ``lora_dash_V`` V_sᵀ (s, in) frozen buffers, zero before launch; ``lora_dash_step`` (optimizer
  steps counted) and ``lora_dash_launch_step`` (-1 before launch). ``lora_A``/``lora_B`` weights
  and U_s/V_sᵀ are views into one (r+s × in) and one (out × r+s) storage, so the forward is a
  single rank-(r+s) product (``functional.FusedDashLinear``).
- AutoLoRA: ``lora_autolora_beta`` β (k,) trainable, ``lora_autolora_outer_steps``.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import adapter_kind
from .functional import FusedAutoLoraLinear, FusedDashLinear, PairedAutoLoraLinear, operands
from .launch import GramEig, Selection, select_directions


def _compute_dtype(x: torch.Tensor, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype an adapter computes in: autocast's for ``x``'s device when autocast is on, else the
    parameters'."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else param_dtype


def _stock_save_hook(module: "DashdiffLinear", state_dict, prefix, local_metadata) -> None:
    # PEFT's and diffusers' stock save paths go through get_peft_model_state_dict; the files they
    # write load in stock loaders as plain rank-r LoRA and silently lose the dash term / α.
    if not any(k != "lora" for k in module.adapter_kind.values()):
        return
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "get_peft_model_state_dict" and "peft" in frame.f_code.co_filename:
            warnings.warn(
                    "dashdiff: a stock PEFT/diffusers save (get_peft_model_state_dict, save_pretrained, "
                    "save_lora_weights) of LoRA-Dash / AutoLoRA layers writes a file that stock loaders read "
                    "as a plain rank-r LoRA, dropping the dash term (δ, U_s, V_s) or AutoLoRA's α. Use "
                    "dashdiff.export_lora(...) for a stock-loadable file and dashdiff.save_adapter(...) for "
                    "the full training state.",
                UserWarning,
                stacklevel=2,
            )
            return
        frame = frame.f_back



class DashdiffLinear(LoraLinear):
    """PEFT LoRA ``Linear`` whose adapters may be LoRA-Dash or AutoLoRA (see module docstring).

    Only an exact ``nn.Linear`` base is accepted: the methods need the dense weight (SVD at
    launch, merging), and subclasses such as quantized linears would give wrong results.
    """

    adapter_layer_names = LoraLayer.adapter_layer_names + ("lora_dash_delta", "lora_autolora_beta")
    other_param_names = LoraLayer.other_param_names + (
        "lora_dash_U",
        "lora_dash_V",
        "lora_dash_step",
        "lora_dash_launch_step",
        "lora_autolora_outer_steps",
        "adapter_kind",
        "dash_directions",
        "dash_warmup_steps",
        "autolora_settings",
    )

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs: Any) -> None:
        base = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        if type(base) is not nn.Linear:
            where = kwargs.get("current_key") or kwargs.get("target_name") or "a target module"
            raise TypeError(
                f"dashdiff: {where} is a {type(base).__module__}.{type(base).__name__}, not a dense "
                "torch.nn.Linear. LoRA-Dash and AutoLoRA adapt dense nn.Linear layers only (they need the "
                "dense weight for the launch SVD and for merging). Quantized linears (bitsandbytes 8/4-bit, "
                "GPTQ, AWQ, ...) are not supported: load the base model in bf16/fp16. Otherwise remove this "
                "module from target_modules."
            )
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self._register_state_dict_hook(_stock_save_hook)
        self.register_load_state_dict_post_hook(lambda module, keys: module._refresh_mirrors())

    # ------------------------------------------------------------------ construction
    def _ensure_containers(self) -> None:
        if "lora_dash_delta" in self._modules:
            return
        self.lora_dash_delta = nn.ParameterDict({})
        self.lora_dash_U = BufferDict({}, persistent=True)
        self.lora_dash_V = BufferDict({}, persistent=True)
        self.lora_dash_step = BufferDict({}, persistent=True)
        self.lora_dash_launch_step = BufferDict({}, persistent=True)
        self.lora_autolora_beta = nn.ParameterDict({})
        self.lora_autolora_outer_steps = BufferDict({}, persistent=True)
        self.adapter_kind: dict[str, str] = {}
        self.dash_directions: dict[str, int] = {}
        self.dash_warmup_steps: dict[str, int] = {}
        self.autolora_settings: dict[str, dict] = {}
        # Python mirrors of the step buffers: reading a GPU scalar per forward would sync.
        self._dash_steps: dict[str, int] = {}
        self._dash_launched: dict[str, bool] = {}
        self._dash_storage: dict[str, tuple] = {}
        # (adapter, compute dtype) -> (flat, source: flat or a low-precision copy, launched, operand views)
        self._dash_operands: dict[tuple, tuple] = {}
        self._base_scaling: dict[str, float] = {}
        # adapter -> (A±, B±) stacked (2, k, in), (2, out, k): set by BilevelStep for the duration of
        # its batched finite-difference pass only (autolora.BilevelStep, fd_batched=True)
        self._fd_pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.eig_cache: dict[str, "GramEig"] = {}  # filled ahead of launch by dashdiff.prefetch
        self.dash_record: dict[str, dict[str, torch.Tensor]] = {}

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs: Any) -> None:
        self._ensure_containers()
        kind = adapter_kind(config)
        if kind == "dash" and config.dash_directions > min(self.in_features, self.out_features):
            where = kwargs.get("current_key") or kwargs.get("target_name") or "a target"
            raise ValueError(
                f"dashdiff: dash_directions s={config.dash_directions} exceeds min(out, in)="
                f"{min(self.in_features, self.out_features)} of {where} ({self.out_features}x{self.in_features}): "
                "lower dash_directions or remove this module from target_modules."
            )
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        self.adapter_kind[adapter_name] = kind
        self._base_scaling[adapter_name] = self.base_scaling(adapter_name)
        a = self.lora_A[adapter_name].weight
        if kind == "dash":
            s = config.dash_directions
            self.dash_directions[adapter_name] = s
            self.dash_warmup_steps[adapter_name] = config.dash_warmup_steps
            self.lora_dash_U[adapter_name] = torch.zeros(self.out_features, s, dtype=a.dtype, device=a.device)
            self.lora_dash_V[adapter_name] = torch.zeros(s, self.in_features, dtype=a.dtype, device=a.device)
            self.lora_dash_delta[adapter_name] = nn.Parameter(torch.zeros(s, dtype=a.dtype, device=a.device))
            self.lora_dash_step[adapter_name] = torch.zeros((), dtype=torch.long, device=a.device)
            self.lora_dash_launch_step[adapter_name] = torch.full((), -1, dtype=torch.long, device=a.device)
            self._dash_steps[adapter_name] = 0
            self._dash_launched[adapter_name] = False
            self._fuse_storage(adapter_name)
        elif kind == "autolora":
            self.lora_autolora_beta[adapter_name] = nn.Parameter(torch.ones(r, dtype=a.dtype, device=a.device))
            self.lora_autolora_outer_steps[adapter_name] = torch.zeros((), dtype=torch.long, device=a.device)
            self.autolora_settings[adapter_name] = {
                "threshold": config.autolora_threshold,
                "rank_rule": config.autolora_rank_rule,
            }
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # ------------------------------------------------------------------ helpers
    def base_scaling(self, adapter: str) -> float:
        """``lora_alpha / r`` (``/ sqrt(r)`` with rslora): the scaling before any runtime scale."""
        r, alpha = self.r[adapter], self.lora_alpha[adapter]
        return alpha / math.sqrt(r) if self.use_rslora.get(adapter, False) else alpha / r

    def runtime_scale(self, adapter: str) -> float:
        """λ, the factor a user set through ``scale_layer`` / ``set_scale`` (1 by default)."""
        return self.scaling[adapter] / self.base_scaling(adapter)

    def _fuse_storage(self, adapter: str) -> tuple:
        """(Re)build the fused storage from the current tensors and re-point the views.

        One flat storage per adapter holds ``a_cat = [A; V_sᵀ]`` (r+s, in), then ``[B, U_s]``
        (out, r+s) as the transpose of a row-major (r+s, out) block (so B's view is dense), then
        ``c_cat = [base_scaling·1_r; δ]`` (r+s,): under autocast one cast per forward covers all
        three. ``Module.to`` / ``cast_training_params`` replace each parameter's and buffer's data
        separately, which breaks the aliasing; the tensors themselves stay the source of truth, so
        re-fusing loses nothing.
        """
        r = self.r[adapter]
        a_p, b_p = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        delta = self.lora_dash_delta[adapter]
        v, u = self.lora_dash_V[adapter], self.lora_dash_U[adapter]
        k, n_in, n_out = r + v.shape[0], self.in_features, self.out_features
        n_a, n_b = k * n_in, k * n_out
        flat = torch.empty(n_a + n_b + k, dtype=a_p.dtype, device=a_p.device)
        a_cat, _, b_t, coef, _ = operands(flat, r, k - r, n_in, n_out, launched=True)
        b_cat, c_cat = b_t.t(), coef[:, 0]
        with torch.no_grad():
            a_cat[:r].copy_(a_p.data)
            a_cat[r:].copy_(v)
            b_cat[:, :r].copy_(b_p.data)
            b_cat[:, r:].copy_(u)
            c_cat[:r].fill_(self._base_scaling[adapter])
            c_cat[r:].copy_(delta.data)
        a_p.data = a_cat[:r]
        b_p.data = b_cat[:, :r]
        delta.data = c_cat[r:]
        self.lora_dash_V[adapter] = a_cat[r:]
        self.lora_dash_U[adapter] = b_cat[:, r:]
        key = (a_p.data_ptr(), b_p.data_ptr(), delta.data_ptr())
        self._dash_storage[adapter] = (a_cat, b_cat, c_cat, key, flat)
        return self._dash_storage[adapter]

    def _storage(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The (r+s × in) and (out × r+s) storages, re-fused if anything moved the views apart."""
        a_cat, b_cat, _, key, _ = self._dash_storage[adapter]
        a_p, b_p = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        delta = self.lora_dash_delta[adapter]
        views = (self.lora_dash_V[adapter].data_ptr(), self.lora_dash_U[adapter].data_ptr())
        r = self.r[adapter]
        if (a_p.data_ptr(), b_p.data_ptr(), delta.data_ptr()) != key or views != (
            a_cat[r:].data_ptr(), b_cat[:, r:].data_ptr()
        ):
            a_cat, b_cat = self._fuse_storage(adapter)[:2]
        return a_cat, b_cat

    def _refresh_mirrors(self) -> None:
        for adapter in self.lora_dash_step.keys():
            self._dash_steps[adapter] = int(self.lora_dash_step[adapter])
            self._dash_launched[adapter] = int(self.lora_dash_launch_step[adapter]) >= 0

    def autolora_alpha(self, adapter: str) -> torch.Tensor:
        """α = softmax(β) in float64, (k,)."""
        return torch.softmax(self.lora_autolora_beta[adapter].detach().to(torch.float64), 0)

    # ------------------------------------------------------------------ LoRA-Dash lifecycle
    def is_launched(self, adapter: str) -> bool:
        return self._dash_launched.get(adapter, False)

    def advance(self, adapter: str) -> bool:
        """Count one optimizer step; True if this adapter should launch now."""
        self._dash_steps[adapter] += 1
        self.lora_dash_step[adapter].add_(1)
        return not self._dash_launched[adapter] and self._dash_steps[adapter] >= self.dash_warmup_steps[adapter]

    def compute_launch(self, adapter: str) -> Selection:
        """The selection for this adapter from the frozen ``W0`` and ``scaling·B A`` now (no side effects)."""
        if self.merged:
            raise RuntimeError("dashdiff: unmerge the adapters before launching LoRA-Dash (the SVD is of W0 only)")
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        return select_directions(
            self.get_base_layer().weight, a, b, self.base_scaling(adapter), self.dash_directions[adapter],
            eig=self.eig_cache.pop(adapter, None),
        )

    def apply_launch(self, adapter: str, sel: Selection, step: Optional[int] = None) -> None:
        """Install a selection: U_s, V_sᵀ into the storage, δ = 0, the record kept for inspection."""
        a_cat, b_cat = self._storage(adapter)
        r = self.r[adapter]
        with torch.no_grad():
            a_cat[r:].copy_(sel.v_s_t)
            b_cat[:, r:].copy_(sel.u_s)
            self.lora_dash_delta[adapter].zero_()
        step = self._dash_steps[adapter] if step is None else step
        self.lora_dash_launch_step[adapter].fill_(step)
        self._dash_launched[adapter] = True
        self.dash_record[adapter] = {
            "indices": sel.indices.detach().cpu().long(),
            "sigma": sel.sigma.detach().cpu().to(torch.float64),
            "change_rate": sel.change_rate.detach().cpu().to(torch.float64),
        }

    # ------------------------------------------------------------------ math
    def plain_factors(self, adapter: str, keep: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This adapter as a plain LoRA with the scale folded in: ``ΔW = B' A'`` at runtime scale 1.

        Returns A' (rank, in), B' (out, rank) in float32 (float64 for float64 adapters). LoRA-Dash:
        rank r+s after launch (r before); AutoLoRA: the components in boolean mask ``keep``
        (all if None) with α folded into B, α not renormalised.
        """
        kind = self.adapter_kind.get(adapter, "lora")
        a = self.lora_A[adapter].weight.detach()
        b = self.lora_B[adapter].weight.detach()
        dt = torch.float64 if a.dtype == torch.float64 else torch.float32
        a, b = a.to(dt), b.to(dt) * self.base_scaling(adapter)
        if kind == "dash" and self.is_launched(adapter):
            u = self.lora_dash_U[adapter].detach().to(dt)
            v = self.lora_dash_V[adapter].detach().to(dt)
            d = self.lora_dash_delta[adapter].detach().to(dt)
            a = torch.cat([a, v], 0)
            b = torch.cat([b, u * d], 1)
        elif kind == "autolora":
            b = b * self.autolora_alpha(adapter).to(dt)
            if keep is not None:
                keep = keep.to(a.device)
                a, b = a[keep], b[:, keep]
        return a.contiguous(), b.contiguous()

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``ΔW`` (out, in) at the current runtime scale, base weight dtype; used by merge/unmerge."""
        a, b = self.plain_factors(adapter)
        dtype = self.get_base_layer().weight.dtype
        return ((b @ a) * self.runtime_scale(adapter)).to(dtype)

    def _dash_delta_out(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        # Hot path (every forward of every targeted layer): C-level dict lookups instead of
        # ModuleDict / ParameterDict __getitem__, cached views, one cast under autocast.
        # (self._modules[...] rather than self.lora_A: Module.__getattr__ is a Python-level fallback)
        a_cat, b_cat, c_cat, key, flat = self._dash_storage[adapter]
        mods = self._modules
        a_p = mods["lora_A"]._modules[adapter]._parameters["weight"]
        b_p = mods["lora_B"]._modules[adapter]._parameters["weight"]
        delta = mods["lora_dash_delta"]._parameters[adapter]
        # Module.to() / PEFT's adapter-dtype cast replace data or whole Parameters: re-fuse then.
        if (a_p.data_ptr(), b_p.data_ptr(), delta.data_ptr()) != key:
            a_cat, b_cat, c_cat, _, flat = self._fuse_storage(adapter)
        launched, r = self._dash_launched[adapter], self.r[adapter]
        # Under autocast everything enters in the autocast dtype, so autocast has nothing left to
        # cast inside. That copy lives in a persistent buffer with cached views: one copy kernel per
        # forward, no allocation, no view ops on this host-bound path. A backward reads the copy of
        # the latest forward, which holds the same values unless the weights were changed between
        # this forward and its backward (which the optimizer never does).
        dtype = _compute_dtype(x, flat.dtype)
        cached = self._dash_operands.get((adapter, dtype))
        if cached is None or cached[0] is not flat or cached[2] != launched:
            src = flat if dtype == flat.dtype else torch.empty(flat.shape, dtype=dtype, device=flat.device)
            dims = (r, c_cat.shape[0] - r, a_cat.shape[1], b_cat.shape[0], launched)
            cached = self._dash_operands[(adapter, dtype)] = (flat, src, launched, operands(src, *dims))
        if cached[1] is not flat:  # neither requires grad (the parameters are views of flat), so no graph
            cached[1].copy_(flat)
        ops = cached[3]
        a, a_t, b_t, coef, u_t = ops
        base = self._base_scaling[adapter]
        lam = self.scaling[adapter] / base
        if lam != 1.0:
            coef = coef * lam  # the runtime scale λ multiplies the whole update, dash term included
        x = self._adapter_input(x, adapter, a.dtype)  # one dropout mask for the LoRA and dash parts
        return FusedDashLinear.apply(x, a_p, b_p, delta, (a, a_t, b_t, coef, u_t, base * lam, lam, r))

    def _autolora_delta_out(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        mods = self._modules
        a_p = mods["lora_A"]._modules[adapter]._parameters["weight"]
        b_p = mods["lora_B"]._modules[adapter]._parameters["weight"]
        beta = mods["lora_autolora_beta"]._parameters[adapter]
        dtype = _compute_dtype(x, a_p.dtype)
        pair = self._fd_pairs.get(adapter)
        if pair is not None:
            if x.shape[0] % 2:
                raise RuntimeError(
                    f"dashdiff: the batched finite-difference pass expects the doubled batch on dim 0 of every "
                    f"adapted layer's input, got shape {tuple(x.shape)}: pass fd_batched=False to BilevelStep")
            return PairedAutoLoraLinear.apply(self._adapter_input(x, adapter, dtype), beta, *pair, self.scaling[adapter])
        return FusedAutoLoraLinear.apply(self._adapter_input(x, adapter, dtype), a_p, b_p, beta, self.scaling[adapter])

    def _adapter_input(self, x: torch.Tensor, adapter: str, dtype: torch.dtype) -> torch.Tensor:
        """The adapter's input: its dropout (skipped when it is the identity), then ``dtype``."""
        dropout = self._modules["lora_dropout"]._modules[adapter]
        if not isinstance(dropout, nn.Identity):
            x = dropout(x)
        return x if x.dtype == dtype else x.to(dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("dashdiff layers do not support mixed-batch `adapter_names`; call set_adapter instead")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter not in self._modules["lora_A"]._modules:
                continue
            kind = self.adapter_kind.get(adapter, "lora")
            if kind == "dash":
                result = result + self._dash_delta_out(x, adapter)
                continue
            if kind == "autolora":
                result = result + self._autolora_delta_out(x, adapter)
                continue
            lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
            h = lora_a(self.lora_dropout[adapter](self._cast_input_dtype(x, lora_a.weight.dtype)))
            result = result + lora_b(h) * self.scaling[adapter]
        return result if result.dtype == result_dtype else result.to(result_dtype)

    def __repr__(self) -> str:
        return "dashdiff." + nn.Module.__repr__(self)
