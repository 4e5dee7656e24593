"""mmpress: training-free compression of multimodal tokens in Hugging Face VLMs.

    import mmpress
    press = mmpress.get_press("divprune", keep=64)
    with press(model):
        model.generate(**inputs)
"""

from mmpress.models.protocol import check_version

check_version()  # one warning when transformers is outside the tested range (pyproject)

from mmpress import presses  # noqa: E402,F401  (registers every press)
from mmpress.api import ask  # noqa: E402
from mmpress.demo import load_demo, load_demo_audio  # noqa: E402
from mmpress.models import get_adapter  # noqa: E402
from mmpress.models.base import continue_positions  # noqa: E402
from mmpress.presses.base import PRESSES, Press, VisualContext, get_press, list_presses, register  # noqa: E402
from mmpress.presses.compose import at_layer, compose  # noqa: E402
from mmpress.presses.spec import load_press, parse_press, press_spec, save_press  # noqa: E402

__version__ = "0.1.0"

__all__ = ["PRESSES", "Press", "VisualContext", "ask", "at_layer", "compose", "continue_positions", "get_adapter", "get_press",
           "list_presses", "load_demo", "load_demo_audio", "load_press", "parse_press", "press_spec", "register",
           "save_press"]
