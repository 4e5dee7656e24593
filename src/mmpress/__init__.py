"""mmpress: training-free compression of multimodal tokens in Hugging Face VLMs.

    import mmpress
    press = mmpress.get_press("divprune", keep=64)
    with press(model):
        model.generate(**inputs)
"""

from mmpress import presses  # noqa: F401  (registers every press)
from mmpress.api import ask
from mmpress.demo import load_demo
from mmpress.models import get_adapter
from mmpress.presses.base import PRESSES, Press, VisualContext, get_press, list_presses, register

__version__ = "0.1.0"

__all__ = ["PRESSES", "Press", "VisualContext", "ask", "get_adapter", "get_press", "list_presses", "load_demo",
           "register"]
