"""cirlab.models: torch nn.Modules only (no training logic).

The open_clip backbone wrapper every method shares, the one checkpoint reader (loading), LoRA
(lora), the method networks (Combiner, Pic2Word's mapper, SEARLE/LinCIR's phi, FocalLens's
conditional encoder), image transforms, and import of the reference repositories' released
checkpoints. Importing this package registers cirlab's tiny model configs with open_clip.
"""

from cirlab.models.backbone import DOLLAR_TOKEN_ID, STAR_TOKEN_ID, Backbone
from cirlab.models.checkpoints import import_reference_checkpoint
from cirlab.models.combiner import Combiner
from cirlab.models.mappers import Phi, Pic2WordMapper
from cirlab.models.transforms import SquarePad, TargetPad, build_transform

__all__ = [
    "Backbone", "DOLLAR_TOKEN_ID", "STAR_TOKEN_ID", "Combiner", "Pic2WordMapper", "Phi",
    "import_reference_checkpoint", "TargetPad", "SquarePad", "build_transform",
]
