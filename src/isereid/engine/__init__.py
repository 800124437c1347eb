"""Training engine: the epoch loop, one iteration's losses, checkpoints, torch.distributed."""
from ..distributed import DistContext, gather_with_grad, init_distributed
from .step import StepLosses, ise_losses

__all__ = ["DistContext", "StepLosses", "gather_with_grad", "init_distributed", "ise_losses"]
