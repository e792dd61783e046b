"""What an adapter method is to dashdiff's layer: a PEFT ``LoraVariant`` plus the hooks that saving,
loading and exporting need.

PEFT keeps one variant object per adapter in ``LoraLayer.lora_variant`` and calls its ``init``,
``forward`` and merge methods; dashdiff's ``DashdiffLinear.resolve_lora_variant`` picks the object
from ``dashdiff.registry.VARIANTS`` by the config's method. All methods are static and take the
layer and the adapter name (PEFT's convention): the per-adapter state lives in the layer's
containers, declared here per method (``containers``, ``settings``) and created by the layer.

A new method subclasses ``MethodVariant`` in its own folder and adds one entry to the registry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Optional

import torch
from peft.tuners.lora.layer import LoraVariant

if TYPE_CHECKING:
    from .layer import DashdiffLinear

# (shape, is floating point) of one stored tensor, keyed by its suffix after the module name
TensorSpec = tuple[tuple[int, ...], bool]


class ExportedFactors(NamedTuple):
    """One layer of one adapter as a plain LoRA: ``ΔW = b @ a`` at runtime scale 1.

    a (rank, in), b (out, rank) in float32 (float64 for float64 adapters); ``record``: the layer's
    entry in the export header; ``caveat``: the layer is exported in a state worth a warning
    (``MethodVariant.caveat`` words it)."""

    a: torch.Tensor
    b: torch.Tensor
    record: dict[str, Any]
    caveat: bool = False


class MethodVariant(LoraVariant):
    """Base of dashdiff's methods (see module docstring). Subclasses set the class attributes and
    implement ``init``, ``forward``, ``plain_factors`` and the state hooks."""

    kind: ClassVar[str]  # the method's name in headers and in ``DashdiffLinear.adapter_kind``
    label: ClassVar[str]  # for messages ("LoRA-Dash")
    config_class: ClassVar[type]
    # Per-adapter containers the layer creates, in this order: name -> "parameter" (a trainable
    # nn.ParameterDict, PEFT's adapter_layer_names) or "buffer" (a persistent BufferDict).
    containers: ClassVar[dict[str, str]] = {}
    # Plain per-adapter dicts PEFT should treat as adapter state (other_param_names).
    settings: ClassVar[tuple[str, ...]] = ()
    # Container names whose tensors the state file holds, in file order.
    state_names: ClassVar[tuple[str, ...]] = ()
    # Per-adapter Python dicts the layer creates for the method's runtime bookkeeping (not state).
    caches: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ PEFT's LoraVariant
    @staticmethod
    def check(module: "DashdiffLinear", adapter_name: str, config: Any, where: str) -> None:
        """Refuse a config that cannot fit this layer, before PEFT creates anything."""

    @staticmethod
    def init(module: "DashdiffLinear", adapter_name: str, **kwargs: Any) -> None:
        raise NotImplementedError

    @staticmethod
    def forward(module: "DashdiffLinear", active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
        """``result`` (the base layer's output) plus this adapter's update of ``x``."""
        raise NotImplementedError

    # Merging goes through ``get_delta_weight`` (the plain factors), exactly as PEFT does for plain LoRA.
    @staticmethod
    def merge_safe(module: "DashdiffLinear", active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        orig_weight += module.get_delta_weight(active_adapter).to(orig_weight.dtype)
        return orig_weight

    @staticmethod
    def merge_unsafe(module: "DashdiffLinear", active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter)

    @staticmethod
    def unmerge(module: "DashdiffLinear", active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        weight = orig_weight.data
        weight -= module.get_delta_weight(active_adapter).to(weight.dtype)
        return weight

    # ------------------------------------------------------------------ export
    @staticmethod
    def plain_factors(module: "DashdiffLinear", adapter: str, a: torch.Tensor, b: torch.Tensor,
                      keep: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter as plain factors, from the LoRA part ``a`` (r, in), ``b`` (out, r) with the
        scaling already folded into ``b``; ``keep``: components to keep (methods that prune)."""
        return a, b

    @classmethod
    def export(cls, module: "DashdiffLinear", adapter: str, threshold: Optional[float]) -> ExportedFactors:
        """This layer for ``export_lora`` (``threshold``: a pruning method's λ, None for its default)."""
        a, b = module.plain_factors(adapter)
        return ExportedFactors(a, b, {"method": cls.kind, "r": module.r[adapter]})

    @staticmethod
    def caveat(adapter: str, count: int, example: str) -> str:
        """The warning for ``count`` layers whose ``export`` flagged a caveat."""
        return ""

    # ------------------------------------------------------------------ training state
    @classmethod
    def state_tensors(cls, module: "DashdiffLinear", adapter: str) -> dict[str, torch.Tensor]:
        """Suffix -> the layer's own tensor (not a copy) for the state file, beyond lora_A / lora_B."""
        return {name: getattr(module, name)[adapter] for name in cls.state_names}

    @staticmethod
    def expected_tensors(meta: dict[str, Any], n_in: int, n_out: int) -> dict[str, TensorSpec]:
        """Suffix -> (shape, floating) of the state tensors a header entry ``meta`` promises."""
        return {}

    @staticmethod
    def header(module: "DashdiffLinear", adapter: str) -> dict[str, Any]:
        """Extra fields of this layer's entry in the state header (beyond method and r)."""
        return {}

    @staticmethod
    def check_header(meta: dict[str, Any]) -> bool:
        """Whether a state header entry has this method's fields with valid values."""
        return True

    @staticmethod
    def record_tensors(module: "DashdiffLinear", adapter: str) -> dict[str, torch.Tensor]:
        """Suffix -> tensor of what the method recorded (not trained state), for the state file."""
        return {}

    @staticmethod
    def check_record(file: Any, name: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor], k: int,
                     check_tensor: Any) -> set[str]:
        """Validate this layer's record tensors in a state file; returns the keys it accounts for."""
        return set()

    @staticmethod
    def after_state_load(module: "DashdiffLinear") -> None:
        """After ``load_state_dict`` wrote the layer's tensors: re-read anything kept beside them."""

    @staticmethod
    def load_record(module: "DashdiffLinear", adapter: str, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """After the state tensors were copied in: restore the record and the Python-side mirrors."""

    @staticmethod
    def layer_config(module: "DashdiffLinear", adapter: str, common: dict[str, Any]) -> Any:
        """A config rebuilt from the layer (for models whose PEFT config was not kept)."""
        raise NotImplementedError
