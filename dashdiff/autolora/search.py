"""AutoLoRA search (Zhang et al., NAACL 2024) driven from the user's own training loop.

``BilevelStep.step(train_batch, val_batch, loss_fn)`` does one bi-level step (METHODS.md,
AutoLoRA 2): an inner optimizer step of the LoRA weights ``w = {A, B}`` on the training loss
(``w -> w'``), then an outer step of the selection logits ``β`` with a hypergradient of the
validation loss at ``w'``. After the search, ``ranks.determine_ranks`` reads the per-layer ranks,
``retrain_config`` turns them into a plain ``peft.LoraConfig`` for the retrain phase and
``report.write_rank_report`` writes them next to the outputs.

``loss_fn(model, batch) -> scalar`` must be deterministic given its batch (noise, timesteps and
anything else random travel inside the batch) and must use the ``model`` it is handed: the inner
pass hands it the model as given (DDP / accelerate-wrapped), the hypergradient passes the
unwrapped module with accelerate's autocast wrapper removed.
"""

from __future__ import annotations

import math
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Optional, Sequence, Union

import torch
import torch.distributed as dist
from peft import LoraConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .ranks import determine_ranks
from .variant import AutoLoraVariant
from ..ops import fused_adamw_ok
from ..walk import AdapterLayer, base_model, iter_layers, resolve_adapter, unwrap_parallel

__all__ = ["BilevelStep", "default_adam", "double_batch", "retrain_config", "split_train_val", "split_indices"]

Mode = Literal["darts", "first_order", "darts_unrolled"]
MODES = ("darts", "first_order", "darts_unrolled")
LossFn = Callable[[Any, Any], torch.Tensor]

# Published optimizer settings (AutoLoRA's released code): Adam, lr 3e-4 for w and for β,
# β with betas (0.5, 0.999) as in DARTS' architecture optimizer.
DEFAULT_WEIGHT_LR = 3e-4
DEFAULT_BETA_LR = 3e-4
DEFAULT_BETA_BETAS = (0.5, 0.999)
DEFAULT_VAL_FRACTION = 0.3  # published code: 70/30 (the paper says 1:1)


# --------------------------------------------------------------------------- helpers


def _inner_optimizer(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's ``AcceleratedOptimizer`` (which holds it as ``.optimizer``)."""
    while type(opt).__name__ == "AcceleratedOptimizer":
        opt = opt.optimizer
    return opt


def _optimizer_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in _inner_optimizer(opt).param_groups for p in g["params"]]


@contextmanager
def _full_precision(root: nn.Module, device_type: str) -> Iterator[nn.Module]:
    """Autocast off, and accelerate's per-model autocast wrapper (``model.forward`` replaced at
    ``prepare``, original kept as ``_original_forward``) bypassed for the duration: that wrapper
    re-enters autocast inside the forward, so an outer ``autocast(enabled=False)`` alone would not do."""
    wrapped = root.__dict__.get("forward")
    original = root.__dict__.get("_original_forward")
    swap = wrapped is not None and original is not None
    if swap:
        root.forward = original
    try:
        with torch.autocast(device_type, enabled=False):
            yield root
    finally:
        if swap:
            root.forward = wrapped


@contextmanager
def _eval_mode(module_dicts: Sequence[dict]) -> Iterator[None]:
    """Every module in eval mode (dropout off), each module's own flag restored afterwards; takes the
    modules' ``__dict__``s (collected once).

    Writes the ``training`` flags into each module's ``__dict__``: ``Module.eval()`` recurses through
    ``train()`` per module and even ``Module.__setattr__`` costs ~2 µs a module, milliseconds per
    step on a UNet's hundreds of modules. ``training`` is a plain attribute, so this is equivalent."""
    flags = [d["training"] for d in module_dicts]
    try:
        for d in module_dicts:
            d["training"] = False
        yield
    finally:
        for d, flag in zip(module_dicts, flags):
            d["training"] = flag


@contextmanager
def _frozen(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """``requires_grad`` off for the duration: a pass that wants ∂β only then skips the weight-gradient
    work (custom autograd Functions cannot see which inputs ``autograd.grad`` asked for)."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(buf: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for t in like:
        out.append(buf[i : i + t.numel()].view_as(t))
        i += t.numel()
    return out


def _grads(loss: torch.Tensor, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``torch.autograd.grad`` with zeros for inputs the loss does not depend on."""
    gs = torch.autograd.grad(loss, list(inputs), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(inputs, gs)]


def default_adam(params: list[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
    """Adam as published, run as PyTorch's fused kernel where it can be (float parameters on the CPU or
    one CUDA device), else foreach: the per-tensor Python loop of the default CPU Adam costs more than
    a forward pass on a model with hundreds of adapted layers."""
    kind = {"fused": True} if fused_adamw_ok(params) else {"foreach": True}
    return torch.optim.Adam(params, lr=lr, betas=betas, **kind)


def double_batch(batch: Any) -> Any:
    """The batch twice along dim 0: every tensor with a dim 0 is concatenated with itself (through
    dicts, lists and tuples); scalars, 0-d tensors and other objects are kept. The default input of
    ``BilevelStep``'s batched finite-difference pass."""
    if torch.is_tensor(batch):
        return torch.cat([batch, batch]) if batch.dim() else batch
    if isinstance(batch, dict):
        return type(batch)((k, double_batch(v)) for k, v in batch.items())
    if isinstance(batch, (list, tuple)):
        items = [double_batch(v) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch


# Relative gap allowed between the batched and the two-pass central difference on the first step
# (float32: the two differ by summation order only; a loss that is not a mean over the copies is
# off by 50 % or more).
FD_BATCHED_CHECK_RTOL = 1e-2


@dataclass
class _OptimizerSnapshot:
    """Copied per-parameter optimizer state: the state's items as they were, tensors as copies."""

    params: list  # the parameters that had state
    items: list  # per parameter: [(key, value)], tensor values taken from ``copies`` in order
    copies: list  # copies of the tensor values

    @property
    def state(self) -> dict:
        copies = iter(self.copies)
        return {p: {k: next(copies) if isinstance(v, torch.Tensor) else v for k, v in its}
                for p, its in zip(self.params, self.items)}


class _Mirror:
    """Copies of the same tensors at every step, into the buffers of the previous step: one
    ``_foreach_copy_`` instead of a clone per tensor (the full snapshot is taken at every step).
    A copy stays valid until the next ``copy`` call."""

    def __init__(self) -> None:
        self._ids: Optional[list[int]] = None
        self._bufs: list[torch.Tensor] = []

    def copy(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        # Hot path (every step, thousands of tensors on a UNet): compare identities only; a tensor
        # that changed shape under the same identity makes the copy raise, and the buffers are rebuilt.
        ids = list(map(id, tensors))
        if ids == self._ids and tensors:
            try:
                with torch.no_grad():
                    torch._foreach_copy_(self._bufs, tensors)
                return list(self._bufs)
            except RuntimeError:
                pass
        self._bufs, self._ids = [t.detach().clone() for t in tensors], ids
        return list(self._bufs)


def _snapshot_optimizer(opt: torch.optim.Optimizer, mirror: _Mirror) -> _OptimizerSnapshot:
    inner = _inner_optimizer(opt)
    items = [list(st.items()) for st in inner.state.values()]
    tensors = [v for its in items for _, v in its if isinstance(v, torch.Tensor)]
    return _OptimizerSnapshot(list(inner.state), items, mirror.copy(tensors))


def _restore_optimizer(opt: torch.optim.Optimizer, snap: _OptimizerSnapshot) -> None:
    """Put the per-parameter state back (in place where shapes allow: foreach / fused optimizers
    and anything holding references keep seeing the same tensors). The snapshot stays usable."""
    inner = _inner_optimizer(opt)
    for p in [p for p in inner.state if p not in snap.state]:
        del inner.state[p]
    for p, saved in snap.state.items():
        cur = inner.state.get(p)
        if cur is not None and cur.keys() == saved.keys() and all(
            not torch.is_tensor(v) or (torch.is_tensor(cur[k]) and cur[k].shape == v.shape) for k, v in saved.items()
        ):
            for k, v in saved.items():
                if torch.is_tensor(v):
                    cur[k].copy_(v)
                else:
                    cur[k] = v
        else:
            inner.state[p] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in saved.items()}


# --------------------------------------------------------------------------- the bi-level step


class BilevelStep:
    """One AutoLoRA bi-level step per call, for a model holding an AutoLoRA adapter.

    Args:
        model: the model with an AutoLoRA adapter (``AutoLoraConfig``), as the training loop calls
            it: plain, a ``PeftModel``, or prepared by ``accelerator.prepare`` (DDP).
        weight_optimizer: optimizer of the inner step. Default: Adam (``default_adam``), lr 3e-4, over the adapter's
            ``lora_A`` / ``lora_B`` (prepared with ``accelerator`` when given). If it holds further
            parameters, they count as part of ``w`` (perturbed and differentiated like A, B).
        beta_optimizer: optimizer of β. Default: Adam, lr 3e-4, betas (0.5, 0.999). Always stepped
            as the underlying torch optimizer: β's gradient is exact float32, never loss-scaled.
        mode: ``darts`` (default), ``first_order`` or ``darts_unrolled`` (METHODS.md, AutoLoRA 2).
        adapter_name: the AutoLoRA adapter (default: the only one).
        rollback: after the β update, restore ``w`` and the weight optimizer's state and redo the
            inner step with the new β (published behaviour; off by default).
        fd_epsilon: ε = fd_epsilon / ‖v‖ for the central difference.
        unrolled_xi: ξ of ``darts_unrolled`` (default: the weight optimizer's first lr).
        accelerator: an ``accelerate.Accelerator``: its mixed precision drives the inner step, its
            ``gradient_accumulation_steps`` the number of ``step`` calls per bi-level update.
        max_grad_norm: clip the inner gradient of ``w`` to this norm (None: no clipping).
        weight_lr, beta_lr: learning rates of the default optimizers.
        val_precision: ``"inner"`` (default): the validation pass runs at the inner step's precision
            (accelerate's or the caller's bf16 autocast); ``"float32"``: full precision, autocast off.
            Under fp16 it is always float32 (its gradient would need the loss scale).
        fd_batched: run the two finite-difference passes as one forward/backward on the training
            batch twice over (``double_batch``), the copies at ``w+`` and ``w−`` (one pass of the
            frozen network at twice the batch instead of two: cheaper where the step is bound by
            per-operation overhead, e.g. a GPU at batch 1; the finite-difference pass then holds
            twice the activations). It needs ``loss_fn(model, double(batch))`` to be the mean of
            the two copies' losses, as for a mean over samples, and every adapted layer's input to
            carry the batch on dim 0. The first step checks this against the two-pass result
            and raises if they differ.
        double: the function that doubles a batch for ``fd_batched`` (default ``double_batch``).

    Gradient accumulation: with ``n = accelerator.gradient_accumulation_steps > 1``, call ``step``
    once per micro-batch pair and *not* inside ``accelerator.accumulate``: the first ``n - 1``
    calls only accumulate the inner gradient (returning ``val_loss=None``), the ``n``-th does the
    bi-level update over all ``n`` pairs (means over the micro-batches, so it equals one step on
    the concatenated batches when the loss is a mean over equal-sized micro-batches).

    The finite-difference passes run in full precision with autocast off, in eval mode and from one
    forked RNG state (METHODS.md: under bf16 autocast the central difference is ~50 % wrong). The
    model's parameters must therefore be float32 (or float64): keep the base weights in float32
    during the search and let ``mixed_precision`` autocast the inner step and the validation pass.
    """

    def __init__(
        self,
        model: nn.Module,
        weight_optimizer: Optional[torch.optim.Optimizer] = None,
        beta_optimizer: Optional[torch.optim.Optimizer] = None,
        mode: Mode = "darts",
        adapter_name: Optional[str] = None,
        rollback: bool = False,
        fd_epsilon: float = 0.01,
        unrolled_xi: Optional[float] = None,
        accelerator=None,
        max_grad_norm: Optional[float] = None,
        weight_lr: float = DEFAULT_WEIGHT_LR,
        beta_lr: float = DEFAULT_BETA_LR,
        val_precision: Literal["inner", "float32"] = "inner",
        fd_batched: bool = False,
        double: Callable[[Any], Any] = double_batch,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"dashdiff: unknown AutoLoRA mode {mode!r} (use one of {', '.join(MODES)})")
        if not fd_epsilon > 0:
            raise ValueError(f"dashdiff: fd_epsilon must be > 0, got {fd_epsilon}")
        if val_precision not in ("inner", "float32"):
            raise ValueError(f"dashdiff: val_precision must be 'inner' or 'float32', got {val_precision!r}")
        if unrolled_xi is not None and mode != "darts_unrolled":
            raise ValueError("dashdiff: unrolled_xi is only used by mode='darts_unrolled'")
        if accelerator is not None:
            from accelerate.utils import DistributedType

            if accelerator.distributed_type in (
                DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM, DistributedType.XLA
            ):
                raise NotImplementedError(
                    f"dashdiff: BilevelStep supports single-process and DDP runs, not {accelerator.distributed_type}"
                )
        self.model = model
        self.accelerator = accelerator
        self.mode: Mode = mode
        self.rollback = rollback
        self.fd_epsilon = float(fd_epsilon)
        self.max_grad_norm = max_grad_norm
        self.val_precision = val_precision
        self.fd_batched = fd_batched
        self.double = double
        self._fd_checked = False
        self.root = unwrap_parallel(model)  # accelerate's autocast wrapper, if any, stays on
        self.adapter = resolve_adapter(self.root, "autolora", adapter_name)
        self.layers: list[AdapterLayer] = list(iter_layers(self.root, "autolora", self.adapter))
        self.names = [n for n, _, _ in self.layers]
        self.betas = [layer.lora_autolora_beta[a] for _, layer, a in self.layers]
        lora_w = [p for _, layer, a in self.layers for p in (layer.lora_A[a].weight, layer.lora_B[a].weight)]

        for name, layer, a in self.layers:
            if layer.merged:
                raise RuntimeError(f"dashdiff: unmerge the adapters before the AutoLoRA search ({name} is merged)")
        bad = [n for n, p in zip(self.names, self.betas) if not p.requires_grad]
        bad += [n for n, (_, layer, a) in zip(self.names, self.layers) if not layer.lora_A[a].weight.requires_grad]
        if bad:
            raise ValueError(f"dashdiff: AutoLoRA parameters are frozen in {sorted(set(bad))[:3]}...: is the adapter active and trainable?")
        wrong = sorted({str(p.dtype) for p in self.root.parameters() if p.is_floating_point()}
                       - {"torch.float32", "torch.float64"})
        if wrong:
            raise ValueError(
                f"dashdiff: the AutoLoRA search needs float32 (or float64) parameters, found {', '.join(wrong)}: the "
                "finite-difference hypergradient is run in full precision (under bf16 it is ~50% wrong). Keep the base "
                "model in float32 and use mixed_precision (autocast) for the inner step instead of casting weights."
            )
        self.device_type = self.betas[0].device.type
        self._module_dicts = [m.__dict__ for m in self.root.modules()]  # for _eval_mode

        if weight_optimizer is None:
            weight_optimizer = default_adam(lora_w, lr=weight_lr)
            if accelerator is not None:
                weight_optimizer = accelerator.prepare_optimizer(weight_optimizer)
        if beta_optimizer is None:
            beta_optimizer = default_adam(self.betas, lr=beta_lr, betas=DEFAULT_BETA_BETAS)
        self.weight_optimizer = weight_optimizer
        self.beta_optimizer = beta_optimizer

        # w: every trainable parameter of the inner optimizer (at least the adapter's A and B).
        self.weights = [p for p in _optimizer_params(weight_optimizer) if p.requires_grad]
        wids, bids = {id(p) for p in self.weights}, {id(p) for p in self.betas}
        if wids & bids:
            raise ValueError("dashdiff: the weight optimizer must not hold β (lora_autolora_beta): β is the outer variable")
        if missing := [p for p in lora_w if id(p) not in wids]:
            raise ValueError(f"dashdiff: the weight optimizer misses {len(missing)} lora_A / lora_B parameters of the adapter")
        beta_opt_ids = {id(p) for p in _optimizer_params(beta_optimizer)}
        if not bids <= beta_opt_ids:
            raise ValueError("dashdiff: the β optimizer must hold every lora_autolora_beta of the adapter")
        if beta_opt_ids & wids:
            raise ValueError("dashdiff: the β optimizer must not hold LoRA weights")
        self._beta_opt_params = [p for p in _optimizer_params(beta_optimizer)]
        if fd_batched and len(self.weights) != len(lora_w):
            raise ValueError(
                "dashdiff: fd_batched=True perturbs only the adapters' lora_A / lora_B, but the weight optimizer "
                f"holds {len(self.weights) - len(lora_w)} further trainable parameters: use fd_batched=False")
        # w's index of each layer's (A, B), and persistent (2, ...) buffers for the batched pass
        index = {id(p): i for i, p in enumerate(self.weights)}
        self._pair_index = [(index[id(layer.lora_A[a].weight)], index[id(layer.lora_B[a].weight)])
                            for _, layer, a in self.layers]
        self._pair_bufs: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None

        if mode == "darts_unrolled" and unrolled_xi is None:
            lr = _inner_optimizer(weight_optimizer).param_groups[0]["lr"]
            unrolled_xi = float(lr)
        self.unrolled_xi = unrolled_xi
        self._pending: list[tuple[Any, Any]] = []
        self._pending_losses: list[torch.Tensor] = []
        self._mirrors = (_Mirror(), _Mirror(), _Mirror())  # snapshot buffers: w and β, w's and β's optimizers
        self.last_hypergradient: dict[str, torch.Tensor] = {}  # module name -> g (k,), of the latest step

    # ------------------------------------------------------------------ public
    @property
    def accumulation_steps(self) -> int:
        """Micro-batch calls per bi-level update: the accelerator's setting, read at each call
        (``accelerator.backward`` divides by the same number)."""
        return self.accelerator.gradient_accumulation_steps if self.accelerator is not None else 1

    def step(self, train_batch: Any, val_batch: Any, loss_fn: LossFn) -> dict[str, Any]:
        """One bi-level step (or one micro-batch of it, see the class docstring).

        Returns ``{"train_loss", "val_loss", "stepped", "skipped"}``: the training loss at ``w``
        (mean over micro-batches and processes), the validation loss at ``w'`` (None on a
        micro-step), whether β was updated, and whether the fp16 grad scaler skipped the step.
        If anything raises, ``w``, β, their gradients and the optimizers' states are put back as
        they were before the call.
        """
        pending, losses = list(self._pending), list(self._pending_losses)
        final = len(pending) + 1 >= self.accumulation_steps
        snap = self._snapshot(full=final)
        try:
            if not pending:
                self._zero_grads(self.weights + self._beta_opt_params)
            self._pending.append((train_batch, val_batch))
            self._pending_losses.append(self._train_backward(train_batch, loss_fn, sync=final))
            if not final:
                return {"train_loss": float(self._pending_losses[-1]), "val_loss": None, "stepped": False, "skipped": False}
            out = self._bilevel(loss_fn, snap)
        except BaseException:
            self._restore(snap)
            self._pending, self._pending_losses = pending, losses
            raise
        return out

    # ------------------------------------------------------------------ the update
    def _bilevel(self, loss_fn: LossFn, snap: dict) -> dict[str, Any]:
        """The update on the final micro-batch; ``snap`` (taken at the call's start) holds w and
        the weight optimizer's state before the step (reused for the unrolled centre and roll-back)."""
        trains = [t for t, _ in self._pending]
        vals = [v for _, v in self._pending]
        train_loss = torch.stack([x.to(torch.float64) for x in self._pending_losses]).mean()
        w0 = [saved for _, saved in snap["params"][: len(self.weights)]]

        if self.mode == "darts_unrolled":
            if not self._unscale_clip_check():
                self._weight_step(prepared=True)  # lets the grad scaler skip and lower its scale
                return self._finish_skipped(train_loss)
            g, losses = self._hypergradient_unrolled(trains, vals, loss_fn, w0, train_loss)
            self._beta_step(g)
            if self.rollback:  # redo the inner gradient at w with the new β
                self._zero_grads(self.weights)
                self._train_backward_all(trains, loss_fn)
                self._rescale_redo()
            self._weight_step(prepared=True)
        else:
            if self._weight_step():
                return self._finish_skipped(train_loss)
            g, losses = self._hypergradient(trains, vals, loss_fn, train_loss)
            self._beta_step(g)
            if self.rollback:  # restore w and its optimizer state, redo the inner step with the new β
                with torch.no_grad():
                    for p, s in zip(self.weights, w0):
                        p.copy_(s)
                _restore_optimizer(self.weight_optimizer, snap["opts"][0][1])
                self._train_backward_all(trains, loss_fn)
                self._weight_step()
        self.last_hypergradient = dict(zip(self.names, g))
        torch._foreach_add_([layer.lora_autolora_outer_steps[a] for _, layer, a in self.layers], 1)
        self._zero_grads(self.weights + self._beta_opt_params)
        self._pending, self._pending_losses = [], []
        return {"train_loss": float(losses[1]), "val_loss": float(losses[0]), "stepped": True, "skipped": False}

    def _finish_skipped(self, train_loss: torch.Tensor) -> dict[str, Any]:
        self._zero_grads(self.weights + self._beta_opt_params)
        self._pending, self._pending_losses = [], []
        return {"train_loss": float(train_loss), "val_loss": None, "stepped": False, "skipped": True}

    # ------------------------------------------------------------------ inner step
    def _distributed(self) -> bool:
        return isinstance(self.model, DistributedDataParallel) and dist.is_initialized() and dist.get_world_size() > 1

    def _all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean over the DDP processes, in place (torch.autograd.grad bypasses DDP's own reduction)."""
        if self._distributed():
            group = getattr(self.model, "process_group", None)
            dist.all_reduce(t, group=group)
            t /= dist.get_world_size(group)
        return t

    def _scaler(self):
        return None if self.accelerator is None else self.accelerator.scaler

    def _train_backward(self, batch: Any, loss_fn: LossFn, sync: bool) -> torch.Tensor:
        """Forward + backward of the training loss through the model as given (DDP reduces w's
        gradient on the ``sync`` micro-batch); ``1/n`` of it accumulates into ``.grad``."""
        acc = self.accelerator
        if sync:
            ctx = nullcontext()
        elif acc is not None:
            ctx = acc.no_sync(self.model)
        elif isinstance(self.model, DistributedDataParallel):
            ctx = self.model.no_sync()
        else:
            ctx = nullcontext()
        # β's training-loss gradient is never used: outside DDP (which expects a gradient for every
        # trainable parameter it wraps) β sits out of this backward.
        with ctx, nullcontext() if self._distributed() else _frozen(self.betas):
            loss = loss_fn(self.model, batch)
            if acc is not None:
                acc.backward(loss)  # divides by gradient_accumulation_steps, applies the fp16 scaler
            else:
                (loss / self.accumulation_steps).backward()
        return loss.detach()

    def _train_backward_all(self, trains: list, loss_fn: LossFn) -> None:
        for i, tb in enumerate(trains):
            self._train_backward(tb, loss_fn, sync=i == len(trains) - 1)

    def _check_not_accumulating(self) -> None:
        if self.accelerator is not None and not self.accelerator.sync_gradients:
            raise RuntimeError(
                "dashdiff: BilevelStep.step was called inside accelerator.accumulate(): BilevelStep counts the "
                "gradient-accumulation micro-batches itself; call it outside accelerator.accumulate."
            )

    def _clip(self) -> None:
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.weights, self.max_grad_norm)

    def _unscale_clip_check(self) -> bool:
        """Unscale w's fp16-scaled gradient in place (the virtual step needs true values), clip;
        False if it is not finite."""
        self._check_not_accumulating()
        if self._scaler() is not None:
            self.accelerator.unscale_gradients(self.weight_optimizer)
            if not all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self.weights):
                return False
        self._clip()
        return True

    def _rescale_redo(self) -> None:
        """The redone gradient is loss-scaled again, but the scaler has already unscaled this
        optimizer in this iteration (and would not again): unscale by hand, then clip."""
        scaler = self._scaler()
        if scaler is not None:
            inv = 1.0 / scaler.get_scale()
            for p in self.weights:
                if p.grad is not None:
                    p.grad.mul_(inv)
            if not all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self.weights):
                raise FloatingPointError("dashdiff: non-finite gradient when redoing the inner step (roll-back)")
        self._clip()

    def _weight_step(self, prepared: bool = False) -> bool:
        """The inner optimizer step ``w -> w'``; True if the fp16 grad scaler skipped it.
        ``prepared``: the gradient is already unscaled and clipped."""
        self._check_not_accumulating()
        acc, opt = self.accelerator, self.weight_optimizer
        if not prepared and self.max_grad_norm is not None:
            if acc is not None:
                acc.clip_grad_norm_(self.weights, self.max_grad_norm)  # unscales first under fp16
            else:
                self._clip()
        scaler = self._scaler()
        scale = scaler.get_scale() if scaler is not None else None
        opt.step()
        # A fused optimizer skips inside its kernel (GradScaler hands it found_inf), which accelerate's
        # step_was_skipped does not see; the scaler backing off its scale does.
        skipped = bool(getattr(opt, "step_was_skipped", False)) or (scale is not None and scaler.get_scale() < scale)
        self._zero_grads(self.weights)
        return skipped

    def _beta_step(self, g: list[torch.Tensor]) -> None:
        for p in self._beta_opt_params:
            p.grad = None
        for p, gi in zip(self.betas, g):  # g: fresh, graph-free tensors of this step
            p.grad = gi if gi.dtype == p.dtype else gi.to(p.dtype)
        # β's gradient is exact and unscaled: step the torch optimizer, never accelerate's wrapper
        # (whose grad scaler would divide it by the loss scale, and which skips on accumulation steps).
        _inner_optimizer(self.beta_optimizer).step()
        for p in self._beta_opt_params:
            p.grad = None

    # ------------------------------------------------------------------ hypergradients
    def _passes(self):
        """Context for the finite-difference passes: the unwrapped module, full precision."""
        return _full_precision(self.root, self.device_type)

    @contextmanager
    def _val_passes(self) -> Iterator[nn.Module]:
        """Context for the validation pass: the unwrapped module at the inner step's precision (its
        autocast, if any: accelerate's wrapper on the module or the caller's context), or full
        precision when asked for or under fp16 (no loss scale here)."""
        dev = self.device_type
        fp16 = (self.accelerator is not None and self.accelerator.mixed_precision == "fp16") or (
            torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.float16)
        if self.val_precision == "float32" or fp16:
            with self._passes() as net:
                yield net
        else:
            yield self.root

    def _fork_rng(self):
        """Both finite-difference passes start from the RNG state at entry; the global state is left as it was."""
        dev = self.betas[0].device
        devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    def _val_pass(self, vals: list, loss_fn: LossFn, net: nn.Module, need_v: bool
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """∂β L_val, v = ∂w L_val (if ``need_v``) and L_val at the current w: means over micro-batches."""
        inputs = self.betas + (self.weights if need_v else [])
        acc: Optional[list[torch.Tensor]] = None
        total = torch.zeros((), dtype=torch.float64, device=self.betas[0].device)
        for vb in vals:
            with nullcontext() if need_v else _frozen(self.weights):
                loss = loss_fn(net, vb)
                gs = _grads(loss / len(vals) if len(vals) > 1 else loss, inputs)
            if acc is None:
                acc = gs
            else:
                torch._foreach_add_(acc, gs)
            total += loss.detach().to(torch.float64) / len(vals)
        k = len(self.betas)
        return acc[:k], acc[k:], total

    @contextmanager
    def _fd_mode(self) -> Iterator[None]:
        """The finite-difference passes' mode: eval (dropout off), LoRA weights frozen (∂β only), no
        graph outside the passes themselves."""
        with _eval_mode(self._module_dicts), _frozen(self.weights), torch.no_grad():
            yield

    def _add_beta_grads(self, out: list[torch.Tensor], trains: list, loss_fn: LossFn, net: nn.Module,
                        sign: float, prepare: Callable[[Any], Any] = lambda batch: batch) -> None:
        """``out += sign · ∂β`` of the mean training loss over ``trains`` (each batch through ``prepare``
        first), each pass from the RNG state at entry (so every finite-difference pass sees the same
        random draws)."""
        for tb in trains:
            with self._fork_rng(), torch.enable_grad():
                loss = loss_fn(net, prepare(tb)) / len(trains)
                gs = _grads(loss, self.betas)
            torch._foreach_add_(out, gs, alpha=sign)

    def _beta_grad_at(self, trains: list, loss_fn: LossFn, net: nn.Module,
                      center: list[torch.Tensor], v: list[torch.Tensor], eps: float, at_center: bool = False
                      ) -> list[torch.Tensor]:
        """Central difference ``[∂β L_tr(c + εv) − ∂β L_tr(c − εv)] / 2ε`` (mean over micro-batches),
        both passes in eval mode from the same RNG state; ``w`` is left at ``center``
        (``at_center``: it is there already)."""
        out = [torch.zeros_like(p) for p in self.betas]
        try:
            with self._fd_mode():
                for sign in (1.0, -1.0):
                    if not (at_center and sign == 1.0):
                        torch._foreach_copy_(self.weights, center)
                    torch._foreach_add_(self.weights, v, alpha=sign * eps)
                    self._add_beta_grads(out, trains, loss_fn, net, sign)
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.weights, center)
        return torch._foreach_div(out, 2 * eps)

    def _central_difference(self, trains: list, loss_fn: LossFn, net: nn.Module, center: list[torch.Tensor],
                            v: list[torch.Tensor], eps: float, at_center: bool = False) -> list[torch.Tensor]:
        """``H_βw L_tr · v`` by central differences around ``center``: two passes, or one batched pass
        (``fd_batched``; checked against the two-pass result on its first use)."""
        if not self.fd_batched:
            return self._beta_grad_at(trains, loss_fn, net, center, v, eps, at_center)
        got = self._beta_grad_batched(trains, loss_fn, net, center, v, eps)
        if not self._fd_checked:
            want = self._beta_grad_at(trains, loss_fn, net, center, v, eps, at_center)
            gap, size = (_flat(got) - _flat(want)).norm(), _flat(want).norm()
            bad = (gap > FD_BATCHED_CHECK_RTOL * size + 1e-12).to(torch.float64).reshape(1)
            if self._distributed():  # one verdict for all processes, or the ones that pass would wait forever
                dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=getattr(self.model, "process_group", None))
            if bool(bad):
                raise ValueError(
                    f"dashdiff: fd_batched=True gave a finite difference {float(gap / size):.1%} away from the "
                    "two-pass one: loss_fn(model, double(batch)) must be the mean of the two copies' losses (a "
                    "mean over the samples on dim 0, with every tensor of the batch doubled on dim 0). Make the "
                    "loss such a mean, pass a matching double=..., or use fd_batched=False.")
            self._fd_checked = True
        return got

    def _beta_grad_batched(self, trains: list, loss_fn: LossFn, net: nn.Module, center: list[torch.Tensor],
                           v: list[torch.Tensor], eps: float) -> list[torch.Tensor]:
        """The central difference from one pass over each doubled training batch: every AutoLoRA layer
        runs copy 1 at ``center + εv`` and copy 2 at ``center − εv`` (``PairedAutoLoraLinear``) and hands
        β the difference of the copies' gradients, ½(∂β L+ − ∂β L−) for a mean loss. The weights
        themselves are not touched."""
        first = self._pair_bufs[0][0] if self._pair_bufs else None
        if first is None or first.device != center[0].device or first.dtype != center[0].dtype:
            def pair_buf(i: int) -> torch.Tensor:
                return torch.empty((2, *center[i].shape), dtype=center[i].dtype, device=center[i].device)

            self._pair_bufs = [(pair_buf(i), pair_buf(j)) for i, j in self._pair_index]
        order = [i for pair in self._pair_index for i in pair]
        c, d = [center[i] for i in order], [v[i] for i in order]
        for sign, half in ((1.0, 0), (-1.0, 1)):
            views = [t[half] for pair in self._pair_bufs for t in pair]
            torch._foreach_copy_(views, c)
            torch._foreach_add_(views, d, alpha=sign * eps)
        out = [torch.zeros_like(p) for p in self.betas]
        with AutoLoraVariant.paired([(layer, a) for _, layer, a in self.layers], self._pair_bufs), self._fd_mode():
            self._add_beta_grads(out, trains, loss_fn, net, 1.0, prepare=self.double)
        return torch._foreach_div(out, eps)  # 2·½(∂β L+ − ∂β L−) / 2ε

    def _reduce_g(self, g: list[torch.Tensor], val_loss: torch.Tensor, train_loss: torch.Tensor
                  ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One all-reduce for β's gradient and the two logged losses."""
        buf = torch.cat([_flat(g).to(torch.float64), val_loss.reshape(1), train_loss.to(torch.float64).reshape(1)])
        buf = self._all_reduce_mean(buf)
        dtypes = {p.dtype for p in self.betas}
        if len(dtypes) == 1:  # one cast for all layers, not one per layer
            return _unflat(buf[:-2].to(dtypes.pop()), g), buf[-2:]
        return [x.to(p.dtype) for x, p in zip(_unflat(buf[:-2], g), self.betas)], buf[-2:]

    def _perturbation(self, v: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
        """The global v (mean over processes, so ε is the same everywhere) and ε = fd_epsilon / ‖v‖."""
        if self._distributed():
            v = _unflat(self._all_reduce_mean(_flat(v)), v)
        norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(v, dtype=torch.float64))))
        # ‖v‖ = 0 means v = 0: no perturbation and a zero difference; any finite ε avoids 0·∞ and 0/0.
        eps = self.fd_epsilon / norm if norm > 0 else 1.0
        return v, min(eps, torch.finfo(v[0].dtype).max)

    def _hypergradient(self, trains: list, vals: list, loss_fn: LossFn, train_loss: torch.Tensor):
        """``darts`` / ``first_order`` at the current (post-inner-step) weights w'."""
        need_v = self.mode == "darts"
        with self._val_passes() as net:
            g_val, v, val_loss = self._val_pass(vals, loss_fn, net, need_v)
        if not need_v:
            return self._reduce_g(g_val, val_loss, train_loss)
        with self._passes() as net:
            v, eps = self._perturbation(v)
            center = [p.detach().clone() for p in self.weights]
            hvp = self._central_difference(trains, loss_fn, net, center, v, eps, at_center=True)
        g = [a - b for a, b in zip(g_val, hvp)]
        return self._reduce_g(g, val_loss, train_loss)

    def _hypergradient_unrolled(self, trains: list, vals: list, loss_fn: LossFn, w0: list[torch.Tensor],
                                train_loss: torch.Tensor):
        """``darts_unrolled``: virtual SGD step ``w_v = w − ξ ∇w L_tr(w)`` (the gradient already
        in ``.grad``), ``v = ∂w L_val(w_v)``, g = ∂β L_val(w_v) − ξ·H_βw L_tr(w)·v by central
        differences around w. Leaves w and its gradient as they were."""
        xi = self.unrolled_xi
        try:
            with torch.no_grad():
                for p in self.weights:
                    if p.grad is not None:
                        p.sub_(p.grad, alpha=xi)
            with self._val_passes() as net:
                g_val, v, val_loss = self._val_pass(vals, loss_fn, net, need_v=True)
            with self._passes() as net:
                v, eps = self._perturbation(v)
                hvp = self._central_difference(trains, loss_fn, net, w0, v, eps)
        finally:
            with torch.no_grad():
                for p, c in zip(self.weights, w0):
                    p.copy_(c)
        g = [a - xi * b for a, b in zip(g_val, hvp)]
        return self._reduce_g(g, val_loss, train_loss)

    # ------------------------------------------------------------------ snapshots
    def _zero_grads(self, params: Sequence[torch.Tensor]) -> None:
        for p in params:
            p.grad = None

    def _snapshot(self, full: bool) -> dict:
        params = self.weights + self._beta_opt_params
        snap: dict = {"grads": [(p, None if p.grad is None else p.grad.detach().clone()) for p in params]}
        if full:
            snap["params"] = list(zip(params, self._mirrors[0].copy(params)))
            snap["opts"] = [(o, _snapshot_optimizer(o, m))
                            for o, m in zip((self.weight_optimizer, self.beta_optimizer), self._mirrors[1:])]
            acc = self.accelerator
            if acc is not None and acc.scaler is not None:
                snap["scaler"] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in acc.scaler.state_dict().items()}
                snap["scaler_per_opt"] = dict(acc.scaler._per_optimizer_states)
        return snap

    def _restore(self, snap: dict) -> None:
        with torch.no_grad():
            for p, s in snap.get("params", []):
                p.copy_(s)
        for p, g in snap["grads"]:
            p.grad = None if g is None else g.clone()
        for o, s in snap.get("opts", []):
            _restore_optimizer(o, s)
        if "scaler" in snap:
            scaler = self.accelerator.scaler
            scaler.load_state_dict(snap["scaler"])
            scaler._per_optimizer_states.clear()
            scaler._per_optimizer_states.update(snap["scaler_per_opt"])


# --------------------------------------------------------------------------- data split


def split_indices(n: int, val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0) -> tuple[list[int], list[int]]:
    """Seeded random split of ``range(n)`` into (train, validation) index lists.

    The validation part has ``ceil(val_fraction · n)`` items (as scikit-learn's
    ``train_test_split``); raises if either part would be empty."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"dashdiff: the number of examples must be a non-negative int, got {n!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"dashdiff: val_fraction must be strictly between 0 and 1, got {val_fraction}")
    n_val = math.ceil(val_fraction * n - 1e-9)  # tolerate 0.3 * 10 = 3.0000000000000004
    if n_val < 1 or n - n_val < 1:
        raise ValueError(
            f"dashdiff: cannot split {n} example(s) with val_fraction={val_fraction}: the "
            f"{'validation' if n_val < 1 else 'training'} part would be empty "
            f"({n - n_val} train / {n_val} validation). AutoLoRA needs at least one example in each; add data "
            "or change val_fraction."
        )
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def split_train_val(data: Sequence, val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0):
    """Split a dataset / sequence into (train, validation) parts, seeded (default 70/30, as published).

    A list or tuple gives two lists; a Hugging Face ``datasets.Dataset`` (anything with ``select``
    that is not a torch ``Dataset``) two ``select``-ed datasets; anything else with ``__len__`` and
    ``__getitem__`` (a torch ``Dataset``) two ``Subset``."""
    from torch.utils.data import Dataset, Subset

    train_idx, val_idx = split_indices(len(data), val_fraction, seed)
    if isinstance(data, (list, tuple)):
        return [data[i] for i in train_idx], [data[i] for i in val_idx]
    if hasattr(data, "select") and not isinstance(data, Dataset):
        return data.select(train_idx), data.select(val_idx)
    return Subset(data, train_idx), Subset(data, val_idx)


# --------------------------------------------------------------------------- retrain phase


def _searched_settings(model) -> tuple[dict[str, int], dict[str, Any]]:
    adapter = resolve_adapter(model, "autolora", None)
    layers = list(iter_layers(model, "autolora", adapter))
    _, layer, a = layers[0]
    drop = layer.lora_dropout[a]
    settings = {
        "lora_alpha": layer.lora_alpha[a],
        "lora_dropout": float(drop.p) if isinstance(drop, nn.Dropout) else 0.0,
    }
    return determine_ranks(model, adapter_name=adapter), settings


def retrain_config(model_or_ranks: Union[nn.Module, dict[str, int]], lora_alpha: Optional[float] = None,
                   **lora_kwargs: Any) -> LoraConfig:
    """A plain ``peft.LoraConfig`` for the retrain phase with the found ranks as ``rank_pattern``.

    ``model_or_ranks``: the searched model (ranks read with ``determine_ranks``, default threshold)
    or ``{module_name: rank}`` with full module names relative to the base model (as
    ``determine_ranks`` returns them). One ``lora_alpha`` for every layer (published policy, so a
    layer's scale is ``lora_alpha / r_i``): by default the searched adapter's (PEFT's default 8 for
    a dict). ``lora_dropout`` defaults to the searched adapter's. Further keywords go to
    ``LoraConfig`` (e.g. ``init_lora_weights="gaussian"``). ``target_modules`` are exactly the
    searched layers; ``r`` is the most common rank.
    """
    for key in ("target_modules", "rank_pattern", "r"):
        if key in lora_kwargs:
            raise ValueError(f"dashdiff: retrain_config sets {key} from the found ranks; do not pass it")
    if isinstance(model_or_ranks, dict):
        ranks = {str(k): int(v) for k, v in model_or_ranks.items()}
        defaults: dict[str, Any] = {}
    elif isinstance(model_or_ranks, nn.Module):
        ranks, defaults = _searched_settings(model_or_ranks)
    else:
        raise TypeError(
            f"dashdiff: retrain_config takes a model (e.g. pipe.unet) or a {{name: rank}} dict, not "
            f"{type(model_or_ranks).__name__}: a LoraConfig's rank_pattern is relative to the model it is added to"
        )
    if not ranks:
        raise ValueError("dashdiff: no ranks given")
    if bad := {n: r for n, r in ranks.items() if r < 1}:
        raise ValueError(f"dashdiff: ranks must be >= 1, got {bad}")
    if lora_alpha is not None:
        defaults["lora_alpha"] = lora_alpha
    r = Counter(ranks.values()).most_common(1)[0][0]
    # PEFT picks the *first* rank_pattern key that matches a module as a dotted suffix: with the
    # longest names first, a full name can only be matched by its own key.
    names = sorted(ranks, key=lambda n: (-len(n), n))
    kwargs = {**defaults, **lora_kwargs}
    cfg = LoraConfig(r=r, target_modules=list(names), rank_pattern={n: ranks[n] for n in names}, **kwargs)
    if isinstance(model_or_ranks, nn.Module):
        _check_pattern_matches(cfg, model_or_ranks)
    return cfg


def _check_pattern_matches(cfg: LoraConfig, model: nn.Module) -> None:
    """Every searched layer resolves to its own rank_pattern key under PEFT's key matching."""
    from peft.utils.other import get_pattern_key

    keys = list(cfg.rank_pattern)
    for name in keys:
        if get_pattern_key(keys, name) != name:
            raise ValueError(f"dashdiff: rank_pattern key matching is ambiguous for {name!r}")
    root = base_model(model)
    modules = {n for n, _ in root.named_modules()}
    if missing := [n for n in keys if n not in modules]:
        raise ValueError(f"dashdiff: rank_pattern names not found in the model: {missing[:3]}")
