"""odelora: LoRA training as solving an ODE.

Two independent choices make a method: a flow (what moves: ``odelora.flows``) and an integrator
(how time advances: ``odelora.integrators``). ``ODELoRA`` puts them in a torch optimizer.
"""

from . import flows, geometry, integrators
from .geometry import balance, imbalance, tangent_project
from .integrators import TABLEAUS, integrate
from .optim import NonFiniteError, ODELoRA
from .pairs import LoRAPair

__version__ = "0.1.0"

__all__ = [
    "ODELoRA",
    "LoRAPair",
    "NonFiniteError",
    "flows",
    "geometry",
    "integrators",
    "balance",
    "imbalance",
    "tangent_project",
    "integrate",
    "TABLEAUS",
    "__version__",
]
