"""odelora: LoRA training as solving an ODE.

Two independent choices make a method: a flow (what moves: ``odelora.flows``) and an integrator
(how time advances: ``odelora.integrators``, stepping the factors as ``odelora.retractions``
says). ``ODELoRA`` puts them in a torch optimizer. PEFT models: ``odelora.integrations.peft``
(``lora_pairs``, ``create_odelora_optimizer``).
"""

from . import flows, geometry, integrators, retractions
from .geometry import balance, imbalance, tangent_project
from .integrators import TABLEAUS, NonFiniteError, integrate
from .optim import ODELoRA, StepFailure, StepRecord, StepTotals
from .pairs import LoRAPair


__version__ = "0.2.0"

__all__ = [
    "ODELoRA",
    "LoRAPair",
    "NonFiniteError",
    "StepFailure",
    "StepRecord",
    "StepTotals",
    "flows",
    "geometry",
    "integrators",
    "retractions",
    "balance",
    "imbalance",
    "tangent_project",
    "integrate",
    "TABLEAUS",
    "__version__",
]
